"""Adapters attached to one loaded UniDiffuser and switched without reloading it; the `lora-db sample` run.

Each adapter file is injected into the U-ViT (and the CLIP text encoder, if it trained one) under its own peft
adapter name. Switching only changes which adapters every LoRA layer adds and at what scale (peft's own
`set_scale`: weight x alpha / rank, or / sqrt(rank) for rsLoRA, the definition merge uses too): about 2 ms on
the tiny model and 16 ms on the real-size U-ViT, where loading the base takes seconds. A DoRA adapter is only
applied alone (its output is no sum of updates). In a notebook, after the two training runs of
docs/sample-and-merge.md:

    import lora_db
    pipe = lora_db.load_pipeline("tiny", adapters=["robot/adapter.safetensors", "toy/adapter.safetensors:0.8"])
    print(pipe.lora_adapters.names)                       # ['robot', 'toy']: both active now, toy at 0.8
    pipe.lora_adapters.activate({"robot": 1.0})           # robot alone
    image = pipe(prompt="a photo of sks robot", num_inference_steps=10).images[0]
    pipe.lora_adapters.activate({"robot": 0.7, "toy": 0.5})  # the weighted sum of both
    pipe.lora_adapters.activate({})                       # the base model alone

An adapter is named after its file (or, for a training run's adapter.safetensors, its folder).

`sample(SampleConfig(...))` is `lora-db sample`: the base loads once, each adapter once, and every adapter (or
the base, or a weighted combination) renders one row of DIR/grid.png, each image also saved as its own PNG.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import (
    COMPONENTS,
    AdapterFile,
    WeightedAdapter,
    check_fits,
    check_summable,
    inject_lora,
    load_lora_state_dict,
    pipeline_component,
    read_adapter,
)
from .command_configs import SampleConfig as SampleConfig  # re-exported: `sample(SampleConfig(...))`
from .errors import LoraDBError
from .io import atomic_directory, atomic_write_json, atomic_write_text
from .locks import output_lock

logger = logging.getLogger("lora_db")

ADAPTER_NAME = r"[0-9A-Za-z_-]+"  # peft keeps adapters in ModuleDicts, whose keys cannot hold dots
SAMPLE_MARKER = "sample.json"
GRID_FILE = "grid.png"
GRID_MIN_CELL = 128  # pixels: tiny-model samples are enlarged in the grid so their labels stay readable


def lora_layers(module: nn.Module | None) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [] if module is None else [m for m in module.modules() if isinstance(m, LoraLayer)]


class AdapterSet:
    """Adapters injected side by side into one pipeline, by name; `activate` chooses which ones count."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.files: dict[str, AdapterFile] = {}
        self.active: dict[str, float] = {}
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
        modules = {component: pipeline_component(self.pipe, adapter, component) for component in adapter.specs}
        for component, module in modules.items():
            check_fits(module, adapter, component)
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
        for layers in self._layers.values():
            for layer in layers:
                present = [name for name in weights if name in layer.lora_A]
                layer.enable_adapters(bool(present))
                if present:
                    layer.set_adapter(present, inference_mode=True)
                    for name in present:
                        layer.set_scale(name, weights[name])
        self.active = dict(weights)

    def _free_name(self, path: Path) -> str:
        from .train import ADAPTER_FILE

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
    from .models import load_pipeline as load_base

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
    from .quantize import check_quantization, quantize_pipeline

    adapters = list(adapters)
    for adapter in adapters:
        trained = adapter.trained_quantization
        if trained != kind:
            logger.info(
                "%s was trained on %s base; --quantize-base %s samples it on the base it was trained on",
                adapter.path,
                f"an {trained}" if trained != "none" else "a full-precision",
                trained,
            )
    if kind == "none":
        return
    check_quantization(kind, device, dtype)
    text_encoder = any("text_encoder" in adapter.specs for adapter in adapters)
    quantize_pipeline(pipe, kind, dtype, device, text_encoder=text_encoder)


# -- lora-db sample -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One grid row: the adapters that count, by name with their --adapter value; none for the base model."""

    entries: tuple[tuple[str, WeightedAdapter], ...] = ()

    @property
    def weights(self) -> dict[str, float]:
        weights: dict[str, float] = {}
        for name, choice in self.entries:
            weights[name] = weights.get(name, 0.0) + choice.weight
        return weights

    @property
    def label(self) -> str:
        parts = [name if c.weight == 1.0 else f"{name}:{c.weight:g}" for name, c in self.entries]
        return " + ".join(parts) or "base"

    @property
    def slug(self) -> str:
        return re.sub(r"[^0-9A-Za-z_.+-]+", "_", self.label.replace(" + ", "+"))

    def png_text(self) -> dict[str, str]:
        return {
            "adapter": " + ".join(str(c.path) for _, c in self.entries) or "none",
            "weight": " + ".join(f"{c.weight:g}" for _, c in self.entries),
        }


