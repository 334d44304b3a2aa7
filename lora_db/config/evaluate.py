"""What `lora-db eval` and `lora-db estimate` take beyond training's options; free of torch, like every config.

lora_db.evaluation runs the first, lora_db.training.estimate the second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lora_db.config.fields import MAX_SEED, Quantization, check_numbers, check_text, option
from lora_db.errors import LoraDBError


@dataclass
class EvalConfig:
    # What `lora-db eval --help` shows first; `--help-all` shows the others too.
    MAIN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "out", "instance_dir", "model", "adapters", "prompts", "class_prompt", "describe", "num_images", "seed",
        "guidance_scale", "overwrite",
    )  # fmt: skip

    out: Path = option(None, "Folder for eval.json, metrics.png, the grids and the samples.", required=True)
    instance_dir: Path = option(
        None, "Folder of real photos of the subject (the reference of CLIP-I and DINO).", required=True
    )
    model: str | None = option(None, "Base model; defaults to the one the adapters were trained on.")
    adapters: list[str] = option(
        list,
        "Adapter file, or a training run folder (every checkpoint-N and the final adapter); repeatable. "
        "`none` is the base model, which is always evaluated.",
        flag="adapter",
    )
    prompts: list[str] = option(
        list,
        'Prompt to sample, repeatable: one naming the subject ("a photo of sks robot") is a subject prompt, one '
        'without the identifier ("a photo of a red car") a control prompt.',
        flag="prompt",
        required=True,
    )
    class_prompt: str | None = option(None, 'Class prompt, e.g. "a photo of a robot": measures prior drift.')
    describe: list[str] = option(
        list,
        'A plain description of the subject, e.g. "a photo of a magenta star on yellow": the base model samples it '
        "at the same seeds, scored against the photos like a row (the adapter must beat words). One for every "
        "subject prompt, or repeated once per subject prompt, in their order.",
    )
    num_images: int = option(4, "Samples per prompt and row; sample i uses seed + i (diversity needs 2).", minimum=2)
    seed: int = option(0, "Seed of the first sample: same seed, same numbers.", minimum=0, maximum=MAX_SEED)
    num_inference_steps: int = option(20, "Denoising steps per sample.", minimum=1)
    guidance_scale: float = option(8.0, "Classifier-free guidance scale.")
    clip_model: str | None = option(
        None, "A transformers CLIP model (folder or hub id) for CLIP-T; `tiny-world` names tiny-world's own."
    )
    dino: str | None = option(
        None,
        "The judge of the DINO column: a transformers ViT (folder or hub id), e.g. facebook/dino-vits16; `tiny-world` "
        "names tiny-world's judge. Defaults to the model folder's own judge/ if it has one; never the pipeline's image "
        "encoder.",
    )
    identifier: str | None = option(
        None,
        'The rare token of the prompts ("sks"): prompts with it are subject prompts, the others control prompts; '
        'replaced by "a" for CLIP-T. Defaults to the word the adapters\' instance prompt adds to their class prompt.',
    )
    quantize_base: Quantization = option(
        "none",
        "Evaluate on a 4-bit NF4 or 8-bit base (bitsandbytes), as `lora-db train --quantize-base` trains: every "
        "row, the base's too.",
    )
    overwrite: bool = option(False, "Replace --out if it holds an earlier `lora-db eval` output.")

    def __post_init__(self) -> None:
        if self.out is None:
            raise LoraDBError("--out is required: the folder to write the evaluation into")
        if self.instance_dir is None:
            raise LoraDBError("--instance-dir is required: CLIP-I compares samples with the real photos")
        check_text(self)
        if not self.prompts:
            raise LoraDBError('--prompt is required, e.g. --prompt "a photo of sks robot"')
        if any(not text.strip() for text in self.describe):
            raise LoraDBError('--describe must not be empty, e.g. --describe "a photo of a magenta star on yellow"')
        self.out, self.instance_dir = Path(self.out), Path(self.instance_dir)
        for name in ("num_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise LoraDBError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.num_images < 2:
            raise LoraDBError("--num-images must be at least 2: diversity compares samples with each other")
        if not math.isfinite(self.guidance_scale):
            raise LoraDBError(f"--guidance-scale must be a finite number (got {self.guidance_scale})")
        check_numbers(self)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'24GB', '24G', '24GiB' or '24' -> bytes (binary units: GPUs sold as "24 GB" hold 24 GiB)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 24GB, 11.5GiB or 16000MB")
    number, unit = float(match.group(1)), (match.group(2) or "G").upper()
    size = int(number * 1024 ** "KMGT".index(unit) * 1024)
    if size <= 0:
        raise ValueError(f"{text!r} holds nothing; give the GPU's memory, e.g. 24GB")
    return size


@dataclass
class EstimateConfig:
    """`lora-db estimate`'s own options; the rest are `lora-db train`'s (TrainConfig)."""

    MAIN_OPTIONS: ClassVar[tuple[str, ...]] = ("gpu_memory", "device")

    gpu_memory: str | None = option(
        None,
        "Memory of the GPU to check against, e.g. 24GB (binary units, as cards are labelled); defaults to this "
        "machine's GPU.",
    )
    device: Literal["cuda", "cpu"] = option(
        "cuda", "`cuda` predicts a GPU run; `cpu` the tensors of a CPU run (what the benchmark measures)."
    )
