"""LoRA in a model: injection (peft's LoRA layers), state dicts, fit checks, and the math merge shares with forward.

One definition of the scale (`lora_scale`: alpha / rank, or alpha / sqrt(rank) for rsLoRA), used by forward and
merge alike."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lora_db.adapters.kinds import modules_of, update_shape
from lora_db.adapters.spec import COMPONENTS, MAGNITUDE_SUFFIX, AdapterFile, LoraSpec
from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")


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
    """Warn when the rank is above some targeted layers' width: B @ A is then already full rank, so the extra rank
    adds parameters (and adapter size) but no capacity. Above every targeted layer's width it is an error: the whole
    adapter would be larger than the layers it adapts, for nothing."""
    layers = [layer for name, layer in linear_layers(model).items() if matches_target(name, spec.target_modules)]
    widths = [min(layer.in_features, layer.out_features) for layer in layers]
    narrow = sum(width < spec.rank for width in widths)
    if not narrow:
        return
    size = sum(spec.rank * (layer.in_features + layer.out_features) for layer in layers) * 4
    if narrow == len(widths):
        raise LoraDBError(
            f"--rank {spec.rank} is above the width of every targeted {component} layer (widest {max(widths)}): a "
            f"{size / 2**20:.1f} MiB adapter with no more capacity than --rank {max(widths)}; choose --rank "
            f"{max(widths)} or less"
        )
    which = f"{narrow} of the {len(widths)}"
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


def update_shapes(adapter: AdapterFile, component: str) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) features of the weight each of a component's modules updates, for every kind."""
    kind = adapter.specs[component].kind
    if kind == "lora":
        return {module: (b.shape[0], a.shape[1]) for module, (a, b) in lora_pairs(adapter, component).items()}
    modules = modules_of(adapter.tensors[component], kind, f"{adapter.path}: {component}")
    return {module: update_shape(tensors, kind) for module, tensors in modules.items()}


def lycoris_modules(adapter: AdapterFile, component: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> its LoKr or LoHa tensors."""
    return modules_of(adapter.tensors[component], adapter.specs[component].kind, f"{adapter.path}: {component}")


def check_fits(model: nn.Module, adapter: AdapterFile, component: str) -> None:
    """Refuse an adapter that does not fit `model`: unknown layers, other shapes, or layers its targets miss."""
    layers = linear_layers(model)
    pairs = update_shapes(adapter, component)
    for module, trained in pairs.items():
        if module not in layers:
            raise LoraDBError(
                f"{adapter.path}: the model has no linear layer {component}.{module}; "
                "the adapter was trained for another architecture"
            )
        layer = layers[module]
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
            f"{adapter.path}: no adapter weights for {component}.{missing[0]} ({len(missing)} layers), which its "
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