def plan_rows(choices: Sequence[WeightedAdapter], names: Mapping[Path, str], combine: bool) -> list[Row]:
    """One row per --adapter; with --combine, the base (if `none` was asked for) and one row of all adapters."""
    rows = [Row(((names[c.path], c),)) if c.path is not None else Row() for c in choices]
    if not combine:
        return rows
    combined = Row(tuple(entry for row in rows for entry in row.entries))
    return [Row()] * any(not row.entries for row in rows) + ([combined] if combined.entries else [])


def resolve_model(model: str | None, adapters: Iterable[AdapterFile]) -> str:
    adapters = list(adapters)
    if model:
        warn_other_base(model, adapters)
        return model
    bases = {a.metadata.get("base_model", "") for a in adapters} - {""}
    if len(bases) != 1:
        found = f"they name {', '.join(sorted(bases))}" if bases else "none names one"
        raise LoraDBError(f"--model is required: the adapters' metadata gives no single base model ({found})")
    return bases.pop()


def _same_model(a: str, b: str) -> bool:
    # A hub id and a local copy of it (`hf download thu-ml/unidiffuser-v1 --local-dir unidiffuser-v1`) match.
    return a.rstrip("/") == b.rstrip("/") or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def warn_other_base(model: str, adapters: Iterable[AdapterFile]) -> None:
    """One warning line per adapter whose metadata names another base model than the one it is applied to."""
    for adapter in adapters:
        base = adapter.metadata.get("base_model", "")
        if base and not _same_model(base, model):
            logger.warning(
                "%s was trained on %s, not %s: its layers may fit, but what it learned may not carry over",
                adapter.path,
                base,
                model,
            )


def check_output_folder(out: Path, overwrite: bool, marker: str) -> None:
    """Refuse an existing --out unless --overwrite, and never replace a folder lora-db did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LoraDBError(f"--out {out} is a file; choose a folder")
    if not overwrite:
        raise LoraDBError(f"--out {out} already exists; choose another folder, or pass --overwrite to replace it")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise LoraDBError(
            f"--out {out} holds files lora-db did not write (no {marker}); it will not be replaced: "
            "choose another folder"
        )


def check_size(config: SampleConfig, model: str) -> None:
    from .models import load_unet_config, native_resolution

    native = native_resolution(load_unet_config(model))
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and value != native:
            raise LoraDBError(
                f"--{name} {value}: {model} has fixed position embeddings for {native}x{native} images; "
                f"use --{name} {native} (or leave it out)"
            )


@dataclass
class SampleResult:
    out: Path
    rows: list[str]
    images: list[Path] = field(default_factory=list)
    grid: Path | None = None
    captions: list[dict[str, object]] = field(default_factory=list)
    base_load_s: float = 0.0
    adapter_load_s: dict[str, float] = field(default_factory=dict)
    switch_s: list[float] = field(default_factory=list)


def sample(config: SampleConfig) -> SampleResult:
    """`lora-db sample`: every check first, then the base once, each adapter once, then one row per adapter."""
    from .memory import check_mixed_precision, weight_dtype

    files = {c.path: read_adapter(c.path) for c in config.choices if c.path is not None}
    if config.combine:
        check_summable(files.values())
    model = resolve_model(config.model, files.values())
    prompts = config.read_prompts() if config.mode == "t2i" else []
    image = _read_image(config.image) if config.mode == "i2t" else None
    device = default_device()
    check_mixed_precision(config.mixed_precision, device)
    dtype = weight_dtype(config.mixed_precision)
    if config.quantize_base != "none":
        from .quantize import check_quantization

        check_quantization(config.quantize_base, device, dtype)
    check_size(config, model)
    with output_lock(config.out, "--out", inside=False):
        check_output_folder(config.out, config.overwrite, SAMPLE_MARKER)
        return _sample(config, files, model, prompts, image, device)


def _sample(config: SampleConfig, files, model: str, prompts: list[str], image, device) -> SampleResult:
    from tqdm.auto import tqdm

    from .memory import weight_dtype
    from .models import load_pipeline as load_base

    dtype = weight_dtype(config.mixed_precision)
    started = time.perf_counter()
    pipe = load_base(model, torch_dtype=dtype)
    quantize_for(pipe, files.values(), config.quantize_base, dtype, device)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    result = SampleResult(config.out, [], base_load_s=time.perf_counter() - started)
    adapters = AdapterSet(pipe)
    names = {}
    for path, adapter in files.items():
        started = time.perf_counter()
        names[path] = adapters.load(adapter)
        result.adapter_load_s[names[path]] = time.perf_counter() - started
    rows = plan_rows(config.choices, names, config.combine)
    result.rows = [row.label for row in rows]

    per_row = config.num_images * max(1, len(prompts))
    with (
        atomic_directory(config.out, replace=config.overwrite) as tmp,
        tqdm(total=len(rows) * per_row, desc="sample", unit="img" if prompts else "caption") as bar,
    ):
        grid_rows = []
        for number, row in enumerate(rows):
            started = time.perf_counter()
            adapters.activate(row.weights)
            result.switch_s.append(time.perf_counter() - started)
            if image is None:
                prefix = tmp / f"{number:02d}-{row.slug}"  # the number keeps repeated rows apart
                images, files_written = _render_row(pipe, config, model, row, prompts, prefix, bar.update)
                grid_rows.append(images)
                result.images += [config.out / name for name in files_written]
            else:
                result.captions += _caption_row(pipe, config, row, image, bar.update)
        if grid_rows:
            result.grid = config.out / GRID_FILE
            _write_grid(tmp / GRID_FILE, grid_rows, rows, prompts, config, model)
        _write_records(tmp, config, model, prompts, rows, result)
    return result


def _read_image(path: Path):
    from .data import load_image

    return load_image(path)


def _render_row(pipe, config: SampleConfig, model: str, row: Row, prompts, prefix: Path, on_batch):
    """The row's images (prompt-major, seed-minor) and the names of their PNG files, PREFIX_pNN_seedS.png."""
    from .sampling import generate_images, save_png

    images, names = [], []
    settings = {"model": model, "num_inference_steps": config.num_inference_steps}
    settings["guidance_scale"] = config.guidance_scale
    for number, prompt in enumerate(prompts):
        batch = generate_images(
            pipe,
            prompt,
            config.num_images,
            seed=config.seed,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            on_batch=on_batch,
        )
        for i, image in enumerate(batch):
            seed = config.seed + i
            name = f"{prefix.name}_p{number:02d}_seed{seed}.png"
            save_png(image, prefix.parent / name, {"prompt": prompt, "seed": seed, **row.png_text(), **settings})
            names.append(name)
        images += batch
    return images, names


