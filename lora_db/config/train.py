"""Training configuration: one dataclass holds every option, its default, its help text and its checks.

The CLI options and the keys of a `--config FILE.toml` are the field names (dashes or underscores); the
command line wins over the file, the file over the defaults. Checks that need no model run in
`__post_init__`, so an impossible combination fails before anything is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from lora_db.config.dataset import Concept, check_concepts, read_dataset_config
from lora_db.config.fields import (
    MAX_SEED,
    MixedPrecision,
    Quantization,
    check_numbers,
    check_text,
    cli_flag,
    from_sources,
    option,
    read_toml,
    to_dict,
)
from lora_db.errors import LoraDBError

HUB_REPO = re.compile(r"(?:[\w.-]+/)?[\w.-]{1,96}")

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# tiny-world's recommended setting (benchmarks/quality.py's lora-r8-mlp-long; docs/tiny-world.md): what `lora-db demo`
# trains. Its rate suits the 128-wide toy, not the real model, whose default stays 1e-4.
TINY_WORLD_RECOMMENDED = MappingProxyType(  # read-only: every user shares it
    {
        "rank": 8,
        "target_modules": (*UNET_ATTENTION_TARGETS, *UNET_FEEDFORWARD_TARGETS),
        "max_train_steps": 1200,
        "learning_rate": 2e-3,
    }
)

Method = Literal["lora", "full"]
AdapterType = Literal["lora", "lokr", "loha"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion8bit", "schedulefree-adamw"]
AttentionBackend = Literal["sdpa", "xformers"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Tracker = Literal["tensorboard", "wandb", "none"]

PATH_FIELDS = ("instance_dir", "output_dir", "class_dir", "dataset_config", "cache_latents_dir")

DEFAULT_LEARNING_RATE = 1e-4
# Each library's convention: Prodigy's lr multiplies the step size it estimates (1.0 as its authors use it); Lion's
# sign updates are larger than Adam's, so its authors take a 3-10x smaller rate.
OPTIMIZER_LEARNING_RATES = {"prodigy": 1.0, "lion8bit": 3e-5}
DEFAULT_EMA_DECAY = 0.995  # SimpleTuner's default: an average over about the last 1 / (1 - 0.995) = 200 steps


@dataclass
class TrainConfig:
    # What `lora-db train --help` shows first; every other option is in its group's panel (`--help-all`).
    MAIN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "model", "instance_dir", "instance_prompt", "output_dir", "class_prompt", "class_dir", "rank",
        "learning_rate", "max_train_steps", "mixed_precision", "gradient_checkpointing", "optimizer", "cache_latents",
        "quantize_base", "validation_prompt", "checkpointing_steps", "resume_from_checkpoint", "overwrite",
    )  # fmt: skip

    # -- model and data ---------------------------------------------------------------------------------------
    model: str = option(
        "thu-ml/unidiffuser-v1",
        "Hub id or local diffusers folder of a UniDiffuser pipeline; `tiny` builds a small random one offline.",
        "Model and data",
    )
    instance_dir: Path | None = option(None, "Folder of photos of the subject (jpg, png, webp, bmp).", "Model and data")
    instance_prompt: str | None = option(
        None,
        'Prompt naming the subject, e.g. "a photo of sks dog". NAME.txt beside an image overrides it.',
        "Model and data",
    )
    dataset_config: Path | None = option(
        None,
        "TOML file of several concepts ([[concept]]: folder, instance_prompt or caption files, repeats, class_dir "
        "and class_prompt, weight) instead of --instance-dir/--instance-prompt/--class-dir/--class-prompt.",
        "Model and data",
    )
    output_dir: Path | None = option(
        None, "Where the adapter, metrics, checkpoints and validation images go.", "Model and data"
    )
    resolution: int | None = option(
        None,
        "Training image size in pixels; defaults to the model's native size (512 for unidiffuser-v1).",
        "Model and data",
        minimum=8,
    )
    random_crop: bool = option(False, "Random instead of center crop (augmentation).", "Model and data")
    random_flip: bool = option(False, "Random horizontal flips (augmentation).", "Model and data")
    skip_bad_images: bool = option(
        False, "Skip unreadable images with a warning instead of stopping.", "Model and data"
    )
    strict: bool = option(
        False,
        "Stop instead of warning when a caption or prompt is longer than the text encoder reads (77 tokens).",
        "Model and data",
    )
    overwrite: bool = option(
        False,
        "Start afresh in an output folder that holds an earlier run (its lora-db files are replaced).",
        "Model and data",
    )
    # -- prior preservation ---------------------------------------------------------------------------------------
    class_prompt: str | None = option(
        None,
        'Prompt of the subject\'s class, e.g. "a photo of a dog"; turns on prior preservation.',
        "Prior preservation",
    )
    class_dir: Path | None = option(
        None,
        "Folder of class images; missing ones are generated with the base model and kept.",
        "Prior preservation",
    )
    num_class_images: int = option(
        100, "Class images to use (generated if the folder holds fewer).", "Prior preservation", minimum=1
    )
    prior_loss_weight: float = option(
        1.0, "Weight of the class loss: loss = instance + weight x class.", "Prior preservation", minimum=0
    )
    class_generation_steps: int = option(
        25, "Denoising steps per generated class image.", "Prior preservation", minimum=1
    )
    class_generation_batch_size: int = option(4, "Class images generated per batch.", "Prior preservation", minimum=1)
    # -- what is trained -----------------------------------------------------------------------------------------
    method: Method = option(
        "lora",
        "`lora` trains adapters; `full` trains every U-ViT weight (the baseline benchmarks compare).",
        "Adapter",
    )
    rank: int = option(4, "LoRA rank r: adapter size grows linearly with it.", "Adapter", minimum=1)
    adapter_type: AdapterType = option(
        "lora",
        "`lokr` (a Kronecker product of a small and a low-rank large factor) or `loha` (a Hadamard product of two "
        "rank-r products), peft's LyCORIS adapters, instead of LoRA; --rank and --alpha mean the same.",
        "Adapter",
    )
    alpha: float | None = option(
        None, "LoRA alpha; the update is scaled by alpha / rank. Defaults to rank.", "Adapter", above=0, maximum=1e4
    )
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch input.", "Adapter", minimum=0, below=1)
    target_modules: list[str] = option(
        lambda: list(UNET_ATTENTION_TARGETS),
        "U-ViT layers that get LoRA (suffixes of module names); add ff.net.0.proj and ff.net.2 for the MLPs.",
        "Adapter",
    )
    train_text_encoder: bool = option(
        False, "Also put LoRA into the CLIP text encoder (q/k/v/out projections).", "Adapter"
    )
    text_encoder_learning_rate: float | None = option(
        None, "Learning rate of the text-encoder LoRA; defaults to --learning-rate.", "Adapter", above=0
    )
    uncond_prob: float = option(
        0.0,
        "Fraction of examples trained as unconditional (text = noise at t=T) so guidance keeps working.",
        "Adapter",
        minimum=0,
        maximum=1,
    )
    use_dora: bool = option(
        False, "DoRA (peft): a trained magnitude per output feature on top of LoRA's direction update.", "Adapter"
    )
    use_rslora: bool = option(
        False, "rsLoRA (peft): scale the update by alpha / sqrt(rank) instead of alpha / rank.", "Adapter"
    )
    loraplus_lr_ratio: float | None = option(
        None,
        "LoRA+ (peft's create_loraplus_optimizer): the B matrices learn at this many times the learning rate, e.g. 16.",
        "Adapter",
        above=0,
    )
    init_adapter: Path | None = option(
        None,
        "Start from this adapter file's weights (rank, alpha, targets and variant must match the options).",
        "Adapter",
    )
    train_token: str | None = option(
        None,
        "Pivotal tuning: make this identifier (e.g. sks) a new CLIP token whose input embedding trains with the "
        "LoRA and is saved in the adapter; needs --init-token.",
        "Adapter",
    )
    init_token: str | None = option(
        None, "The word whose embedding --train-token starts from, e.g. toy (the subject's class).", "Adapter"
    )
    # -- optimisation ---------------------------------------------------------------------------------------------
    learning_rate: float | None = option(
        None,
        f"Peak learning rate; defaults to {DEFAULT_LEARNING_RATE:g}, or the --optimizer's convention: "
        + ", ".join(f"{rate:g} for {name}" for name, rate in OPTIMIZER_LEARNING_RATES.items())
        + ".",
        "Optimisation",
        above=0,
    )
    lr_scheduler: LRScheduler = option("constant", "Learning-rate schedule after warm-up.", "Optimisation")
    lr_warmup_steps: int = option(0, "Linear warm-up steps.", "Optimisation", minimum=0)
    max_train_steps: int = option(400, "Optimizer steps to train.", "Optimisation", minimum=1)
    train_batch_size: int = option(
        1, "Instance images per step and process (class images add as many).", "Optimisation", minimum=1
    )
    gradient_accumulation_steps: int = option(1, "Micro-batches summed per optimizer step.", "Optimisation", minimum=1)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables it).", "Optimisation", minimum=0)
    weight_decay: float = option(1e-2, "Decoupled weight decay of the optimizer.", "Optimisation", minimum=0)
    seed: int = option(
        0,
        "Seed of data order, augmentation, noise and LoRA init: same seed, same run.",
        "Optimisation",
        minimum=0,
        maximum=MAX_SEED,
    )
    snr_gamma: float | None = option(
        None,
        "Min-SNR weighting (diffusers' compute_snr): each example's loss x min(SNR, gamma) / SNR; 5 is usual.",
        "Optimisation",
        above=0,
    )
    noise_offset: float = option(
        0.0,
        "Add this x one Gaussian per image and latent channel to the VAE-latent noise (darker / brighter images).",
        "Optimisation",
        minimum=0,
    )
    use_ema: bool = option(
        False,
        "Keep an exponential moving average of the trained weights: validation samples it and the adapter is it "
        "(the trained weights beside it, adapter-raw.safetensors); one fp32 copy of the LoRA weights more.",
        "Optimisation",
    )
    ema_decay: float | None = option(
        None,
        f"--use-ema's decay per step, defaults to {DEFAULT_EMA_DECAY:g} (about the last 200 steps); the first steps "
        "use (1 + step) / (10 + step) when that is smaller (diffusers' EMAModel rule).",
        "Optimisation",
        above=0,
        below=1,
    )
    # -- memory ---------------------------------------------------------------------------------------------------
    gradient_checkpointing: bool = option(
        False,
        "Recompute each transformer block in backward: far fewer stored activations, ~30% slower steps.",
        "Memory",
    )
    optimizer: Optimizer = option(
        "adamw",
        "`adamw8bit` (bitsandbytes) stores Adam's two moments in 8 bits: 4x less optimizer memory; `prodigy` "
        "(prodigyopt) estimates its own step size (lr 1.0); `adafactor` (transformers) factors the second moment; "
        "`lion8bit` (bitsandbytes) keeps one 8-bit moment; `schedulefree-adamw` (schedulefree) needs no schedule "
        "and samples and saves its averaged weights.",
        "Memory",
    )
    mixed_precision: MixedPrecision = option(
        "no",
        "Frozen weights stored in fp16/bf16 and compute under autocast; trainable weights stay fp32.",
        "Memory",
    )
    attention: AttentionBackend = option(
        "sdpa", "`xformers` memory-efficient attention (CUDA only) instead of PyTorch SDPA.", "Memory"
    )
    cache_latents: bool = option(
        False,
        "Encode images (VAE latents, CLIP embeddings) once, then drop the VAE and image encoder.",
        "Memory",
    )
    cache_latents_dir: Path | None = option(
        None,
        "Like --cache-latents, but the encodings live in this folder (keyed by the VAE, image encoder and each "
        "file's digest, reused by later runs) and are read a batch at a time: memory flat in the number of images.",
        "Memory",
    )
    quantize_base: Quantization = option(
        "none",
        "Store the frozen U-ViT (and a trained text encoder) in 4-bit NF4 or 8-bit (bitsandbytes, QLoRA): "
        "nf4 ~3.5x less weight memory than bf16; LoRA stays fp32.",
        "Memory",
    )
    # -- speed ----------------------------------------------------------------------------------------------------
    compile: bool = option(
        False,
        "torch.compile each U-ViT block (compiled before step 1, its time logged apart); eager with one warning "
        "where torch cannot compile the configuration (int8 base with checkpointing). Not recommended on a CPU at "
        "the real size: with bf16 and checkpointing it made the step slower (0.92x, after 3 min of compiling).",
        "Speed",
    )
    # -- checkpoints ----------------------------------------------------------------------------------------------
    checkpointing_steps: int = option(
        0, "Save a resumable checkpoint every N steps (0: never).", "Checkpoints", minimum=0
    )
    checkpoints_total_limit: int | None = option(None, "Keep only the newest K checkpoints.", "Checkpoints", minimum=1)
    resume_from_checkpoint: str | None = option(
        None,
        "`latest` or a checkpoint folder to resume from: weights, optimizer, scheduler, RNG and step.",
        "Checkpoints",
    )
    # -- validation -----------------------------------------------------------------------------------------------
    validation_prompt: str | None = option(
        None, "Prompt sampled during training into OUTPUT_DIR/validation/.", "Validation"
    )
    validation_steps: int = option(
        100, "Sample validation images every N steps (and at the end).", "Validation", minimum=1
    )
    num_validation_images: int = option(2, "Images per validation.", "Validation", minimum=1)
    validation_inference_steps: int = option(25, "Denoising steps per validation image.", "Validation", minimum=1)
    validation_guidance_scale: float = option(8.0, "Guidance scale of validation images.", "Validation", minimum=0)
    eval_steps: int = option(
        0,
        "Every N steps (and at the end) score the model with `lora-db eval`'s metrics on a few seeds: CLIP-I "
        "against the instance photos, diversity and, with --class-prompt, prior similarity; into metrics.jsonl.",
        "Validation",
        minimum=0,
    )
    num_eval_images: int = option(
        2,
        "Samples per prompt for --eval-steps (seeds seed..seed+N-1; at least 2, diversity compares them); "
        "steps and guidance as validation.",
        "Validation",
        minimum=2,
    )
    keep_sampling_encoders: bool = option(
        False,
        "Keep the VAE, image and text encoders on the device between validation and eval samplings instead of "
        "moving them off and back each time: faster sampling, their weights stay in device memory.",
        "Validation",
    )
    # -- trackers and the hub -------------------------------------------------------------------------------------
    report_to: Tracker | None = option(
        None,
        "Where metrics, hyperparameters and validation images go: tensorboard (the default when installed), "
        "wandb or none.",
        "Outputs",
    )
    push_to_hub: str | None = option(
        None, "Upload the run folder (adapter, model card, metrics) to this Hugging Face repo at the end.", "Outputs"
    )
    hub_private: bool = option(False, "Create the --push-to-hub repo as private.", "Outputs")

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        if self.learning_rate is None:
            self.learning_rate = OPTIMIZER_LEARNING_RATES.get(self.optimizer, DEFAULT_LEARNING_RATE)
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise LoraDBError(f'{cli_flag(name)} is empty; pass a folder ("." for the current one)')
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        check_text(self)
        check_numbers(self)
        self._check()

    def _check(self) -> None:
        def fail(message: str) -> None:
            raise LoraDBError(message)

        for name in ("model", "instance_prompt", "class_prompt", "validation_prompt", "resume_from_checkpoint"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                fail(f"{cli_flag(name)} is empty; give it a value or leave the option out")
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
        if self.cache_latents_dir is not None and (self.random_crop or self.random_flip):
            fail(
                "--cache-latents-dir encodes each image once, which would freeze --random-crop/--random-flip: "
                "drop one of them"
            )
        if self.cache_latents_dir is not None and self.cache_latents:
            fail("--cache-latents keeps the encodings in memory, --cache-latents-dir on disk: choose one")
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
        self._check_concepts(fail)
        if self.adapter_type != "lora":
            lora_only = ["use_dora", "use_rslora", "loraplus_lr_ratio"]
            used = [cli_flag(n) for n in lora_only if getattr(self, n) not in (None, False)]
            used += ["--lora-dropout"] if self.lora_dropout > 0 else []
            if used:
                fail(f"{used[0]} is a LoRA option: drop it, or train with --adapter-type lora")
            if self.quantize_base != "none":
                fail(
                    f"--quantize-base {self.quantize_base}: peft's LoKr and LoHa layers do not run on a quantized "
                    "base; drop it, or train with --adapter-type lora (QLoRA)"
                )
        if self.method == "full":
            lora_only = ["use_dora", "use_rslora", "loraplus_lr_ratio", "init_adapter", "train_token"]
            if self.adapter_type != "lora":
                fail(f"--adapter-type {self.adapter_type} is an adapter: with --method full every U-ViT weight trains")
            used = [f"{cli_flag(n)}" for n in lora_only if getattr(self, n) not in (None, False)]
            if used:
                fail(f"{used[0]} is a LoRA option: drop it, or train with --method lora")
        if isinstance(self.init_adapter, str):
            if not self.init_adapter.strip():
                fail("--init-adapter is empty; give an adapter file (.safetensors) or exported peft folder")
            self.init_adapter = Path(self.init_adapter)
        if self.text_encoder_learning_rate is not None and not self.trains_text_encoder:
            fail("--text-encoder-learning-rate sets the text-encoder LoRA's rate: add --train-text-encoder, or drop it")
        if (self.train_token is None) != (self.init_token is None):
            given, missing = (
                ("--train-token", "--init-token") if self.init_token is None else ("--init-token", "--train-token")
            )
            fail(f"{given} needs {missing} too (pivotal tuning starts the new token from a known word), or drop it")
        for name in ("train_token", "init_token"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(ch.isspace() for ch in value)):
                fail(f"{cli_flag(name)} {value!r} must be one word")
        self._check_optimizer(fail)
        if self.hub_private and not self.push_to_hub:
            fail("--hub-private goes with --push-to-hub REPO (the repository to create)")
        if self.push_to_hub is not None and not HUB_REPO.fullmatch(self.push_to_hub):
            fail(f"--push-to-hub {self.push_to_hub!r}: give a repository id such as your-name/sks-dog-lora")

    def _check_optimizer(self, fail) -> None:
        """What the chosen optimizer (and --use-ema) cannot honour."""
        if self.ema_decay is not None and not self.use_ema:
            fail("--ema-decay sets --use-ema's decay: add --use-ema, or drop it")
        if self.use_ema and self.ema_decay is None:
            self.ema_decay = DEFAULT_EMA_DECAY
        if self.use_ema and self.method == "full":
            fail("--use-ema averages LoRA weights; with --method full drop it (or train with --method lora)")
        if self.use_ema and self.optimizer == "schedulefree-adamw":
            fail(
                "--use-ema: schedule-free AdamW already samples and saves an average of its weights; drop --use-ema, "
                "or choose another --optimizer"
            )
        if self.optimizer == "schedulefree-adamw" and self.lr_scheduler != "constant":
            fail(
                f"--optimizer schedulefree-adamw replaces the learning-rate schedule: drop --lr-scheduler "
                f"{self.lr_scheduler} (its warm-up is --lr-warmup-steps)"
            )
        if self.optimizer != "prodigy":
            return
        if self.loraplus_lr_ratio is not None:
            fail(
                "--loraplus-lr-ratio gives the B matrices a rate of their own, and Prodigy estimates one step size "
                "for every weight: drop it, or choose another --optimizer"
            )
        if self.text_encoder_learning_rate not in (None, self.learning_rate):
            fail(
                "--text-encoder-learning-rate: Prodigy estimates one step size for every weight, so both rates must "
                "be equal; drop it, or choose another --optimizer"
            )

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def with_prior_preservation(self) -> bool:
        return any(concept.class_prompt is not None for concept in self.concepts())

    @property
    def encodes_once(self) -> bool:
        """Whether images are encoded once before training (in memory or on disk), so the VAE and image encoder
        can go."""
        return self.cache_latents or self.cache_latents_dir is not None

    @property
    def trains_text_encoder(self) -> bool:
        """Whether anything of the text encoder trains (its LoRA, or pivotal tuning's token embedding)."""
        return self.train_text_encoder or self.train_token is not None

    def concepts(self) -> list[Concept]:
        """What is trained on: the --dataset-config file's concepts, or the one the single-concept options give."""
        if self.dataset_config is not None:
            return read_dataset_config(self.dataset_config)
        return [Concept(self.instance_dir, self.instance_prompt, 1, self.class_dir, self.class_prompt)]

    @property
    def run_input_fields(self) -> tuple[str, ...]:
        """The options a training run needs but a dry estimate does not (a dataset config names the folders)."""
        return ("output_dir",) if self.dataset_config is not None else ("instance_dir", "instance_prompt", "output_dir")

    def _check_concepts(self, fail) -> None:
        if self.dataset_config is None:
            return
        single = ["instance_dir", "instance_prompt", "class_dir", "class_prompt"]
        given = [cli_flag(name) for name in single if getattr(self, name) is not None]
        if given:
            fail(f"--dataset-config names each concept's folder and prompts: drop {given[0]}, or the file")
        check_concepts(self.concepts(), f"--dataset-config {self.dataset_config}")

    def missing_run_inputs(self) -> list[str]:
        """The flags a training run needs but a dry estimate does not, of those not given."""
        return [cli_flag(name) for name in self.run_input_fields if not getattr(self, name)]

    def require_run_inputs(self) -> None:
        missing = self.missing_run_inputs()
        if missing:
            raise LoraDBError(f"{missing[0]} is required for training")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_sources(cls, config_file: Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, then the TOML file's keys, then the non-None overrides (the command line)."""
        return from_sources(cls, config_file, **overrides)


def load_toml(path: Path) -> dict[str, Any]:
    """A `--config FILE.toml` of training options, every key and type checked against TrainConfig."""
    return read_toml(path, TrainConfig)
