"""Training configuration: one dataclass holds every option, its default, its help text and its checks.

The CLI options and the keys of a `--config FILE.toml` are the field names (dashes or underscores); the
command line wins over the file, the file over the defaults. Checks that need no model run in
`__post_init__`, so an impossible combination fails before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import LoraDBError

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

Method = Literal["lora", "full"]
Optimizer = Literal["adamw", "adamw8bit"]
MixedPrecision = Literal["no", "fp16", "bf16"]
AttentionBackend = Literal["sdpa", "xformers"]
Quantization = Literal["none", "nf4", "int8"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    # -- model and data ---------------------------------------------------------------------------------------
    model: str = _opt(
        "thu-ml/unidiffuser-v1",
        "Hub id or local diffusers folder of a UniDiffuser pipeline; `tiny` builds a small random one offline.",
        "Model and data",
    )
    instance_dir: Path | None = _opt(None, "Folder of photos of the subject (jpg, png, webp, bmp).", "Model and data")
    instance_prompt: str | None = _opt(
        None,
        'Prompt naming the subject, e.g. "a photo of sks dog". NAME.txt beside an image overrides it.',
        "Model and data",
    )
    output_dir: Path | None = _opt(
        None, "Where the adapter, metrics, checkpoints and validation images go.", "Model and data"
    )
    resolution: int | None = _opt(
        None,
        "Training image size in pixels; defaults to the model's native size (512 for unidiffuser-v1).",
        "Model and data",
    )
    random_crop: bool = _opt(False, "Random instead of center crop (augmentation).", "Model and data")
    random_flip: bool = _opt(False, "Random horizontal flips (augmentation).", "Model and data")
    skip_bad_images: bool = _opt(False, "Skip unreadable images with a warning instead of stopping.", "Model and data")
    overwrite: bool = _opt(
        False,
        "Start afresh in an output folder that holds an earlier run (its lora-db files are replaced).",
        "Model and data",
    )
    # -- prior preservation ---------------------------------------------------------------------------------------
    class_prompt: str | None = _opt(
        None,
        'Prompt of the subject\'s class, e.g. "a photo of a dog"; turns on prior preservation.',
        "Prior preservation",
    )
    class_dir: Path | None = _opt(
        None,
        "Folder of class images; missing ones are generated with the base model and kept.",
        "Prior preservation",
    )
    num_class_images: int = _opt(
        100, "Class images to use (generated if the folder holds fewer).", "Prior preservation"
    )
    prior_loss_weight: float = _opt(
        1.0, "Weight of the class loss: loss = instance + weight x class.", "Prior preservation"
    )
    class_generation_steps: int = _opt(25, "Denoising steps per generated class image.", "Prior preservation")
    class_generation_batch_size: int = _opt(4, "Class images generated per batch.", "Prior preservation")
    # -- what is trained -----------------------------------------------------------------------------------------
    method: Method = _opt(
        "lora",
        "`lora` trains adapters; `full` trains every U-ViT weight (the baseline benchmarks compare).",
        "Adapter",
    )
    rank: int = _opt(4, "LoRA rank r: adapter size grows linearly with it.", "Adapter")
    alpha: float | None = _opt(None, "LoRA alpha; the update is scaled by alpha / rank. Defaults to rank.", "Adapter")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch input.", "Adapter")
    target_modules: list[str] = _opt(
        lambda: list(UNET_ATTENTION_TARGETS),
        "U-ViT layers that get LoRA (suffixes of module names); add ff.net.0.proj and ff.net.2 for the MLPs.",
        "Adapter",
    )
    train_text_encoder: bool = _opt(
        False, "Also put LoRA into the CLIP text encoder (q/k/v/out projections).", "Adapter"
    )
    text_encoder_learning_rate: float | None = _opt(
        None, "Learning rate of the text-encoder LoRA; defaults to --learning-rate.", "Adapter"
    )
    uncond_prob: float = _opt(
        0.0,
        "Fraction of examples trained as unconditional (text = noise at t=T) so guidance keeps working.",
        "Adapter",
    )
    # -- optimisation ---------------------------------------------------------------------------------------------
    learning_rate: float = _opt(1e-4, "Peak learning rate.", "Optimisation")
    lr_scheduler: LRScheduler = _opt("constant", "Learning-rate schedule after warm-up.", "Optimisation")
    lr_warmup_steps: int = _opt(0, "Linear warm-up steps.", "Optimisation")
    max_train_steps: int = _opt(400, "Optimizer steps to train.", "Optimisation")
    train_batch_size: int = _opt(1, "Instance images per step and process (class images add as many).", "Optimisation")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches summed per optimizer step.", "Optimisation")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables it).", "Optimisation")
    weight_decay: float = _opt(1e-2, "AdamW weight decay.", "Optimisation")
    seed: int = _opt(0, "Seed of data order, augmentation, noise and LoRA init: same seed, same run.", "Optimisation")
    # -- memory ---------------------------------------------------------------------------------------------------
    gradient_checkpointing: bool = _opt(
        False,
        "Recompute each transformer block in backward: far fewer stored activations, ~30% slower steps.",
        "Memory",
    )
    optimizer: Optimizer = _opt(
        "adamw",
        "`adamw8bit` (bitsandbytes) stores Adam's two moments in 8 bits: 4x less optimizer memory.",
        "Memory",
    )
    mixed_precision: MixedPrecision = _opt(
        "no",
        "Frozen weights stored in fp16/bf16 and compute under autocast; trainable weights stay fp32.",
        "Memory",
    )
    attention: AttentionBackend = _opt(
        "sdpa", "`xformers` memory-efficient attention (CUDA only) instead of PyTorch SDPA.", "Memory"
    )
    cache_latents: bool = _opt(
        False,
        "Encode images (VAE latents, CLIP embeddings) once, then drop the VAE and image encoder.",
        "Memory",
    )
    quantize_base: Quantization = _opt(
        "none",
        "Store the frozen U-ViT (and a trained text encoder) in 4-bit NF4 or 8-bit (bitsandbytes, QLoRA): "
        "nf4 ~3.5x less weight memory than bf16; LoRA stays fp32.",
        "Memory",
    )
    # -- checkpoints ----------------------------------------------------------------------------------------------
    checkpointing_steps: int = _opt(0, "Save a resumable checkpoint every N steps (0: never).", "Checkpoints")
    checkpoints_total_limit: int | None = _opt(None, "Keep only the newest K checkpoints.", "Checkpoints")
    resume_from_checkpoint: str | None = _opt(
        None,
        "`latest` or a checkpoint folder to resume from: weights, optimizer, scheduler, RNG and step.",
        "Checkpoints",
    )
    # -- validation -----------------------------------------------------------------------------------------------
    validation_prompt: str | None = _opt(
        None, "Prompt sampled during training into OUTPUT_DIR/validation/.", "Validation"
    )
    validation_steps: int = _opt(100, "Sample validation images every N steps (and at the end).", "Validation")
    num_validation_images: int = _opt(2, "Images per validation.", "Validation")
    validation_inference_steps: int = _opt(25, "Denoising steps per validation image.", "Validation")
    validation_guidance_scale: float = _opt(8.0, "Guidance scale of validation images.", "Validation")

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        for name in ("instance_dir", "output_dir", "class_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        self._check()

    def _check(self) -> None:
        def fail(message: str) -> None:
            raise LoraDBError(message)

        if self.rank < 1:
            fail(f"--rank must be at least 1 (got {self.rank})")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            fail(f"--alpha must be a positive number (got {self.alpha})")
        for name in ("learning_rate", "text_encoder_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                fail(f"--{_flag(name)} must be a positive finite number (got {value})")
        if not 0 <= self.lora_dropout < 1:
            fail(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if not 0 <= self.uncond_prob <= 1:
            fail(f"--uncond-prob must be in [0, 1] (got {self.uncond_prob})")
        for name in (
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "class_generation_steps",
            "class_generation_batch_size",
            "validation_steps",
            "num_validation_images",
            "validation_inference_steps",
        ):
            if getattr(self, name) < 1:
                fail(f"--{_flag(name)} must be at least 1 (got {getattr(self, name)})")
        for name in (
            "lr_warmup_steps",
            "checkpointing_steps",
            "num_class_images",
            "max_grad_norm",
            "weight_decay",
            "prior_loss_weight",
        ):
            if getattr(self, name) < 0:
                fail(f"--{_flag(name)} must not be negative (got {getattr(self, name)})")
        if self.resolution is not None and self.resolution < 8:
            fail(f"--resolution must be a positive number of pixels (got {self.resolution})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            fail(f"--checkpoints-total-limit must be at least 1 (got {self.checkpoints_total_limit})")
        if not self.target_modules:
            fail("--target-modules is empty: name at least one layer, e.g. to_q")
        if (self.class_prompt is None) != (self.class_dir is None):
            given, missing = (
                ("--class-prompt", "--class-dir") if self.class_dir is None else ("--class-dir", "--class-prompt")
            )
            fail(f"{given} needs {missing} too: prior preservation uses both (or drop {given})")
        if self.method == "full" and self.train_text_encoder:
            fail("--train-text-encoder is a LoRA option: with --method full only the U-ViT is trained")
        if self.method == "full" and self.quantize_base != "none":
            fail(
                f"--quantize-base {self.quantize_base} freezes the base in {self.quantize_base}, and --method full "
                "trains every base weight: use --method lora, or drop --quantize-base"
            )
        if self.cache_latents and (self.random_crop or self.random_flip):
            fail(
                "--cache-latents encodes each image once, which would freeze --random-crop/--random-flip: "
                "drop one of them"
            )
        if self.overwrite and self.resume_from_checkpoint:
            fail("--overwrite starts afresh and --resume-from-checkpoint continues: choose one")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def with_prior_preservation(self) -> bool:
        return self.class_prompt is not None

    def require_run_inputs(self) -> None:
        """Checks the options a training run needs but a dry estimate does not."""
        for name in ("instance_dir", "instance_prompt", "output_dir"):
            if getattr(self, name) in (None, ""):
                raise LoraDBError(f"--{_flag(name)} is required for training")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_sources(cls, config_file: Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, then the TOML file's keys, then the non-None overrides (the command line)."""
        values = load_toml(config_file, cls) if config_file is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def option_type(annotation: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """(base type, allowed choices, is optional) of a field annotation."""
    hint = annotation
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str, tuple(typing.get_args(hint)), optional
    if typing.get_origin(hint) is list:
        return list, None, optional
    return hint, None, optional


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load_toml(path: Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a TOML file of option values, checking every key and type against the dataclass."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraDBError(f"--config {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LoraDBError(f"--config {path}: not valid TOML ({err})") from None
    hints = field_types(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in hints:
            known = ", ".join(sorted(_flag(n) for n in hints))
            raise LoraDBError(f"--config {path}: unknown key {key!r}; known keys: {known}")
        values[name] = _coerce(path, key, value, hints[name])
    return values


def _coerce(path: Path, key: str, value: Any, annotation: Any) -> Any:
    base, choices, _ = option_type(annotation)

    def wrong(expected: str) -> LoraDBError:
        return LoraDBError(f"--config {path}: {key} must be {expected}, not {value!r}")

    if base is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if base is list:
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise wrong("a list of strings")
        return value
    if not isinstance(value, str):
        raise wrong("a string")
    if choices is not None and value not in choices:
        raise wrong("one of " + ", ".join(choices))
    return Path(value) if base is Path else value
