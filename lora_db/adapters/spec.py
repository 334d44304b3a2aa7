"""What an adapter is: a LoRA spec per component (rank, alpha, targets, variant) and the tensors of each.

Pure data and its checks; lora_db.adapters.format reads and writes the file, lora_db.adapters.layers puts it into
a model."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")


FORMAT = "lora-db/1"


COMPONENTS = ("unet", "text_encoder")


MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # peft's state-dict key of a DoRA magnitude (no ".weight")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature (peft's DoRA)
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank

    @property
    def scale(self) -> float:
        """peft's `LoraLayer.set_scale` rule at weight 1."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str:
        return " + ".join(name for name, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on) or "LoRA"

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=True,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
        )


@dataclass
class AdapterFile:
    """A loaded adapter: LoRA tensors and spec per component, plus the file's metadata."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    specs: dict[str, LoraSpec]
    metadata: dict[str, str] = field(default_factory=dict)

    def num_parameters(self) -> int:
        return sum(t.numel() for part in self.tensors.values() for t in part.values())

    @property
    def trained_quantization(self) -> str:
        """How the frozen base was stored in training (`lora-db train --quantize-base`): none, nf4 or int8."""
        return self.metadata.get("quantize_base") or "none"


def spec_from_json(raw: Mapping[str, object]) -> LoraSpec:
    return LoraSpec(
        int(raw["rank"]),
        float(raw["alpha"]),
        tuple(raw["target_modules"]),
        float(raw.get("dropout", 0)),
        bool(raw.get("use_dora", False)),
        bool(raw.get("use_rslora", False)),
    )


def split_components(
    path: Path, flat: Mapping[str, torch.Tensor], specs: Mapping[str, LoraSpec]
) -> dict[str, dict[str, torch.Tensor]]:
    """Component-prefixed tensors -> tensors per component, each checked against its spec."""
    tensors: dict[str, dict[str, torch.Tensor]] = {c: {} for c in specs}
    for key, tensor in flat.items():
        component, _, rest = key.partition(".")
        if component not in specs:
            raise LoraDBError(f"{path}: tensor {key} belongs to no component named in the metadata")
        tensors[component][rest] = tensor
    for component, part in tensors.items():
        _check_ranks(path, component, part, specs[component])
    return tensors


def _check_ranks(path: Path, component: str, part: Mapping[str, torch.Tensor], spec: LoraSpec) -> None:
    if not part:
        raise LoraDBError(f"{path}: component {component} has no tensors")
    for key, tensor in part.items():
        if not torch.isfinite(tensor).all():
            raise LoraDBError(f"{path}: {component}.{key} holds NaN or infinite values")
        if key.endswith(MAGNITUDE_SUFFIX):
            if not spec.use_dora:
                raise LoraDBError(f"{path}: {component}.{key} is a DoRA magnitude but the metadata says plain LoRA")
            continue
        rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1] if ".lora_B." in key else None
        if rank is None:
            raise LoraDBError(f"{path}: {component}.{key} is not a LoRA A/B weight")
        if rank != spec.rank:
            raise LoraDBError(
                f"{path}: {component}.{key} has rank {rank} but the metadata says {spec.rank}; the file is inconsistent"
            )
    if not math.isfinite(spec.alpha) or spec.alpha <= 0:
        raise LoraDBError(f"{path}: metadata alpha {spec.alpha} for {component} is not a positive number")
