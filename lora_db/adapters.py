"""LoRA adapters as small free functions over modules and state dicts, and the adapter file format.

An adapter file is one safetensors file holding every trained component's LoRA weights, keys prefixed by
component (`unet.transformer.transformer_in_blocks.0.attn1.to_q.lora_A.weight`, `text_encoder.…`), and in its
metadata what is needed to load it anywhere (`lora_db.components`: rank, alpha and targets per component; base
model, prompt, steps, lora-db version). The scale of every LoRA update is weight x alpha / rank, or
weight x alpha / sqrt(rank) for rsLoRA (`lora_scale`, peft's definition times the user's weight): hot-swap sets it
through peft's own `set_scale`, merge and combination use `lora_scale`, and a test holds the two equal.
A DoRA adapter also stores one magnitude per output feature (`...lora_magnitude_vector`, peft's key).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .command_configs import WeightedAdapter as WeightedAdapter  # re-exported: part of this module's API
from .errors import LoraDBError
from .io import atomic_write

logger = logging.getLogger("lora_db")

FORMAT = "lora-db/1"
COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
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


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's Linear layers by name; a layer that already holds LoRA counts under its own name, once."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: dict[str, nn.Linear] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue  # the base layer and LoRA matrices inside an injected layer
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name + ".")
            module = module.get_base_layer()
        if isinstance(module, nn.Linear):
            layers[name] = module
    return layers


def linear_module_names(model: nn.Module) -> list[str]:
    return list(linear_layers(model))


def matches_target(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of targets: the module name equals one or ends with `.` + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(model: nn.Module, targets: Iterable[str], option: str = "--target-modules") -> None:
    """Every target must match the end of at least one Linear layer's name (peft's matching rule)."""
    names = linear_module_names(model)
    unknown = [t for t in targets if not any(matches_target(n, [t]) for n in names)]
    if unknown:
        suffixes = sorted(
            {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names}
        )
        raise LoraDBError(
            f"{option}: no linear layer named {', '.join(unknown)} in this model; available: {', '.join(suffixes)}"
        )


def check_rank(model: nn.Module, spec: LoraSpec, component: str) -> None:
    """Warn when the rank is above targeted layers' width: B @ A is then already full rank, so the extra rank adds
    parameters (and adapter size) but no capacity."""
    layers = [layer for name, layer in linear_layers(model).items() if matches_target(name, spec.target_modules)]
    widths = [min(layer.in_features, layer.out_features) for layer in layers]
    narrow = sum(width < spec.rank for width in widths)
    if not narrow:
        return
    size = sum(spec.rank * (layer.in_features + layer.out_features) for layer in layers) * 4
    which = "all" if narrow == len(widths) else f"{narrow} of the {len(widths)}"
    logger.warning(
        "--rank %d is above the width of %s targeted %s layers (narrowest %d, widest %d): they gain "
        "parameters but no capacity, for a %.1f MiB adapter; --rank %d or less learns the same",
        spec.rank,
        which,
        component,
        min(widths),
        max(widths),
        size / 2**20,
        max(widths),
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
    if path.is_dir():
        from .peft_export import read_peft_folder

        return read_peft_folder(path)
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
        specs = {c: spec_from_json(s) for c, s in raw_specs.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise LoraDBError(f"{path}: damaged lora-db metadata ({err})") from None
    tensors = split_components(path, flat, specs)
    return AdapterFile(path=path, tensors=tensors, specs=specs, metadata=metadata)


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


def lora_scale(spec: LoraSpec, weight: float = 1.0) -> float:
    """The factor of B @ A in every use of an adapter (hot-swap forward, merge, combination)."""
    return weight * spec.scale


def dora_delta(
    base_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float
) -> torch.Tensor:
    """The change DoRA makes to a Linear weight: m / ||W + s B A||_row x (W + s B A) - W, in fp32.

    peft's forward and its `merge` compute the same (the row norm over each output feature's inputs).
    """
    weight = base_weight.float()
    adapted = weight + lora_delta(lora_a, lora_b, scale)
    factor = magnitude.float() / torch.linalg.norm(adapted, dim=1)
    return factor[:, None] * adapted - weight


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The update scale x B @ A that LoRA adds to a Linear weight, computed in fp32."""
    return (lora_b.float() @ lora_a.float()) * scale


def check_summable(adapters: Iterable[AdapterFile]) -> None:
    """Refuse to add a DoRA adapter to others: its output is not a sum of updates (peft renormalises each weight
    by the output of the adapters applied before it), so no weighted sum, merge or combined file would be exact."""
    adapters = list(adapters)
    dora = [a for a in adapters if any(s.use_dora for s in a.specs.values())]
    if dora and len(adapters) > 1:
        raise LoraDBError(
            f"{dora[0].path} is a DoRA adapter, which cannot be combined with other adapters exactly "
            "(DoRA rescales the whole weight); apply it alone"
        )


