"""LoRA adapters as small free functions over modules and state dicts, and the adapter file format.

An adapter file is one safetensors file holding every trained component's LoRA weights, keys prefixed by
component (`unet.transformer.transformer_in_blocks.0.attn1.to_q.lora_A.weight`, `text_encoder.…`), and in its
metadata what is needed to load it anywhere (`lora_db.components`: rank, alpha and targets per component; base
model, prompt, steps, lora-db version). The scale of every LoRA update is alpha / rank, peft's definition,
used by forward and merge alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LoraDBError
from .io import atomic_write

FORMAT = "lora-db/1"
COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=True,
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


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def check_targets(model: nn.Module, targets: Iterable[str], option: str = "--target-modules") -> None:
    """Every target must match the end of at least one Linear layer's name (peft's matching rule)."""
    names = linear_module_names(model)
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        suffixes = sorted(
            {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names}
        )
        raise LoraDBError(
            f"{option}: no linear layer named {', '.join(unknown)} in this model; available: {', '.join(suffixes)}"
        )


def inject_lora(model: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> nn.Module:
    """Put LoRA layers into `model` in place (frozen base, trainable LoRA A/B)."""
    from peft import inject_adapter_in_model

    check_targets(model, spec.target_modules)
    return inject_adapter_in_model(spec.peft_config(), model, adapter_name=adapter_name)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, keys without the adapter name (the diffusers / peft file convention)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Load weights into an injected adapter, refusing any key or shape that does not fit."""
    from peft import set_peft_model_state_dict

    expected = lora_state_dict(model, adapter_name)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        detail = f"unknown key {unknown[0]}" if unknown else f"missing key {missing[0]}"
        raise LoraDBError(f"adapter does not fit this model: {detail} ({len(unknown)} unknown, {len(missing)} missing)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LoraDBError(
                f"adapter does not fit this model: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, dict(state), adapter_name=adapter_name)


def save_adapter(
    path: str | Path,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    specs: Mapping[str, LoraSpec],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write one self-contained adapter file atomically (fp32 tensors, component-prefixed keys)."""
    from safetensors.torch import save_file

    flat = {
        f"{component}.{key}": tensor.detach().to("cpu", torch.float32).contiguous()
        for component, part in tensors.items()
        for key, tensor in part.items()
    }
    meta = {"format": FORMAT}
    meta["lora_db.components"] = json.dumps(
        {c: {**asdict(s), "target_modules": list(s.target_modules)} for c, s in specs.items()}, sort_keys=True
    )
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter file: safetensors only, our metadata, shapes that agree with it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraDBError(
            f"{path}: {path.suffix} files are pickles, which can run code; only .safetensors "
            "adapters are loaded (convert it with a trusted tool first)"
        )
    if not path.is_file():
        raise LoraDBError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraDBError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    if "lora_db.components" not in metadata:
        raise LoraDBError(f"{path}: no lora-db metadata (rank, alpha, targets); it was not written by lora-db train")
    try:
        raw_specs = json.loads(metadata["lora_db.components"])
        specs = {
            c: LoraSpec(int(s["rank"]), float(s["alpha"]), tuple(s["target_modules"]), float(s.get("dropout", 0)))
            for c, s in raw_specs.items()
        }
    except (ValueError, KeyError, TypeError) as err:
        raise LoraDBError(f"{path}: damaged lora-db metadata ({err})") from None
    tensors: dict[str, dict[str, torch.Tensor]] = {c: {} for c in specs}
    for key, tensor in flat.items():
        component, _, rest = key.partition(".")
        if component not in specs:
            raise LoraDBError(f"{path}: tensor {key} belongs to no component named in the metadata")
        tensors[component][rest] = tensor
    for component, part in tensors.items():
        _check_ranks(path, component, part, specs[component])
    return AdapterFile(path=path, tensors=tensors, specs=specs, metadata=metadata)


def _check_ranks(path: Path, component: str, part: Mapping[str, torch.Tensor], spec: LoraSpec) -> None:
    if not part:
        raise LoraDBError(f"{path}: component {component} has no tensors")
    for key, tensor in part.items():
        if not torch.isfinite(tensor).all():
            raise LoraDBError(f"{path}: {component}.{key} holds NaN or infinite values")
        rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1] if ".lora_B." in key else None
        if rank is None:
            raise LoraDBError(f"{path}: {component}.{key} is not a LoRA A/B weight")
        if rank != spec.rank:
            raise LoraDBError(
                f"{path}: {component}.{key} has rank {rank} but the metadata says {spec.rank}; the file is inconsistent"
            )
    if not math.isfinite(spec.alpha) or spec.alpha <= 0:
        raise LoraDBError(f"{path}: metadata alpha {spec.alpha} for {component} is not a positive number")
