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

from lora_db.adapters.kinds import ADAPTER_KINDS, KIND_NAMES, check_module, modules_of
from lora_db.adapters.tokens import TOKENS_PREFIX, check_tokens
from lora_db.errors import LoraDBError
from lora_db.logs import printable

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
    kind: str = "lora"  # lora, lokr or loha (lora_db.adapters.kinds): what the tensors are and the update they make

    @property
    def scale(self) -> float:
        """peft's `LoraLayer.set_scale` rule at weight 1."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str:
        if self.kind != "lora":
            return KIND_NAMES[self.kind]
        return " + ".join(name for name, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on) or "LoRA"

    def peft_config(self):
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        if self.kind != "lora":
            config = LoKrConfig if self.kind == "lokr" else LoHaConfig
            return config(
                r=self.rank, alpha=self.alpha, target_modules=list(self.target_modules), module_dropout=self.dropout
            )
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
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # pivotal tuning: token -> its CLIP input embedding

    def num_parameters(self) -> int:
        adapters = sum(t.numel() for part in self.tensors.values() for t in part.values())
        return adapters + sum(t.numel() for t in self.tokens.values())

    @property
    def trained_quantization(self) -> str:
        """How the frozen base was stored in training (`lora-db train --quantize-base`): none, nf4 or int8."""
        return self.metadata.get("quantize_base") or "none"


MAX_ABS_WEIGHT = 1e4  # no trained LoRA weight comes near (they stay below ~10); a lora_B of 1e30 samples black
MAX_SCALE = 1e4  # alpha / rank: 1 or 2 is usual; 1e300 overflows the first update
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

LORA_DB_KEYS = {"rank": "rank", "alpha": "alpha", "targets": "target_modules", "dropout": "dropout"}
PEFT_KEYS = {"rank": "r", "alpha": "lora_alpha", "targets": "target_modules", "dropout": "lora_dropout"}
PEFT_LYCORIS_KEYS = {"rank": "r", "alpha": "alpha", "targets": "target_modules", "dropout": "module_dropout"}


def out_of_range(tensors: Mapping[str, torch.Tensor], limit: float = MAX_ABS_WEIGHT) -> tuple[str, float] | None:
    """The first tensor holding NaN, an infinity or a magnitude above `limit`, with its largest magnitude; None when
    all are sane. One device sync for all of them (training checks its weights every few updates)."""
    named = [(name, t.detach()) for name, t in tensors.items() if t.numel()]
    if not named:
        return None
    device = named[0][1].device
    peaks = torch.stack([t.abs().amax().float().to(device) for _, t in named])
    bad = ~(peaks <= limit)  # NaN compares False
    if not bool(bad.any()):
        return None
    index = int(bad.nonzero()[0, 0])
    return named[index][0], float(peaks[index])


def describe_peak(peak: float) -> str:
    return "NaN or infinite values" if not math.isfinite(peak) else f"values up to {peak:.3g}"


def read_bool(value: object, where: str) -> bool:
    """A boolean from a file: true/false (JSON), or the text "true"/"false" ("false" is no true value)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise LoraDBError(f"{where} must be true or false, not {printable(repr(value))}")


