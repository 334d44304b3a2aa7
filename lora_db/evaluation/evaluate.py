"""`lora-db eval`: DreamBooth's subject-fidelity, prompt-fidelity, prior-drift and diversity metrics.

Each row (the base model, each adapter, each checkpoint of a run folder) generates `num_images` samples per prompt
at seeds seed, seed+1, ... from one loaded base (adapters are hot-swapped), and is scored with:

- CLIP-I (subject fidelity): mean cosine similarity between the image embeddings of every generated sample and every
  real instance photo, using the pipeline's own CLIP image encoder (its projected `image_embeds`). The DreamBooth
  paper's definition, with its encoder (CLIP ViT-B/32 for thu-ml/unidiffuser-v1).
- DINO (`--dino MODEL`, e.g. facebook/dino-vits16): the same mean over the CLS embeddings of a transformers ViT.
  The paper reports DINO 0.668 for Stable Diffusion DreamBooth and 0.774 between real photos of one subject.
- CLIP-T (`--clip-model`): mean cosine similarity between the prompt's text embedding and each sample's image
  embedding with a matched CLIP pair; `--identifier sks` is replaced by "a" in the prompt first, since no CLIP
  knows the identifier. Absent (null) without `--clip-model`.
- prior similarity (`--class-prompt`): mean cosine similarity (pipeline's CLIP image encoder) between the row's
  class-prompt sample and the base model's class-prompt sample at the same seed; 1.0 is no drift at all.
  What prior preservation protects.
- diversity: mean pairwise cosine distance (1 - cosine) between a row's samples of one prompt.

The same settings give the same numbers (per-image seeded CPU generators, deterministic on CPU).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet, default_device, quantize_for, resolve_model
from lora_db.adapters.spec import AdapterFile, LoraSpec
from lora_db.config.evaluate import EvalConfig
from lora_db.config.train import TEXT_ENCODER_TARGETS
from lora_db.errors import LoraDBError
from lora_db.evaluation.metrics import (
    ClipPair,
    DinoEmbedder,
    ImageEmbedder,
    Reference,
    _mean,
    _square,
    mean_pairwise_distance,
    paired_similarity,
    score_prompt,
)
from lora_db.evaluation.plot import save_plot
from lora_db.images import find_images, image_grid, load_image, save_png
from lora_db.io import atomic_directory, atomic_write_json, check_output_folder
from lora_db.layout import ADAPTER_FILE, list_checkpoints
from lora_db.models.loading import load_pipeline
from lora_db.models.sampling import generate_images

EVAL_MARKER = "eval.json"
GRID_MIN_CELL = 96


# -- what is evaluated ----------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One row: the base model (adapter None) or one adapter, from a file or a run's checkpoint."""

    label: str
    adapter: object = None  # an adapters.AdapterFile
    step: int | None = None
    source: str = "none"


def checkpoint_adapter(checkpoint: Path, run_config: dict):
    """A training checkpoint's LoRA weights as an AdapterFile, with the spec from the run's config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
    except (OSError, SafetensorError) as err:
        raise LoraDBError(f"{checkpoint}: unreadable trainable.safetensors ({err})") from None
    rank, alpha = int(run_config["rank"]), float(run_config.get("alpha") or run_config["rank"])
    dropout = float(run_config.get("lora_dropout", 0.0))
    targets = {"unet": tuple(run_config["target_modules"]), "text_encoder": TEXT_ENCODER_TARGETS}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in trainable.items():
        component, _, name = key.partition(".")
        # Parameter names carry peft's adapter name ("lora_A.default.weight"); files do not.
        tensors.setdefault(component, {})[name.replace(".default.", ".")] = tensor
    variant = {"use_dora": bool(run_config.get("use_dora")), "use_rslora": bool(run_config.get("use_rslora"))}
    specs = {c: LoraSpec(rank, alpha, targets[c], dropout, **variant) for c in tensors}
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    metadata = {"base_model": run_config.get("model", ""), "steps": str(step)}
    return AdapterFile(path=checkpoint, tensors=tensors, specs=specs, metadata=metadata)


def expand_adapters(values: Sequence[str]) -> list[Candidate]:
    """The base, then each --adapter: a file, or a run folder's checkpoints (by step) and its final adapter."""

    candidates = [Candidate("base")]
    for value in values:
        if value.strip().lower() == "none":
            continue
        path = Path(value)
        if path.is_dir():
            candidates += _run_candidates(path, list_checkpoints(path), ADAPTER_FILE, read_adapter)
        else:
            adapter = read_adapter(path)
            step = int(adapter.metadata["steps"]) if adapter.metadata.get("steps", "").isdigit() else None
            stem = path.parent.name if path.name == ADAPTER_FILE and path.parent.name else path.stem
            candidates.append(Candidate(_slug(stem), adapter, step, str(path)))
    labels = [c.label for c in candidates]
    for n, candidate in enumerate(candidates):
        if labels.count(candidate.label) > 1:
            candidate.label = f"{candidate.label}-{n}"
    return candidates


