"""Training configuration: one dataclass holds every option, its default, its help text and its checks.

The CLI options and the keys of a `--config FILE.toml` are the field names (dashes or underscores); the
command line wins over the file, the file over the defaults. Checks that need no model run in
`__post_init__`, so an impossible combination fails before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import LoraDBError

HUB_REPO = re.compile(r"(?:[\w.-]+/)?[\w.-]{1,96}")

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

Method = Literal["lora", "full"]
Optimizer = Literal["adamw", "adamw8bit"]
MixedPrecision = Literal["no", "fp16", "bf16"]
AttentionBackend = Literal["sdpa", "xformers"]
Quantization = Literal["none", "nf4", "int8"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Tracker = Literal["tensorboard", "wandb", "none"]

MAX_SEED = 2**32 - 1  # numpy and the data order take 32-bit seeds
PATH_FIELDS = ("instance_dir", "output_dir", "class_dir")


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
        minimum=8,
    )
    random_crop: bool = _opt(False, "Random instead of center crop (augmentation).", "Model and data")
    random_flip: bool = _opt(False, "Random horizontal flips (augmentation).", "Model and data")
    skip_bad_images: bool = _opt(False, "Skip unreadable images with a warning instead of stopping.", "Model and data")
    strict: bool = _opt(
        False,
        "Stop instead of warning when a caption or prompt is longer than the text encoder reads (77 tokens).",
        "Model and data",
    )
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
        100, "Class images to use (generated if the folder holds fewer).", "Prior preservation", minimum=1
    )
    prior_loss_weight: float = _opt(
        1.0, "Weight of the class loss: loss = instance + weight x class.", "Prior preservation", minimum=0
    )
    class_generation_steps: int = _opt(
        25, "Denoising steps per generated class image.", "Prior preservation", minimum=1
    )
    class_generation_batch_size: int = _opt(4, "Class images generated per batch.", "Prior preservation", minimum=1)
    # -- what is trained -----------------------------------------------------------------------------------------
    method: Method = _opt(
        "lora",
        "`lora` trains adapters; `full` trains every U-ViT weight (the baseline benchmarks compare).",
        "Adapter",
    )
    rank: int = _opt(4, "LoRA rank r: adapter size grows linearly with it.", "Adapter", minimum=1)
    alpha: float | None = _opt(
        None, "LoRA alpha; the update is scaled by alpha / rank. Defaults to rank.", "Adapter", above=0
    )
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch input.", "Adapter", minimum=0, below=1)
    target_modules: list[str] = _opt(
        lambda: list(UNET_ATTENTION_TARGETS),
        "U-ViT layers that get LoRA (suffixes of module names); add ff.net.0.proj and ff.net.2 for the MLPs.",
        "Adapter",
    )
    train_text_encoder: bool = _opt(
        False, "Also put LoRA into the CLIP text encoder (q/k/v/out projections).", "Adapter"
    )
    text_encoder_learning_rate: float | None = _opt(
        None, "Learning rate of the text-encoder LoRA; defaults to --learning-rate.", "Adapter", above=0
    )
    uncond_prob: float = _opt(
        0.0,
        "Fraction of examples trained as unconditional (text = noise at t=T) so guidance keeps working.",
        "Adapter",
        minimum=0,
        maximum=1,
    )
    use_dora: bool = _opt(
        False, "DoRA (peft): a trained magnitude per output feature on top of LoRA's direction update.", "Adapter"
    )
    use_rslora: bool = _opt(
        False, "rsLoRA (peft): scale the update by alpha / sqrt(rank) instead of alpha / rank.", "Adapter"
    )
    loraplus_lr_ratio: float | None = _opt(
        None,
        "LoRA+ (peft's create_loraplus_optimizer): the B matrices learn at this many times the learning rate, e.g. 16.",
        "Adapter",
        above=0,
    )
    init_adapter: Path | None = _opt(
        None,
        "Start from this adapter file's weights (rank, alpha, targets and variant must match the options).",
        "Adapter",
    )
    # -- optimisation ---------------------------------------------------------------------------------------------
    learning_rate: float = _opt(1e-4, "Peak learning rate.", "Optimisation", above=0)
    lr_scheduler: LRScheduler = _opt("constant", "Learning-rate schedule after warm-up.", "Optimisation")
    lr_warmup_steps: int = _opt(0, "Linear warm-up steps.", "Optimisation", minimum=0)
    max_train_steps: int = _opt(400, "Optimizer steps to train.", "Optimisation", minimum=1)
    train_batch_size: int = _opt(
        1, "Instance images per step and process (class images add as many).", "Optimisation", minimum=1
    )
    gradient_accumulation_steps: int = _opt(1, "Micro-batches summed per optimizer step.", "Optimisation", minimum=1)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables it).", "Optimisation", minimum=0)
    weight_decay: float = _opt(1e-2, "AdamW weight decay.", "Optimisation", minimum=0)
    seed: int = _opt(
        0,
        "Seed of data order, augmentation, noise and LoRA init: same seed, same run.",
        "Optimisation",
        minimum=0,
        maximum=MAX_SEED,
    )
    snr_gamma: float | None = _opt(
        None,
        "Min-SNR weighting (diffusers' compute_snr): each example's loss x min(SNR, gamma) / SNR; 5 is usual.",
        "Optimisation",
        above=0,
    )
    noise_offset: float = _opt(
        0.0,
        "Add this x one Gaussian per image and latent channel to the VAE-latent noise (darker / brighter images).",
        "Optimisation",
        minimum=0,
    )
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
    checkpointing_steps: int = _opt(
        0, "Save a resumable checkpoint every N steps (0: never).", "Checkpoints", minimum=0
    )
    checkpoints_total_limit: int | None = _opt(None, "Keep only the newest K checkpoints.", "Checkpoints", minimum=1)
    resume_from_checkpoint: str | None = _opt(
        None,
        "`latest` or a checkpoint folder to resume from: weights, optimizer, scheduler, RNG and step.",
        "Checkpoints",
    )
    # -- validation -----------------------------------------------------------------------------------------------
    validation_prompt: str | None = _opt(
        None, "Prompt sampled during training into OUTPUT_DIR/validation/.", "Validation"
    )
    validation_steps: int = _opt(
        100, "Sample validation images every N steps (and at the end).", "Validation", minimum=1
    )
    num_validation_images: int = _opt(2, "Images per validation.", "Validation", minimum=1)
    validation_inference_steps: int = _opt(25, "Denoising steps per validation image.", "Validation", minimum=1)
    validation_guidance_scale: float = _opt(8.0, "Guidance scale of validation images.", "Validation", minimum=0)
    eval_steps: int = _opt(
        0,
        "Every N steps (and at the end) score the model with `lora-db eval`'s metrics on a few seeds: CLIP-I "
        "against the instance photos, diversity and, with --class-prompt, prior similarity; into metrics.jsonl.",
        "Validation",
        minimum=0,
    )
    num_eval_images: int = _opt(
        2,
        "Samples per prompt for --eval-steps (seeds seed..seed+N-1; at least 2, diversity compares them); "
        "steps and guidance as validation.",
        "Validation",
        minimum=2,
    )
    # -- trackers and the hub -------------------------------------------------------------------------------------
    report_to: Tracker | None = _opt(
        None,
        "Where metrics, hyperparameters and validation images go: tensorboard (the default when installed), "
        "wandb or none.",
        "Outputs",
    )
    push_to_hub: str | None = _opt(
        None, "Upload the run folder (adapter, model card, metrics) to this Hugging Face repo at the end.", "Outputs"
    )
    hub_private: bool = _opt(False, "Create the --push-to-hub repo as private.", "Outputs")

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise LoraDBError(f'--{_flag(name)} is empty; pass a folder ("." for the current one)')
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        check_numbers(self)
        self._check()

    def _check(self) -> None:
        def fail(message: str) -> None:
            raise LoraDBError(message)

        for name in ("model", "instance_prompt", "class_prompt", "validation_prompt", "resume_from_checkpoint"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                fail(f"--{_flag(name)} is empty; give it a value or leave the option out")
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
        if self.instance_dir is not None and self.class_dir is not None:
            instance, classes = self.instance_dir.resolve(), self.class_dir.resolve()
            if instance == classes or instance in classes.parents or classes in instance.parents:
                fail(
                    f"--class-dir {self.class_dir} and --instance-dir {self.instance_dir} overlap: generated class "
                    "images would mix with the subject's photos; give the class images a folder of their own"
                )
        self._check_extras(fail)

    def _check_extras(self, fail) -> None:
        """Adapter variants, loss options, trackers and the hub."""
        if self.method == "full":
            lora_only = ["use_dora", "use_rslora", "loraplus_lr_ratio", "init_adapter"]
            used = [f"--{_flag(n)}" for n in lora_only if getattr(self, n) not in (None, False)]
            if used:
                fail(f"{used[0]} is a LoRA option: drop it, or train with --method lora")
        if isinstance(self.init_adapter, str):
            if not self.init_adapter.strip():
                fail("--init-adapter is empty; give an adapter file (.safetensors) or exported peft folder")
            self.init_adapter = Path(self.init_adapter)
        if self.hub_private and not self.push_to_hub:
            fail("--hub-private goes with --push-to-hub REPO (the repository to create)")
        if self.push_to_hub is not None and not HUB_REPO.fullmatch(self.push_to_hub):
            fail(f"--push-to-hub {self.push_to_hub!r}: give a repository id such as your-name/sks-dog-lora")

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


def check_numbers(options: Any) -> None:
    """Every numeric field of a config dataclass: a number, finite, and inside the range its metadata declares.

    Range keys: `minimum` / `maximum` (inclusive), `above` / `below` (exclusive). None stands for the default.
    """
    hints = field_types(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        base, _, _ = option_type(hints[f.name])
        if value is None or base not in (int, float):
            continue
        flag = "--" + _flag(f.metadata.get("flag", f.name))
        if isinstance(value, bool) or not isinstance(value, int | float) or (base is int and isinstance(value, float)):
            raise LoraDBError(f"{flag} must be {'an integer' if base is int else 'a number'} (got {value!r})")
        low = f.metadata.get("minimum", f.metadata.get("above"))
        high = f.metadata.get("maximum", f.metadata.get("below"))
        inside = math.isfinite(value) and (
            (low is None or value > low or (value == low and "minimum" in f.metadata))
            and (high is None or value < high or (value == high and "maximum" in f.metadata))
        )
        if not inside:
            raise LoraDBError(f"{flag} must be {_range_text(f.metadata, base)} (got {value})")


def _range_text(meta: Mapping[str, Any], base: type) -> str:
    low = meta.get("minimum", meta.get("above"))
    high = meta.get("maximum", meta.get("below"))
    finite = "a finite number" if base is float else "an integer"
    if low is not None and high is not None:
        return f"in {'[' if 'minimum' in meta else '('}{low}, {high}{']' if 'maximum' in meta else ')'}"
    if low == 0 and "above" in meta:
        return f"a positive {finite.removeprefix('a ').removeprefix('an ')}"
    if low is not None:
        return f"at least {low}" if base is int else f"{finite} of at least {low}"
    return finite


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
    except IsADirectoryError:
        raise LoraDBError(f"--config {path}: is a folder; pass a TOML file") from None
    except OSError as err:
        raise LoraDBError(f"--config {path}: cannot read it ({err.strerror or err})") from None
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
    return value  # paths stay text here: __post_init__ refuses an empty one before it could become "."