def lora_pairs(adapter: AdapterFile, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, B) of one component of an adapter."""
    part = adapter.tensors[component]
    pairs = {}
    for key in part:
        module, _, kind = key.rpartition(".lora_")
        if kind != "A.weight":
            continue
        b_key = f"{module}.lora_B.weight"
        if b_key not in part:
            raise LoraDBError(f"{adapter.path}: {component}.{key} has no matching lora_B; the file is incomplete")
        pairs[module] = (part[key], part[b_key])
    orphans = [k for k in part if k.endswith(".lora_B.weight") and k.removesuffix(".lora_B.weight") not in pairs]
    if orphans:
        raise LoraDBError(f"{adapter.path}: {component}.{orphans[0]} has no matching lora_A; the file is incomplete")
    return pairs


def lora_magnitudes(adapter: AdapterFile, component: str) -> dict[str, torch.Tensor]:
    """Module name -> DoRA magnitude (one per output feature); every module of a DoRA component has one."""
    part = adapter.tensors[component]
    magnitudes = {k.removesuffix(MAGNITUDE_SUFFIX): v for k, v in part.items() if k.endswith(MAGNITUDE_SUFFIX)}
    if adapter.specs[component].use_dora:
        missing = [m for m in lora_pairs(adapter, component) if m not in magnitudes]
        if missing:
            raise LoraDBError(
                f"{adapter.path}: {component}.{missing[0]} has no DoRA magnitude ({len(missing)} layers); "
                "the file is incomplete"
            )
    return magnitudes


def check_fits(model: nn.Module, adapter: AdapterFile, component: str) -> None:
    """Refuse an adapter that does not fit `model`: unknown layers, other shapes, or layers its targets miss."""
    layers = linear_layers(model)
    pairs = lora_pairs(adapter, component)
    for module, (lora_a, lora_b) in pairs.items():
        if module not in layers:
            raise LoraDBError(
                f"{adapter.path}: the model has no linear layer {component}.{module}; "
                "the adapter was trained for another architecture"
            )
        layer = layers[module]
        trained = (lora_b.shape[0], lora_a.shape[1])
        if trained != (layer.out_features, layer.in_features):
            raise LoraDBError(
                f"{adapter.path}: {component}.{module} is {trained[0]}x{trained[1]} in the adapter but "
                f"{layer.out_features}x{layer.in_features} in this model; it was trained for another model size"
            )
    for module, magnitude in lora_magnitudes(adapter, component).items():
        if module not in pairs:
            raise LoraDBError(f"{adapter.path}: {component}.{module} has a DoRA magnitude but no LoRA pair")
        if tuple(magnitude.shape) != (layers[module].out_features,):
            raise LoraDBError(
                f"{adapter.path}: {component}.{module}'s DoRA magnitude has shape {tuple(magnitude.shape)}, "
                f"not ({layers[module].out_features},); the file is inconsistent"
            )
    missing = [n for n in layers if matches_target(n, adapter.specs[component].target_modules) and n not in pairs]
    if missing:
        raise LoraDBError(
            f"{adapter.path}: no LoRA weights for {component}.{missing[0]} ({len(missing)} layers), which its "
            "targets name in this model; the adapter was trained for another architecture"
        )


def pipeline_component(pipe, adapter: AdapterFile, component: str) -> nn.Module:
    """The pipeline module an adapter component applies to (the U-ViT or the CLIP text encoder)."""
    module = getattr(pipe, component, None) if component in COMPONENTS else None
    if module is None:
        raise LoraDBError(
            f"{adapter.path}: holds LoRA for {component}, which lora-db does not apply "
            f"(only {', '.join(COMPONENTS)}); it was not written by lora-db train"
        )
    return module


def describe_adapter(adapter: AdapterFile) -> dict[str, object]:
    """What an adapter is, from its metadata and tensor shapes alone (for `lora-db info`)."""
    meta = adapter.metadata
    components = {}
    for component, spec in adapter.specs.items():
        components[component] = {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "variant": spec.variant,
            "target_modules": list(spec.target_modules),
            "layers": len(lora_pairs(adapter, component)),
            "parameters": sum(t.numel() for t in adapter.tensors[component].values()),
        }
    info: dict[str, object] = {
        "file": str(adapter.path),
        "size_bytes": _size(adapter.path),
        "format": meta.get("format", ""),
        "lora_db_version": meta.get("lora_db_version", ""),
        "base_model": meta.get("base_model", ""),
        "instance_prompt": meta.get("instance_prompt", ""),
        "class_prompt": meta.get("class_prompt", ""),
        "steps": meta.get("steps", ""),
        "resolution": meta.get("resolution", ""),
        "quantize_base": meta.get("quantize_base", ""),  # the frozen base's storage in training (QLoRA: nf4)
        "components": components,
        "parameters": adapter.num_parameters(),
    }
    for key in ("combined_from", "combination"):
        if key in meta:
            info[key] = _json_or_text(meta[key])
    return info


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value
