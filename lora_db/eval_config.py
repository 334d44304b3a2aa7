"""What `lora-db eval` takes: its config dataclass, kept free of torch so the CLI prints --help without importing it.

lora_db.evaluate holds the code that runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import Quantization
from .errors import LoraDBError


def _opt(default, help: str):
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help})


@dataclass
class EvalConfig:
    out: Path = _opt(None, "Folder for eval.json, metrics.png, the grids and the samples.")
    instance_dir: Path = _opt(None, "Folder of real photos of the subject (the reference of CLIP-I and DINO).")
    model: str | None = _opt(None, "Base model; defaults to the one the adapters were trained on.")
    adapters: list[str] = _opt(
        list,
        "Adapter file, or a training run folder (every checkpoint-N and the final adapter); repeatable. "
        "`none` is the base model, which is always evaluated.",
    )
    prompts: list[str] = _opt(list, 'Prompt naming the subject, e.g. "a photo of sks robot"; repeatable.')
    class_prompt: str | None = _opt(None, 'Class prompt, e.g. "a photo of a robot": measures prior drift.')
    num_images: int = _opt(4, "Samples per prompt and row; sample i uses seed + i.")
    seed: int = _opt(0, "Seed of the first sample: same seed, same numbers.")
    num_inference_steps: int = _opt(20, "Denoising steps per sample.")
    guidance_scale: float = _opt(8.0, "Classifier-free guidance scale.")
    clip_model: str | None = _opt(
        None, "A transformers CLIP model (folder or hub id) for CLIP-T; `tiny-world` names tiny-world's own."
    )
    dino: str | None = _opt(None, "A transformers ViT for the DINO metric, e.g. facebook/dino-vits16.")
    identifier: str | None = _opt(None, 'The rare token of the prompts ("sks"), replaced by "a" for CLIP-T.')
    quantize_base: Quantization = _opt(
        "none",
        "Evaluate on a 4-bit NF4 or 8-bit base (bitsandbytes), as `lora-db train --quantize-base` trains: every "
        "row, the base's too.",
    )
    overwrite: bool = _opt(False, "Replace --out if it holds an earlier `lora-db eval` output.")

    def __post_init__(self) -> None:
        if self.out is None:
            raise LoraDBError("--out is required: the folder to write the evaluation into")
        if self.instance_dir is None:
            raise LoraDBError("--instance-dir is required: CLIP-I compares samples with the real photos")
        if not self.prompts:
            raise LoraDBError('--prompt is required, e.g. --prompt "a photo of sks robot"')
        self.out, self.instance_dir = Path(self.out), Path(self.instance_dir)
        for name in ("num_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise LoraDBError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.num_images < 2:
            raise LoraDBError("--num-images must be at least 2: diversity compares samples with each other")
        if not math.isfinite(self.guidance_scale):
            raise LoraDBError(f"--guidance-scale must be a finite number (got {self.guidance_scale})")