def _whole_number(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise LoraDBError(f"{where} must be a whole number of at least 1, not {printable(repr(value))}")
    return int(value)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LoraDBError(f"{where} must be a finite number, not {printable(repr(value))}")
    return float(value)


def parse_spec(raw: object, where: str, keys: Mapping[str, str] = LORA_DB_KEYS, kind: str | None = None) -> LoraSpec:
    """A LoraSpec from a file's fields (lora-db's metadata, a peft adapter_config.json, a run's config.json), each
    checked for its type and range; `keys` names the fields as that file spells them, `kind` the adapter kind when
    the file says it elsewhere. Errors name the field."""
    if not isinstance(raw, Mapping):
        raise LoraDBError(f"{where}: must be a table of LoRA settings, not {printable(repr(raw))}")

    def get(name: str, default: object = None) -> object:
        key = keys.get(name, name)
        if key not in raw and default is None:
            raise LoraDBError(f"{where}: no {key}; the file is incomplete")
        return raw.get(key, default)  # a key present with null stays None

    rank = _whole_number(get("rank"), f"{where}: {keys['rank']}")
    alpha_value = get("alpha")  # a run's config.json holds null for "the rank"
    alpha = float(rank) if alpha_value is None else _number(alpha_value, f"{where}: {keys['alpha']}")
    dropout = _number(get("dropout", 0.0), f"{where}: {keys['dropout']}")
    targets = get("targets")
    if not (isinstance(targets, list | tuple) and targets and all(isinstance(t, str) and t for t in targets)):
        raise LoraDBError(f"{where}: {keys['targets']} must be a list of layer names, not {printable(repr(targets))}")
    kind = kind or raw.get("kind", "lora")
    if kind not in ADAPTER_KINDS:
        raise LoraDBError(f"{where}: kind must be one of {', '.join(ADAPTER_KINDS)}, not {printable(repr(kind))}")
    spec = LoraSpec(
        rank,
        alpha,
        tuple(targets),
        dropout,
        use_dora=read_bool(get("use_dora", False), f"{where}: use_dora"),
        use_rslora=read_bool(get("use_rslora", False), f"{where}: use_rslora"),
        kind=kind,
    )
    if kind != "lora" and (spec.use_dora or spec.use_rslora):
        raise LoraDBError(f"{where}: DoRA and rsLoRA are LoRA variants; a {KIND_NAMES[kind]} adapter has neither")
    if alpha <= 0 or not 0 <= dropout < 1:
        field, value = (keys["alpha"], alpha) if alpha <= 0 else (keys["dropout"], dropout)
        raise LoraDBError(f"{where}: {field} {value:g} is out of range (alpha above 0, dropout in [0, 1))")
    if spec.scale > MAX_SCALE:
        raise LoraDBError(
            f"{where}: {keys['alpha']} {alpha:g} over rank {rank} scales each update by {spec.scale:.3g}, above "
            f"{MAX_SCALE:g}; such an adapter only samples noise: the file is damaged or its alpha mistyped"
        )
    return spec


def checked_adapter(
    path: Path, flat: Mapping[str, torch.Tensor], specs: Mapping[str, LoraSpec], metadata: Mapping[str, str]
) -> AdapterFile:
    """The one validation every reader of adapters shares (info, sample, merge, export, eval, --init-adapter) and
    the writer too: at least one known component, and for each floating-point 2-D A/B pairs of its rank, finite and
    of a sane magnitude. Component-prefixed tensors are split per component. Errors name the tensor."""
    if not specs:
        raise LoraDBError(f"{path}: holds no adapter component (unet or text_encoder); there is nothing to apply")
    for component in specs:
        if component not in COMPONENTS:
            raise LoraDBError(
                f"{path}: holds LoRA for {printable(component)}, which lora-db does not apply "
                f"(only {', '.join(COMPONENTS)})"
            )
    tensors: dict[str, dict[str, torch.Tensor]] = {c: {} for c in specs}
    tokens = {key.removeprefix(TOKENS_PREFIX): t for key, t in flat.items() if key.startswith(TOKENS_PREFIX)}
    check_tokens(path, tokens)
    for key, tensor in flat.items():
        if key.startswith(TOKENS_PREFIX):
            continue
        component, _, rest = key.partition(".")
        if component not in specs:
            raise LoraDBError(f"{path}: tensor {printable(key)} belongs to no component named in the metadata")
        tensors[component][rest] = tensor
    for component, part in tensors.items():
        _check_component(path, component, part, specs[component])
    return AdapterFile(path=path, tensors=tensors, specs=dict(specs), metadata=dict(metadata), tokens=tokens)


def _check_component(path: Path, component: str, part: Mapping[str, torch.Tensor], spec: LoraSpec) -> None:
    if not part:
        raise LoraDBError(f"{path}: component {component} has no tensors")
    if spec.kind != "lora":
        _check_lycoris(path, component, part, spec)
        return
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in part.items():
        name = f"{path}: {component}.{printable(key)}"
        if key.endswith(MAGNITUDE_SUFFIX):
            if not spec.use_dora:
                raise LoraDBError(f"{name} is a DoRA magnitude but the metadata says plain LoRA")
            module, kind, dims = key.removesuffix(MAGNITUDE_SUFFIX), "magnitude", 1
        else:
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise LoraDBError(f"{name} is not a LoRA A/B weight")
            dims = 2
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoraDBError(
                f"{name} is {str(tensor.dtype).removeprefix('torch.')}; LoRA weights are floating point "
                "(fp32, fp16 or bf16)"
            )
        if tensor.ndim != dims:
            raise LoraDBError(f"{name} has shape {tuple(tensor.shape)}; it must be {dims}-D")
        rank = tensor.shape[0] if kind == "A.weight" else tensor.shape[1] if kind == "B.weight" else spec.rank
        if rank != spec.rank:
            raise LoraDBError(f"{name} has rank {rank} but the metadata says {spec.rank}; the file is inconsistent")
        modules.setdefault(module, {})[kind] = tensor
    for module, kinds in modules.items():
        for kind, other in (("A.weight", "B.weight"), ("B.weight", "A.weight")):
            if kind in kinds and other not in kinds:
                raise LoraDBError(
                    f"{path}: {component}.{printable(module)}.lora_{kind} has no matching lora_{other[0]}; "
                    "the file is incomplete"
                )
        if spec.use_dora and "magnitude" not in kinds:
            raise LoraDBError(f"{path}: {component}.{printable(module)} has no DoRA magnitude; the file is incomplete")
        if "magnitude" in kinds and "B.weight" in kinds and kinds["magnitude"].shape[0] != kinds["B.weight"].shape[0]:
            raise LoraDBError(
                f"{path}: {component}.{printable(module)}'s DoRA magnitude has {kinds['magnitude'].shape[0]} values "
                f"for {kinds['B.weight'].shape[0]} output features; the file is inconsistent"
            )
    _check_magnitudes(path, component, part)


def _check_lycoris(path: Path, component: str, part: Mapping[str, torch.Tensor], spec: LoraSpec) -> None:
    for key, tensor in part.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoraDBError(
                f"{path}: {component}.{printable(key)} is {str(tensor.dtype).removeprefix('torch.')}; adapter "
                "weights are floating point (fp32, fp16 or bf16)"
            )
    for module, tensors in modules_of(part, spec.kind, f"{path}: {component}").items():
        check_module(tensors, spec.kind, spec.rank, f"{path}: {component}.{printable(module)}")
    _check_magnitudes(path, component, part)


def _check_magnitudes(path: Path, component: str, part: Mapping[str, torch.Tensor]) -> None:
    bad = out_of_range(part)
    if bad is not None:
        raise LoraDBError(
            f"{path}: {component}.{printable(bad[0])} holds {describe_peak(bad[1])}; LoRA weights stay far below "
            f"{MAX_ABS_WEIGHT:g}: the adapter diverged in training or the file is damaged"
        )
