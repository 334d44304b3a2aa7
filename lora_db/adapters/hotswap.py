"""Adapters attached side by side to one loaded UniDiffuser and switched without reloading it (`AdapterSet`).

    pipe = lora_db.load_pipeline("tiny", adapters=["robot/adapter.safetensors", "toy/adapter.safetensors:0.8"])
    pipe.lora_adapters.activate({"robot": 1.0})      # about half a millisecond on the tiny model

Also which base an adapter belongs on (`resolve_model`, `warn_other_base`) and quantizing that base first
(`quantize_for`), shared by sample, eval and merge."""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lora_db.adapters.format import read_adapter
from lora_db.adapters.layers import check_fits, check_summable, inject_lora, load_lora_state_dict, pipeline_component
from lora_db.adapters.spec import COMPONENTS, AdapterFile
from lora_db.adapters.tokens import TokenSwitch
from lora_db.config.commands import WeightedAdapter
from lora_db.errors import LoraDBError
from lora_db.layout import ADAPTER_FILE
from lora_db.logs import printable
from lora_db.models.loading import RANDOM_PREFIX, is_built_in
from lora_db.models.loading import load_pipeline as load_base
from lora_db.models.quantize import check_quantization, quantize_pipeline

logger = logging.getLogger("lora_db")


ADAPTER_NAME = r"[0-9A-Za-z_-]+"  # peft keeps adapters in ModuleDicts, whose keys cannot hold dots