def _caption_row(pipe, config: SampleConfig, row: Row, image, on_batch) -> list[dict[str, object]]:
    from .sampling import generate_captions

    captions = generate_captions(
        pipe,
        image,
        config.num_images,
        seed=config.seed,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
    )
    on_batch(len(captions))
    return [
        {"row": row.label, **row.png_text(), "seed": config.seed + i, "caption": caption}
        for i, caption in enumerate(captions)
    ]


def _write_grid(path: Path, grid_rows, rows: list[Row], prompts, config: SampleConfig, model: str) -> None:
    from .sampling import image_grid, save_png

    columns = [f"{prompt} (seed {config.seed + i})" for prompt in prompts for i in range(config.num_images)]
    grid = image_grid(grid_rows, [r.label for r in rows], columns, min_cell_size=GRID_MIN_CELL)
    save_png(grid, path, {"model": model, "rows": json.dumps([r.label for r in rows]), "columns": json.dumps(columns)})


def _write_records(folder: Path, config: SampleConfig, model: str, prompts, rows: list[Row], result) -> None:
    """captions.txt / .json in i2t mode, and sample.json (settings, rows, files, timings) always."""
    if result.captions:
        lines = [f"{c['row']}\tseed {c['seed']}\t{c['caption']}" for c in result.captions]
        atomic_write_text(folder / "captions.txt", "\n".join(lines) + "\n")
        atomic_write_json(folder / "captions.json", result.captions)
    record = {
        "model": model,
        "mode": config.mode,
        "prompts": prompts,
        "image": str(config.image) if config.image else None,
        "rows": [{"label": r.label, "adapters": [str(c) for _, c in r.entries]} for r in rows],
        "images": [p.name for p in result.images],
        "timings_s": {"base_load": result.base_load_s, "adapter_load": result.adapter_load_s},
    }
    record["timings_s"]["switches"] = result.switch_s
    for name in ("seed", "num_images", "num_inference_steps", "guidance_scale", "mixed_precision", "quantize_base"):
        record[name] = getattr(config, name)
    atomic_write_json(folder / SAMPLE_MARKER, record)