def _run_candidates(run: Path, checkpoints: list[Path], adapter_file: str, read_adapter) -> list[Candidate]:
    config_path = run / "config.json"
    final = run / adapter_file
    if not checkpoints and not final.is_file():
        raise LoraDBError(f"--adapter {run}: no {adapter_file} and no checkpoint-N folder in it; not a lora-db run")
    try:
        run_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise LoraDBError(f"--adapter {run}: cannot read its config.json ({err})") from None
    if run_config.get("method", "lora") != "lora":
        raise LoraDBError(f"--adapter {run}: a --method full run has no adapter; evaluate a LoRA run")
    name = _slug(run.name)
    candidates = []
    for checkpoint in checkpoints:
        adapter = checkpoint_adapter(checkpoint, run_config)
        step = int(adapter.metadata["steps"])
        candidates.append(Candidate(f"{name}-step{step}", adapter, step, str(checkpoint)))
    if final.is_file():
        adapter = read_adapter(final)
        step = int(adapter.metadata.get("steps", "0") or 0)
        if not any(c.step == step for c in candidates):  # the last checkpoint often is the final adapter
            candidates.append(Candidate(f"{name}-step{step}", adapter, step, str(final)))
    return candidates


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]", "_", text) or "adapter"


# -- embeddings -----------------------------------------------------------------------------------------------------


# -- metrics --------------------------------------------------------------------------------------------------------


# -- the run --------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    out: Path
    rows: list[dict]
    reference: dict
    grids: list[Path] = field(default_factory=list)
    plot: Path | None = None


