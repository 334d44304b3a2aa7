"""What `lora-db sample`, `merge`, `info`, `export` and `demo-images` take, and the `--adapter FILE[:WEIGHT]` value.

Kept free of torch so that the CLI builds its options (and prints --help and usage errors) without importing it;
lora_db.adapters (sample, merge, info, export) and lora_db.synthetic (demo images) hold the code that runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lora_db.config.fields import MAX_SEED, MixedPrecision, Quantization, check_numbers, check_text, option
from lora_db.config.train import TINY_WORLD_RECOMMENDED
from lora_db.errors import LoraDBError


@dataclass(frozen=True)
class WeightedAdapter:
    """One `--adapter FILE[:WEIGHT]` value; `path` None stands for the base model alone (`none`)."""

    path: Path | None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> WeightedAdapter:
        if text.strip().lower() == "none":
            return cls(None)
        head, sep, tail = text.rpartition(":")
        # A colon followed by a path separator is part of the path, as is any colon of a file that exists.
        if not sep or "/" in tail or "\\" in tail or Path(text).exists():
            return cls(Path(text))
        try:
            weight = float(tail)
        except ValueError:
            raise LoraDBError(f"--adapter {text}: the weight after ':' must be a number, as in {head}:0.7") from None
        if not math.isfinite(weight):
            raise LoraDBError(f"--adapter {text}: the weight must be a finite number, not {tail}")
        return cls(Path(head), weight)

    def __str__(self) -> str:
        if self.path is None:
            return "none"
        return str(self.path) if self.weight == 1.0 else f"{self.path}:{self.weight:g}"


@dataclass
class SampleConfig:
    # What `lora-db sample --help` shows first; `--help-all` shows the others too.
    MAIN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "out", "model", "adapters", "prompts", "num_images", "seed", "num_inference_steps", "guidance_scale",
        "overwrite",
    )  # fmt: skip

    out: Path = option(
        None, "Folder to write grid.png and one PNG per image (or captions.txt / .json) into.", required=True
    )
    model: str | None = option(
        None, "Base model (hub id, folder, `tiny`); defaults to the one the adapters were trained on."
    )
    adapters: list[str] = option(
        list,
        "Adapter file, optionally with a weight (FILE:0.7); repeatable; `none` is the base model alone.",
        flag="adapter",
    )
    prompts: list[str] = option(list, "Prompt to sample (t2i); repeatable, one grid column set each.", flag="prompt")
    prompts_file: Path | None = option(None, "Text file of prompts, one a line (blank lines skipped).")
    num_images: int = option(1, "Images (or captions) per prompt and adapter; image i uses seed + i.", minimum=1)
    seed: int = option(0, "Seed of the first image: same seed and adapter, same image.", minimum=0, maximum=MAX_SEED)
    num_inference_steps: int = option(25, "Denoising steps per sample.", minimum=1)
    guidance_scale: float = option(8.0, "Classifier-free guidance scale.")
    height: int | None = option(None, "Image height in pixels: the model's native size (its only one).", minimum=8)
    width: int | None = option(None, "Image width in pixels: the model's native size (its only one).", minimum=8)
    mixed_precision: MixedPrecision = option("no", "Load the weights in fp16 (GPU) or bf16.")
    quantize_base: Quantization = option(
        "none", "Sample on a 4-bit NF4 or 8-bit base (bitsandbytes), as `lora-db train --quantize-base` trains."
    )
    mode: Literal["t2i", "i2t"] = option("t2i", "t2i: images from prompts; i2t: captions of --image.")
    image: Path | None = option(None, "Image to caption in i2t mode.")
    combine: bool = option(False, "Apply all adapters at once, as their weighted sum (one row), instead of one each.")
    overwrite: bool = option(False, "Replace --out if it holds an earlier `lora-db sample` output.")

    def __post_init__(self) -> None:
        if self.out is None or not str(self.out).strip():
            raise LoraDBError("--out is required: the folder to write the samples into")
        check_text(self)
        self.out = Path(self.out)
        self.choices = [WeightedAdapter.parse(text) for text in self.adapters] or [WeightedAdapter(None)]
        check_numbers(self)
        if self.mode == "i2t" and (self.prompts or self.prompts_file):
            raise LoraDBError("--prompt and --prompts-file are for --mode t2i; i2t captions --image")
        if self.mode == "t2i" and not (self.prompts or self.prompts_file):
            raise LoraDBError("--prompt (or --prompts-file) is required in t2i mode")
        if (self.mode == "i2t") != (self.image is not None):
            raise LoraDBError("--image goes with --mode i2t, and i2t needs an --image to caption")

    def read_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file is not None:
            try:
                text = Path(self.prompts_file).read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                raise LoraDBError(f"--prompts-file {self.prompts_file}: cannot read it as UTF-8 text ({err})") from None
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise LoraDBError(f"--prompts-file {self.prompts_file} holds no prompt")
        return prompts


@dataclass
class MergeConfig:
    adapters: list[str] = option(
        list, "Adapter file, optionally with a weight (FILE:0.6); repeatable.", flag="adapter", required=True
    )
    out: Path | None = option(None, "Folder to write the merged diffusers pipeline into.")
    into_adapter: Path | None = option(None, "Instead of a pipeline, write the adapters' weighted sum as one adapter.")
    model: str | None = option(
        None, "Base model (hub id, folder, `tiny`); defaults to the one the adapters were trained on."
    )
    rank: int | None = option(
        None, "With --into-adapter: SVD to this rank instead of exact rank concatenation.", minimum=1
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = option("fp32", "dtype of the merged pipeline's weights.")
    dequantized_base: bool = option(
        False,
        "For adapters trained with --quantize-base: fold into the base as training saw it (quantized as then, "
        "stored back in full precision), so the merged model computes what the trained one did.",
    )
    overwrite: bool = option(False, "Replace an output lora-db wrote before.")

    def __post_init__(self) -> None:
        check_text(self)
        self.choices = [WeightedAdapter.parse(text) for text in self.adapters]
        if not self.choices:
            raise LoraDBError("--adapter is required: name at least one adapter file to merge")
        if any(c.path is None for c in self.choices):
            raise LoraDBError("--adapter none: merge folds adapters into the base; leave `none` out")
        if (self.out is None) == (self.into_adapter is None):
            raise LoraDBError("give one of --out DIR (a merged pipeline) or --into-adapter FILE (one adapter)")
        if self.rank is not None and self.into_adapter is None:
            raise LoraDBError("--rank goes with --into-adapter (an SVD of the combined adapter)")
        if self.dequantized_base and self.into_adapter is not None:
            raise LoraDBError("--dequantized-base goes with --out (it changes the base, which an adapter file lacks)")
        check_numbers(self)
        for name in ("out", "into_adapter"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise LoraDBError(f"--{name.replace('_', '-')} is empty; name a folder or file")
        if self.into_adapter is not None and Path(self.into_adapter).suffix != ".safetensors":
            raise LoraDBError(f"--into-adapter {self.into_adapter}: adapter files end in .safetensors")
        self.out = Path(self.out) if self.out is not None else None
        self.into_adapter = Path(self.into_adapter) if self.into_adapter is not None else None


@dataclass
class InfoConfig:
    file: Path = option(
        None, "Adapter file (.safetensors), training run folder or exported peft folder.", argument=True, required=True
    )
    as_json: bool = option(False, "Print the description as JSON.", flag="json")

    def __post_init__(self) -> None:
        check_text(self)
        self.file = Path(self.file)


@dataclass
class ExportConfig:
    adapter: Path = option(None, "Adapter file (.safetensors) or folder to export.", argument=True, required=True)
    out: Path = option(
        None, "Folder to write: one peft folder per component (unet/, text_encoder/).", argument=True, required=True
    )
    format: Literal["peft"] = option("peft", "peft: adapter_config.json + adapter_model.safetensors.")
    overwrite: bool = option(False, "Replace a folder lora-db exported before.")

    def __post_init__(self) -> None:
        for name in ("adapter", "out"):
            if not str(getattr(self, name) or "").strip():
                raise LoraDBError(f"{name.upper()} is empty; name a file or folder")
        check_text(self)
        self.adapter, self.out = Path(self.adapter), Path(self.out)


# tiny-world's held-out subjects (lora_db.synthetic.subjects.held_out_names(), which a test compares): shapes and
# patterns its training never drew. Named here, without torch, so that the CLI checks a name before loading anything.
HELD_OUT_SUBJECTS = (
    "heart", "crescent", "arrow", "spiral", "bolt", "keyhole", "teardrop", "cloud", "l_block", "hourglass", "leaf",
    "umbrella",
)  # fmt: skip
HeldOutSubject = Literal[HELD_OUT_SUBJECTS]


@dataclass
class DemoImagesConfig:
    folder: Path = option(None, "Folder to write the photos into.", argument=True, required=True)
    count: int = option(5, "How many photos.", minimum=1, maximum=10_000)
    size: int = option(256, "Side of each photo in pixels.", minimum=16, maximum=4096)
    seed: int = option(0, "Same seed, same photos.", minimum=0, maximum=MAX_SEED)
    subject: HeldOutSubject | None = option(
        None, "Photograph one of tiny-world's held-out subjects instead of the toy robot (docs/tiny-world.md)."
    )

    def __post_init__(self) -> None:
        check_text(self)
        check_numbers(self)
        self.folder = Path(self.folder)


@dataclass
class DemoConfig:
    folder: Path = option("demo", "Folder for the photos, the training run and before-after.png.", argument=True)
    subject: HeldOutSubject = option(
        "heart", "Which of tiny-world's held-out subjects (never seen in its training) it learns."
    )
    steps: int = option(
        TINY_WORLD_RECOMMENDED["max_train_steps"],
        "Training steps of the LoRA (rank 8 on attention and MLP, lr 2e-3: tiny-world's recommended setting).",
        minimum=1,
        maximum=100_000,
    )
    num_images: int = option(5, "Samples before and after training, at seeds seed, seed+1, ...", minimum=1, maximum=64)
    seed: int = option(
        0, "Seed of the photos, the training and the samples: same seed, same demo.", minimum=0, maximum=MAX_SEED
    )
    overwrite: bool = option(False, "Run again in a FOLDER that holds an earlier demo (its outputs are replaced).")

    def __post_init__(self) -> None:
        check_text(self)
        check_numbers(self)
        self.folder = Path(self.folder)


@dataclass
class CaptionConfig:
    folder: Path = option(
        None, "Folder of photos to caption (NAME.txt is written beside NAME.png).", argument=True, required=True
    )
    model: str = option(
        "thu-ml/unidiffuser-v1",
        "UniDiffuser whose image-to-text mode writes the captions (hub id, folder, tiny-world).",
    )
    adapter: str | None = option(
        None, "Caption with this adapter applied (a file or training run folder): the model being trained."
    )
    prefix: str | None = option(None, 'Text put before every caption, e.g. "a photo of sks" (joined with ", ").')
    seed: int = option(0, "Seed of every caption: same seed and photo, same caption.", minimum=0, maximum=MAX_SEED)
    num_inference_steps: int = option(25, "Denoising steps per caption.", minimum=1)
    guidance_scale: float = option(8.0, "Classifier-free guidance scale.")
    mixed_precision: MixedPrecision = option("no", "Load the weights in fp16 (GPU) or bf16.")
    overwrite: bool = option(False, "Replace captions that exist (without it they are kept and reported).")

    def __post_init__(self) -> None:
        if not str(self.folder or "").strip():
            raise LoraDBError("FOLDER is empty; name the folder of photos to caption")
        check_text(self)
        check_numbers(self)
        self.folder = Path(self.folder)
        if self.prefix is not None and not self.prefix.strip():
            raise LoraDBError("--prefix is empty; give the text to put before each caption, or leave it out")
