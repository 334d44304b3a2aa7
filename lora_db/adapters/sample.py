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
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet, default_device, quantize_for, resolve_model
from lora_db.adapters.layers import check_summable
from lora_db.config.commands import SampleConfig, WeightedAdapter
from lora_db.errors import LoraDBError
from lora_db.images import image_grid, load_image, save_png
from lora_db.io import atomic_directory, atomic_write_json, atomic_write_text, check_output_folder
from lora_db.locks import output_lock
from lora_db.models.loading import load_pipeline as load_base
from lora_db.models.loading import load_unet_config, native_resolution
from lora_db.models.memory import check_mixed_precision, weight_dtype
from lora_db.models.quantize import check_quantization
from lora_db.models.sampling import generate_captions, generate_images

logger = logging.getLogger("lora_db")

SAMPLE_MARKER = "sample.json"
GRID_FILE = "grid.png"
GRID_MIN_CELL = 128  # pixels: tiny-model samples are enlarged in the grid so their labels stay readable


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


def check_size(config: SampleConfig, model: str) -> None:

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
        check_quantization(config.quantize_base, device, dtype)
    check_size(config, model)
    with output_lock(config.out, "--out"):
        check_output_folder(config.out, config.overwrite, SAMPLE_MARKER)
        return _sample(config, files, model, prompts, image, device)


def _sample(config: SampleConfig, files, model: str, prompts: list[str], image, device) -> SampleResult:
    from tqdm.auto import tqdm

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
        atomic_directory(config.out, replace=config.overwrite, record=True) as tmp,
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

    return load_image(path)


def _render_row(pipe, config: SampleConfig, model: str, row: Row, prompts, prefix: Path, on_batch):
    """The row's images (prompt-major, seed-minor) and the names of their PNG files, PREFIX_pNN_seedS.png."""

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
    """A row per adapter, a column per prompt and seed, titled with the prompt (or the prompts, in column order)."""
    seeds = [f"seed {config.seed + i}" for i in range(config.num_images)]
    columns = seeds if len(prompts) == 1 else [f"{prompt} ({seed})" for prompt in prompts for seed in seeds]
    title = "; ".join(prompts)
    grid = image_grid(grid_rows, [r.label for r in rows], columns, min_cell_size=GRID_MIN_CELL, title=title)
    labels = {"rows": json.dumps([r.label for r in rows]), "columns": json.dumps(columns)}
    save_png(grid, path, {"model": model, "title": title, **labels})


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
