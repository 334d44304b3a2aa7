"""LoKr and LoHa, peft's two LyCORIS adapters beside LoRA: their tensors, and the update each adds to a weight.

    lora-db train ... --adapter-type lokr --rank 8     # Kronecker product of a small and a (low-rank) large factor
    lora-db train ... --adapter-type loha --rank 8     # Hadamard product of two rank-r products

peft trains them (`LoKrConfig`, `LoHaConfig`) and keeps their state-dict names (`<module>.lokr_w1`, `lokr_w2` or
its factors `lokr_w2_a` / `lokr_w2_b`, the same for w1; `<module>.hada_w1_a` ... `hada_w2_b`). The update of a
Linear weight, in fp32, as peft's `get_delta_weight` computes it (a test holds the two equal):

    LoKr: scale x kron(W1, W2),  W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,  W2 likewise
    LoHa: scale x (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)

with scale = weight x alpha / rank, LoRA's rule. Both updates add to the layer's output, so adapters of these kinds
sum with others in merge and hot-swap; only a combination into one LoRA file (B @ A) cannot hold them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lora_db.errors import LoraDBError
from lora_db.logs import printable

ADAPTER_KINDS = ("lora", "lokr", "loha")
KIND_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}
PEFT_TYPES = {"LORA": "lora", "LOKR": "lokr", "LOHA": "loha"}

# Each factor: a full matrix, or the two low-rank matrices whose product it is.
LOKR_FACTORS = {"w1": ("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), "w2": ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))}
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TENSOR_NAMES = {
    "lokr": tuple(name for full, parts in LOKR_FACTORS.values() for name in (full, *parts)),
    "loha": LOHA_TENSORS,
}


def modules_of(part: Mapping[str, torch.Tensor], kind: str, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> its tensors by peft's name (`lokr_w1`, ...), each name checked against the kind."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in part.items():
        module, _, name = key.rpartition(".")
        if name not in TENSOR_NAMES[kind]:
            raise LoraDBError(f"{where}.{printable(key)} is not a {KIND_NAMES[kind]} tensor")
        modules.setdefault(module, {})[name] = tensor
    return modules


def check_module(tensors: Mapping[str, torch.Tensor], kind: str, rank: int, where: str) -> None:
    """A module's tensors are complete, 2-D and of the rank where they are low-rank factors."""
    if kind == "loha":
        missing = [name for name in LOHA_TENSORS if name not in tensors]
        factors = [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")]
    else:
        missing, factors = [], []
        for full, parts in LOKR_FACTORS.values():
            if full in tensors:
                continue
            missing += [name for name in parts if name not in tensors]
            factors.append(parts)
    if missing:
        raise LoraDBError(f"{where} has no {missing[0]}; the file is incomplete")
    for name, tensor in tensors.items():
        if tensor.ndim != 2:
            raise LoraDBError(f"{where}.{name} has shape {tuple(tensor.shape)}; it must be 2-D")
    for left, right in factors:
        found = (tensors[left].shape[1], tensors[right].shape[0])
        if found != (rank, rank):
            raise LoraDBError(f"{where}: {left} @ {right} has rank {found} but the metadata says {rank}")


def _factor(tensors: Mapping[str, torch.Tensor], full: str, parts: tuple[str, str]) -> torch.Tensor:
    if full in tensors:
        return tensors[full].float()
    return tensors[parts[0]].float() @ tensors[parts[1]].float()


def update_shape(tensors: Mapping[str, torch.Tensor], kind: str) -> tuple[int, int]:
    """(out, in) features of the weight the module's tensors update."""
    if kind == "loha":
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]
    shapes = []
    for full, parts in LOKR_FACTORS.values():
        if full in tensors:
            shapes.append(tuple(tensors[full].shape))
        else:
            shapes.append((tensors[parts[0]].shape[0], tensors[parts[1]].shape[1]))
    (a, b), (c, d) = shapes
    return a * c, b * d


def update(tensors: Mapping[str, torch.Tensor], kind: str, scale: float) -> torch.Tensor:
    """The change a LoKr or LoHa module makes to its Linear weight (out x in), in fp32."""
    if kind == "loha":
        w = {name: tensors[name].float() for name in LOHA_TENSORS}
        return (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * scale
    w1, w2 = (_factor(tensors, full, parts) for full, parts in LOKR_FACTORS.values())
    return torch.kron(w1, w2) * scale


def refuse_in_lora_file(path: Path, kind: str, option: str) -> None:
    """What only LoRA's B @ A can be (a combined adapter file) refuses the other kinds by name."""
    if kind != "lora":
        raise LoraDBError(
            f"{option}: {path} is a {KIND_NAMES[kind]} adapter, whose update is no B @ A product, so it cannot be "
            "written into a combined LoRA file; merge it into the model with --out instead"
        )