def lora_layers(module: nn.Module | None) -> list[nn.Module]:
    """peft's adapter layers (LoRA, LoKr or LoHa) in `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [] if module is None else [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class AdapterSet:
    """Adapters injected side by side into one pipeline, by name; `activate` chooses which ones count."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.files: dict[str, AdapterFile] = {}
        self.active: dict[str, float] = {}
        self._tokens: TokenSwitch | None = None  # set when an adapter brings pivotal tuning's tokens
        self._layers: dict[str, list[nn.Module]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def load(self, adapter: AdapterFile | str | Path, name: str | None = None) -> str:
        """Inject and load one adapter file (checked against the model first); returns its name."""
        if not isinstance(adapter, AdapterFile):
            adapter = read_adapter(adapter)
        name = name or self._free_name(adapter.path)
        if not re.fullmatch(ADAPTER_NAME, name):
            raise LoraDBError(f"adapter name {name!r}: use letters, digits, _ and - only")
        if name in self.files:
            raise LoraDBError(f"an adapter named {name} is already loaded; choose another name")
        for loaded in self.files.values():
            for component, spec in adapter.specs.items():
                other = loaded.specs.get(component)
                if other is not None and other.kind != spec.kind:
                    raise LoraDBError(
                        f"{adapter.path} is a {spec.variant} adapter and {loaded.path} a {other.variant} one: peft "
                        "cannot put adapters of two kinds into one layer; load them into separate pipelines, or "
                        "merge one into the model first (lora-db merge --out)"
                    )
        modules = {component: pipeline_component(self.pipe, adapter, component) for component in adapter.specs}
        for component, module in modules.items():
            check_fits(module, adapter, component)
        if adapter.tokens:  # pivotal tuning: switched in with the adapter (activate)
            self._tokens = self._tokens or TokenSwitch(self.pipe)
            self._tokens.check(adapter.tokens, adapter.path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters, on purpose
            for component, module in modules.items():
                inject_lora(module, adapter.specs[component], adapter_name=name)
                load_lora_state_dict(module, adapter.tensors[component], adapter_name=name)
                # New LoRA modules start in training mode: a trained dropout would make samples random.
                module.requires_grad_(False).eval()
        self.files[name] = adapter
        self._layers = {component: lora_layers(getattr(self.pipe, component, None)) for component in COMPONENTS}
        self.activate(self.active)  # peft makes a newly injected adapter the active one everywhere
        return name

    def activate(self, weights: Mapping[str, float]) -> None:
        """Make exactly these adapters count, each at weight x its scale; `{}` leaves the base model alone."""
        unknown = [name for name in weights if name not in self.files]
        if unknown:
            raise LoraDBError(f"no adapter named {unknown[0]} is loaded; loaded: {', '.join(self.files) or 'none'}")
        bad = [f"{name}={weight}" for name, weight in weights.items() if not math.isfinite(weight)]
        if bad:
            raise LoraDBError(f"adapter weights must be finite numbers, not {bad[0]}")
        check_summable(self.files[name] for name in weights)
        tokens = self._active_tokens(weights)
        for layers in self._layers.values():
            for layer in layers:
                present = [name for name in weights if name in layer.scaling]
                layer.enable_adapters(bool(present))
                if present:
                    layer.set_adapter(present, inference_mode=True)
                    for name in present:
                        layer.set_scale(name, weights[name])
        if self._tokens is not None:
            self._tokens.install(tokens)
        self.active = dict(weights)

    def _active_tokens(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        tokens: dict[str, torch.Tensor] = {}
        owners: dict[str, str] = {}
        for name in weights:
            for token, vector in self.files[name].tokens.items():
                if token in tokens and not torch.equal(tokens[token], vector):
                    raise LoraDBError(
                        f"adapters {owners[token]} and {name} both learned the token {printable(token)!r}, "
                        "differently; activate one of them at a time"
                    )
                tokens[token], owners[token] = vector, name
        return tokens

    def _free_name(self, path: Path) -> str:

        # Every training run writes adapter.safetensors, so its folder is what tells runs apart.
        stem = path.parent.name if path.name == ADAPTER_FILE and path.parent.name else path.stem
        base = re.sub(r"[^0-9A-Za-z_-]", "_", stem) or "adapter"
        name, number = base, 2
        while name in self.files:
            name, number = f"{base}_{number}", number + 1
        return name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model: str, adapters: Iterable[str | Path] = (), *, torch_dtype=None, device=None, quantize_base: str = "none"
):
    """A diffusers `UniDiffuserPipeline` with `adapters` (`FILE[:WEIGHT]`) attached, all active at their weights.

    Switch them with `pipe.lora_adapters.activate({name: weight})` (an `AdapterSet`); names are in
    `pipe.lora_adapters.names`. `quantize_base="nf4"` (or `"int8"`) samples on a quantized base, as QLoRA trains.
    """

    choices = [WeightedAdapter.parse(str(text)) for text in adapters]
    device = torch.device(device) if device is not None else default_device()
    files = [read_adapter(c.path) for c in choices if c.path is not None]
    pipe = load_base(model, torch_dtype=torch_dtype)
    quantize_for(pipe, files, quantize_base, torch_dtype or torch.float32, device)
    pipe.to(device)
    pipe.lora_adapters = AdapterSet(pipe)
    adapters_by_path = {file.path: file for file in files}
    weights = {pipe.lora_adapters.load(adapters_by_path[c.path]): c.weight for c in choices if c.path is not None}
    warn_other_base(model, pipe.lora_adapters.files.values())
    pipe.lora_adapters.activate(weights)
    return pipe


def quantize_for(pipe, adapters: Iterable[AdapterFile], kind: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize the base before any adapter is injected: the U-ViT, and the text encoder if an adapter trained it."""

    adapters = list(adapters)
    for adapter in adapters:
        trained = adapter.trained_quantization
        if trained != kind:
            logger.info(
                "%s was trained on %s base; --quantize-base %s samples it on the base it was trained on",
                adapter.path,
                f"an {printable(trained)}" if trained != "none" else "a full-precision",
                printable(trained),
            )
    if kind == "none":
        return
    check_quantization(kind, device, dtype)
    text_encoder = any("text_encoder" in adapter.specs for adapter in adapters)
    quantize_pipeline(pipe, kind, dtype, device, text_encoder=text_encoder)


def resolve_model(model: str | None, adapters: Iterable[AdapterFile]) -> str:
    """The base model to load: the user's --model; without one, the adapters' recorded base only when it is one of
    lora-db's two small built-in models (tiny, tiny-world), named in the log as taken from the metadata. A path, a
    hub id or a large random build (random:unidiffuser-v1 allocates the real-size model) from a file's metadata
    chooses nothing."""
    adapters = list(adapters)
    if model:
        warn_other_base(model, adapters)
        return model
    bases = {a.metadata.get("base_model", "") for a in adapters} - {""}
    if len(bases) != 1:
        found = f"they name {', '.join(sorted(printable(b) for b in bases))}" if bases else "none names one"
        raise LoraDBError(f"--model is required: the adapters' metadata gives no single base model ({found})")
    base = bases.pop()
    if not is_built_in(base) or base.startswith(RANDOM_PREFIX):
        raise LoraDBError(
            f"--model is required: the adapter's metadata names its base model as {printable(base)!r}, and lora-db "
            "loads no folder, hub or random model an adapter file names; pass --model with the base you mean"
        )
    logger.info("--model not given: %s, the built-in base model the adapters' metadata names", base)
    return base


def _same_model(a: str, b: str) -> bool:
    # A hub id and a local copy of it (`hf download thu-ml/unidiffuser-v1 --local-dir unidiffuser-v1`) match.
    return a.rstrip("/") == b.rstrip("/") or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def warn_other_base(model: str, adapters: Iterable[AdapterFile]) -> None:
    """One warning line per adapter whose metadata names another base model than the one it is applied to."""
    for adapter in adapters:
        base = adapter.metadata.get("base_model", "")
        if base and not _same_model(base, model):
            logger.warning(
                "%s was trained on %s (its metadata says), not %s: its layers may fit, but what it learned may not "
                "carry over",
                adapter.path,
                printable(base),
                model,
            )