def evaluate(config: EvalConfig, on_progress: Callable[[int], None] | None = None) -> EvalResult:
    """`lora-db eval`: every check first, then the base once, then each row's samples and scores."""
    from tqdm.auto import tqdm

    candidates = expand_adapters(config.adapters)
    model = resolve_model(config.model, [c.adapter for c in candidates if c.adapter is not None])
    photos = [load_image(path) for path in find_images(config.instance_dir, "--instance-dir")]
    check_output_folder(config.out, config.overwrite, EVAL_MARKER)
    clip_pair = ClipPair(config.clip_model) if config.clip_model else None
    dino = DinoEmbedder(config.dino) if config.dino else None

    pipe = load_pipeline(model)
    files = [c.adapter for c in candidates if c.adapter is not None]
    quantize_for(pipe, files, config.quantize_base, torch.float32, default_device())  # before any adapter
    pipe.to(default_device())
    pipe.set_progress_bar_config(disable=True)
    adapters = AdapterSet(pipe)
    embed = ImageEmbedder(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    reference = Reference(embed(_square(photos, size)), dino(_square(photos, size)) if dino else None)
    prompts = list(config.prompts) + ([config.class_prompt] if config.class_prompt else [])
    started = time.perf_counter()
    rows, samples = [], {}
    with (
        atomic_directory(config.out, replace=config.overwrite) as tmp,
        tqdm(total=len(candidates) * len(prompts) * config.num_images, desc="eval", unit="img") as bar,
    ):
        base_class = None
        for candidate in candidates:
            if candidate.adapter is not None:
                adapters.load(candidate.adapter, name=candidate.label)
            adapters.activate({candidate.label: 1.0} if candidate.adapter is not None else {})
            images = {p: _generate(pipe, p, config, bar.update) for p in prompts}
            samples[candidate.label] = images
            row = _score_row(candidate, images, config, reference, embed, dino, clip_pair)
            if config.class_prompt:
                class_embeds = embed(images[config.class_prompt])
                base_class = class_embeds if base_class is None else base_class
                row["class"] = {
                    "prior_similarity": paired_similarity(class_embeds, base_class),
                    "diversity": mean_pairwise_distance(class_embeds),
                }
            rows.append(row)
            if on_progress is not None:
                on_progress(len(rows))
        result = EvalResult(config.out, rows, reference.summary())
        result.grids = _write_grids(tmp, config.out, samples, prompts, config, _square(photos, size))
        if any(row["step"] is not None for row in rows):
            result.plot = config.out / "metrics.png"
            save_plot(tmp / "metrics.png", rows, bool(config.class_prompt))
        atomic_write_json(
            tmp / EVAL_MARKER,
            {
                "model": model,
                "settings": {
                    name: getattr(config, name)
                    for name in (
                        "prompts",
                        "class_prompt",
                        "num_images",
                        "seed",
                        "num_inference_steps",
                        "guidance_scale",
                        "clip_model",
                        "dino",
                        "identifier",
                        "quantize_base",
                    )
                },
                "instance_dir": str(config.instance_dir),
                "reference": result.reference,
                "rows": rows,
                "generation_s": time.perf_counter() - started,
            },
        )
    return result


def _generate(pipe, prompt: str, config: EvalConfig, on_batch) -> list[Image.Image]:

    return generate_images(
        pipe,
        prompt,
        config.num_images,
        seed=config.seed,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        on_batch=on_batch,
    )


def _score_row(candidate: Candidate, images, config: EvalConfig, reference, embed, dino, clip_pair) -> dict:
    prompts = {
        prompt: score_prompt(images[prompt], prompt, reference, embed, dino, clip_pair, config.identifier)
        for prompt in config.prompts
    }
    return {
        "label": candidate.label,
        "adapter": candidate.source,
        "step": candidate.step,
        "prompts": prompts,
        "clip_i": _mean([p["clip_i"] for p in prompts.values()]),
        "class": None,
    }


def _write_grids(tmp: Path, out: Path, samples: dict, prompts: list[str], config: EvalConfig, photos) -> list[Path]:
    """grid-NN.png per prompt (a row per model, a column per seed), instance.png (the real photos)."""

    paths = []
    labels = list(samples)
    columns = [f"seed {config.seed + i}" for i in range(config.num_images)]
    for number, prompt in enumerate(prompts):
        grid = image_grid([samples[label][prompt] for label in labels], labels, columns, min_cell_size=GRID_MIN_CELL)
        name = f"grid-{number:02d}.png"
        save_png(grid, tmp / name, {"prompt": prompt, "rows": json.dumps(labels)})
        paths.append(out / name)
        for label in labels:
            for i, image in enumerate(samples[label][prompt]):
                save_png(
                    image, tmp / "samples" / f"{label}_p{number:02d}_seed{config.seed + i}.png", {"prompt": prompt}
                )
    save_png(image_grid([photos], ["real photos"], min_cell_size=GRID_MIN_CELL), tmp / "instance.png")
    return [*paths, out / "instance.png"]


# -- output ---------------------------------------------------------------------------------------------------------


def table_lines(result: EvalResult) -> list[str]:
    """The stdout table: one line per row and prompt, the class-prompt figures on each row's first line."""
    has = {
        key: any(p[key] is not None for r in result.rows for p in r["prompts"].values()) for key in ("dino", "clip_t")
    }
    header = (
        ["row", "step", "prompt", "CLIP-I"] + (["DINO"] if has["dino"] else []) + (["CLIP-T"] if has["clip_t"] else [])
    )
    header += ["div", "prior sim", "class div"]
    lines = [header]
    for row in result.rows:
        for n, (prompt, score) in enumerate(row["prompts"].items()):
            cells = [row["label"] if n == 0 else "", "" if row["step"] is None else str(row["step"]), prompt]
            cells.append(f"{score['clip_i']:.3f}")
            cells += [f"{score['dino']:.3f}"] if has["dino"] else []
            cells += [f"{score['clip_t']:.3f}"] if has["clip_t"] else []
            cells.append(f"{score['diversity']:.3f}")
            klass = row["class"] if n == 0 and row["class"] else None
            cells += [f"{klass['prior_similarity']:.3f}", f"{klass['diversity']:.3f}"] if klass else ["", ""]
            lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    ref = result.reference
    text.append(
        f"real photos among themselves ({ref['images']}): CLIP-I {ref['clip_i']:.3f}"
        + (f", DINO {ref['dino']:.3f}" if ref["dino"] is not None else "")
    )
    if not has["clip_t"]:
        text.append("CLIP-T: not measured (pass --clip-model, a CLIP text/image pair)")
    return text


# -- during training ------------------------------------------------------------------------------------------------
