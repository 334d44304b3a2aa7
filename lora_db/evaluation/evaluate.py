"""`lora-db eval`: DreamBooth's subject-fidelity, prompt-fidelity, prior-drift and diversity metrics, and where the
adapter rows stand.

Each row (the base model, each adapter, each checkpoint of a run folder) generates `num_images` samples per prompt
at seeds seed, seed+1, ... from one loaded base (adapters are hot-swapped), and is scored with:

- CLIP-I: mean cosine similarity between the image embeddings of every generated sample and every real instance
  photo, with the pipeline's own CLIP image encoder (its projected `image_embeds`), the DreamBooth paper's
  definition. Partly circular on UniDiffuser, whose image latent contains that very embedding.
- DINO: the same mean over the CLS embeddings of a judge, a transformers ViT training never sees: `--dino MODEL`
  (e.g. facebook/dino-vits16), else the model folder's own `judge/` (tiny-world ships one). Never the pipeline's
  image encoder (refused). The paper reports DINO 0.668 for Stable Diffusion DreamBooth, 0.774 between real photos.
- pixel (no model): each sample's similarity to the nearest instance photo at 16 x 16 (1 - RMS difference / 2 on
  [-1, 1] RGB), averaged over samples.
- CLIP-T (`--clip-model`): mean cosine similarity between the prompt's text embedding and each sample's image
  embedding with a matched CLIP pair; the identifier is replaced by "a" in the prompt first, since no CLIP knows
  it. Absent (null) without `--clip-model`.
- prior similarity (`--class-prompt`): mean cosine similarity (pipeline's CLIP image encoder) between the row's
  class-prompt sample and the base model's class-prompt sample at the same seed; 1.0 is no drift at all.
  What prior preservation protects.
- diversity: mean pairwise cosine distance (1 - cosine) between a row's samples of one prompt.

A prompt that contains the identifier (`--identifier`, else the word an adapter's instance prompt adds to its class
prompt) is a subject prompt; the others are control prompts, never averaged into subject fidelity. Beside the rows,
per subject prompt: the photos among themselves, the ceiling (photos through the VAE) and the `--describe` row
(lora_db.evaluation.standing). The same settings give the same numbers (per-image seeded CPU generators).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet, default_device, quantize_for, resolve_model
from lora_db.adapters.spec import AdapterFile, checked_adapter, parse_spec
from lora_db.adapters.tokens import TOKENS_PREFIX, TRAINED_TOKEN_SUFFIX
from lora_db.config.evaluate import EvalConfig
from lora_db.config.train import TEXT_ENCODER_TARGETS
from lora_db.errors import LoraDBError
from lora_db.evaluation.judge import load_judge, resolve_judge
from lora_db.evaluation.metrics import (
    ClipPair,
    ImageEmbedder,
    SubjectScorer,
    _square,
    identifier_of,
    is_subject_prompt,
    mean_pairwise_distance,
    paired_similarity,
    score_prompt,
)
from lora_db.evaluation.plot import METRIC_NAMES, save_plot
from lora_db.evaluation.standing import (
    best_checkpoint,
    pair_descriptions,
    standing_rows,
    subject_fidelity,
    vae_round_trip,
)
from lora_db.images import find_images, image_grid, load_image, save_png
from lora_db.io import atomic_directory, atomic_write_json, check_output_folder
from lora_db.layout import ADAPTER_FILE, list_checkpoints
from lora_db.locks import output_lock
from lora_db.models.loading import load_pipeline
from lora_db.models.sampling import generate_images

EVAL_MARKER = "eval.json"
GRID_MIN_CELL = 96
TRAIN_CONFIG_KEYS = {"rank": "rank", "alpha": "alpha", "targets": "target_modules", "dropout": "lora_dropout"}
REAL_PHOTOS, CEILING = "real photos", "ceiling (VAE round trip)"  # the grid rows above a subject prompt's models


# -- what is evaluated ----------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One row: the base model (adapter None) or one adapter, from a file or a run's checkpoint."""

    label: str
    adapter: object = None  # an adapters.AdapterFile
    step: int | None = None
    source: str = "none"


def checkpoint_adapter(checkpoint: Path, run_config: dict):
    """A training checkpoint's LoRA weights as an AdapterFile, with the spec from the run's config.json, checked as
    every adapter is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    # With --use-ema the run's adapter is the average: score the checkpoint's average too.
    name = "ema.safetensors" if (checkpoint / "ema.safetensors").is_file() else "trainable.safetensors"
    try:
        trainable = load_file(str(checkpoint / name))
    except (OSError, SafetensorError) as err:
        raise LoraDBError(f"{checkpoint}: unreadable {name} ({err})") from None
    where = str(checkpoint.parent / "config.json")
    # peft's adapter name: `.default.weight` of LoRA, `.default` at the end of LoKr's and LoHa's tensors
    flat = {key.replace(".default.", ".").removesuffix(".default"): tensor for key, tensor in trainable.items()}
    for key in [k for k in flat if k.endswith(TRAINED_TOKEN_SUFFIX)]:  # pivotal tuning's token row
        flat[TOKENS_PREFIX + str(run_config.get("train_token"))] = flat.pop(key)[0]
    components = dict.fromkeys(key.partition(".")[0] for key in flat if not key.startswith(TOKENS_PREFIX))
    unet = parse_spec(run_config, where, TRAIN_CONFIG_KEYS, kind=run_config.get("adapter_type") or "lora")
    specs = {"unet": unet, "text_encoder": replace(unet, target_modules=TEXT_ENCODER_TARGETS)}
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    metadata = {
        "base_model": str(run_config.get("model") or ""),
        "steps": str(step),
        "instance_prompt": str(run_config.get("instance_prompt") or ""),
        "class_prompt": str(run_config.get("class_prompt") or ""),
    }
    return checked_adapter(checkpoint, flat, {c: specs.get(c) or unet for c in components}, metadata)


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
    if not isinstance(run_config, dict):
        raise LoraDBError(f"--adapter {run}: its config.json is not a table of options; not a lora-db run")
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


# -- prompts --------------------------------------------------------------------------------------------------------


def subject_identifiers(identifier: str | None, adapters: Sequence[AdapterFile], class_prompt: str | None) -> list[str]:
    """--identifier, else each adapter's: the word its instance prompt adds to its class prompt (or to --class-prompt
    when it trained without one). Empty when none is known: every prompt is then a subject prompt."""
    if identifier:
        return [identifier]
    found = (
        identifier_of(a.metadata.get("instance_prompt", ""), a.metadata.get("class_prompt") or class_prompt or "")
        for a in adapters
    )
    return sorted({word for word in found if word})


def split_prompts(prompts: Sequence[str], identifiers: Sequence[str], explicit: bool) -> tuple[list[str], list[str]]:
    """(subject prompts, control prompts); refuses prompts none of which names the subject."""
    subject = [p for p in prompts if is_subject_prompt(p, identifiers)]
    if not subject:
        source = "--identifier" if explicit else "the adapters' instance and class prompts"
        raise LoraDBError(
            f"no --prompt contains the identifier {' or '.join(identifiers)} (from {source}): add a prompt that names "
            "the subject, or pass --identifier with the word your prompts use"
        )
    return subject, [p for p in prompts if p not in subject]


# -- the run --------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    out: Path
    rows: list[dict]
    reference: dict  # the photos among themselves
    standing: dict = field(default_factory=dict)  # subject prompt -> photos, ceiling, describe
    subject_prompts: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    judge: dict | None = None  # which encoder scored the DINO column
    best: dict | None = None  # the best checkpoint by the subject prompts
    grids: list[Path] = field(default_factory=list)
    plot: Path | None = None


def evaluate(config: EvalConfig, on_progress: Callable[[int], None] | None = None) -> EvalResult:
    """`lora-db eval`: every check first, then the base once, the reference rows, then each row's samples and scores."""
    with output_lock(config.out, "--out"):
        return _evaluate(config, on_progress)


def _evaluate(config: EvalConfig, on_progress: Callable[[int], None] | None) -> EvalResult:
    from tqdm.auto import tqdm

    candidates = expand_adapters(config.adapters)
    files = [c.adapter for c in candidates if c.adapter is not None]
    model = resolve_model(config.model, files)
    identifiers = subject_identifiers(config.identifier, files, config.class_prompt)
    subject_prompts, _ = split_prompts(config.prompts, identifiers, bool(config.identifier))
    descriptions = pair_descriptions(subject_prompts, config.describe)
    photos = [load_image(path) for path in find_images(config.instance_dir, "--instance-dir")]
    check_output_folder(config.out, config.overwrite, EVAL_MARKER)
    clip_pair = ClipPair(config.clip_model) if config.clip_model else None
    judge_choice = resolve_judge(config.dino, model)

    pipe = load_pipeline(model)
    quantize_for(pipe, files, config.quantize_base, torch.float32, default_device())  # before any adapter
    pipe.to(default_device())
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(judge_choice, pipe) if judge_choice else None
    adapters = AdapterSet(pipe)
    embed = ImageEmbedder(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    square = _square(photos, size)
    scorer = SubjectScorer(square, embed, judge)
    ceiling = vae_round_trip(pipe, square)

    def score(images: list[Image.Image], prompt: str) -> dict:
        return score_prompt(images, prompt, scorer, clip_pair, identifiers)

    prompts = list(config.prompts) + ([config.class_prompt] if config.class_prompt else [])
    described_texts = list(dict.fromkeys(d for d in descriptions.values() if d))
    images_total = (len(candidates) * len(prompts) + len(described_texts)) * config.num_images
    started = time.perf_counter()
    rows, samples = [], {}
    with (
        atomic_directory(config.out, replace=config.overwrite, record=True) as tmp,
        tqdm(total=images_total, desc="eval", unit="img") as bar,
    ):
        # No adapter is loaded yet: the descriptions are the base model's.
        described = {text: _generate(pipe, text, config, bar.update) for text in described_texts}
        standing = standing_rows(scorer, ceiling, {p: (d, described.get(d)) for p, d in descriptions.items()}, score)
        base_class = None
        for candidate in candidates:
            if candidate.adapter is not None:
                adapters.load(candidate.adapter, name=candidate.label)
            adapters.activate({candidate.label: 1.0} if candidate.adapter is not None else {})
            images = {p: _generate(pipe, p, config, bar.update) for p in prompts}
            samples[candidate.label] = images
            row = {
                "label": candidate.label,
                "adapter": candidate.source,
                "step": candidate.step,
                "prompts": {prompt: score(images[prompt], prompt) for prompt in config.prompts},
                "class": None,
            }
            row["subject"] = subject_fidelity(row, subject_prompts)
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
        metric = "dino" if judge is not None else "clip_i"
        result = EvalResult(
            config.out,
            rows,
            scorer.photos_among_themselves() | {"images": len(photos)},
            standing,
            subject_prompts,
            identifiers,
            {"name": judge_choice.name, "path": judge_choice.path, "source": judge_choice.source} if judge else None,
            best_checkpoint(rows, subject_prompts, metric),
        )
        references = {REAL_PHOTOS: square, CEILING: ceiling}
        references |= {f"describe: {text}": images for text, images in described.items()}
        result.grids = _write_grids(tmp, config, samples, prompts, subject_prompts, descriptions, references)
        if any(row["step"] is not None for row in rows):
            result.plot = config.out / "metrics.png"
            save_plot(tmp / "metrics.png", rows, standing, metric, bool(config.class_prompt), result.best)
        atomic_write_json(tmp / EVAL_MARKER, _record(config, model, result, time.perf_counter() - started))
    return result


SETTINGS = (
    "prompts",
    "class_prompt",
    "describe",
    "num_images",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "clip_model",
    "dino",
    "identifier",
    "quantize_base",
)


def _record(config: EvalConfig, model: str, result: EvalResult, generation_s: float) -> dict:
    """eval.json."""
    return {
        "model": model,
        "settings": {name: getattr(config, name) for name in SETTINGS},
        "instance_dir": str(config.instance_dir),
        "judge": result.judge,
        "identifiers": result.identifiers,
        "subject_prompts": result.subject_prompts,
        "control_prompts": [p for p in config.prompts if p not in result.subject_prompts],
        "reference": result.reference,
        "standing": result.standing,
        "best_checkpoint": result.best,
        "rows": result.rows,
        "generation_s": generation_s,
    }


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


def grid_title(prompt: str, config: EvalConfig, subject_prompts: Sequence[str]) -> str:
    """A grid's title: its prompt, and what kind of prompt it is."""
    if prompt in subject_prompts:
        return f"{prompt} (subject prompt)"
    if prompt in config.prompts:
        return f"{prompt} (control prompt)"
    return f"{prompt} (class prompt)"


def _write_grids(
    tmp: Path,
    config: EvalConfig,
    samples: dict,
    prompts: list[str],
    subject_prompts: list[str],
    descriptions: dict[str, str | None],
    references: dict[str, list[Image.Image]],
) -> list[Path]:
    """grid-NN.png per prompt, titled with it (a row per model, a column per seed; a subject prompt's grid starts
    with the photos, the ceiling and its description), instance.png (the real photos), every sample."""
    paths = []
    columns = [f"seed {config.seed + i}" for i in range(config.num_images)]
    for number, prompt in enumerate(prompts):
        rows = {label: images[prompt] for label, images in samples.items()}
        if prompt in subject_prompts:
            description = descriptions[prompt]
            standing = ["real photos", "ceiling (VAE round trip)"] + (
                [f"describe: {description}"] if description else []
            )
            rows = {label: references[label] for label in standing} | rows
        title = grid_title(prompt, config, subject_prompts)
        grid = image_grid(list(rows.values()), list(rows), columns, min_cell_size=GRID_MIN_CELL, title=title)
        name = f"grid-{number:02d}.png"
        save_png(grid, tmp / name, {"prompt": prompt, "title": title, "rows": json.dumps(list(rows))})
        paths.append(config.out / name)
        for label, images in samples.items():
            for i, image in enumerate(images[prompt]):
                save_png(
                    image, tmp / "samples" / f"{label}_p{number:02d}_seed{config.seed + i}.png", {"prompt": prompt}
                )
        if prompt in subject_prompts and descriptions[prompt]:
            for i, image in enumerate(references[f"describe: {descriptions[prompt]}"]):
                name = f"describe_p{number:02d}_seed{config.seed + i}.png"
                save_png(image, tmp / "samples" / name, {"prompt": descriptions[prompt]})
    for i, image in enumerate(references[CEILING]):
        save_png(image, tmp / "samples" / f"ceiling_photo{i:02d}.png")
    save_png(image_grid([references[REAL_PHOTOS]], [REAL_PHOTOS], min_cell_size=GRID_MIN_CELL), tmp / "instance.png")
    return [*paths, config.out / "instance.png"]


# -- output ---------------------------------------------------------------------------------------------------------


def table_lines(result: EvalResult) -> list[str]:
    """The stdout table: per subject prompt its reference rows (photos, ceiling, describe), then one line per model
    row and prompt (control prompts marked), the class-prompt figures on each row's first line."""
    has_clip_t = any(p["clip_t"] is not None for r in result.rows for p in r["prompts"].values())
    dino = f"DINO ({result.judge['name']})" if result.judge else None
    header = ["row", "step", "prompt", "CLIP-I"] + ([dino] if dino else []) + ["pixel"]
    header += (["CLIP-T"] if has_clip_t else []) + ["div", "prior sim", "class div"]

    def cells(label: str, step, prompt: str, score: dict, klass: dict | None) -> list[str]:
        kind = "" if prompt in result.subject_prompts else " (control)"
        line = [label, "" if step is None else str(step), prompt + kind, _number(score["clip_i"])]
        line += [_number(score["dino"])] if dino else []
        line.append(_number(score["pixel"]))
        line += [_number(score["clip_t"])] if has_clip_t else []
        line.append(_number(score["diversity"]))
        return line + ([_number(klass["prior_similarity"]), _number(klass["diversity"])] if klass else ["", ""])

    lines = [header]
    for prompt, standing in result.standing.items():
        for name in ("photos", "ceiling", "describe"):
            if standing[name] is not None:
                lines.append(cells(name, None, prompt, {"clip_t": None} | standing[name], None))
    for row in result.rows:
        for n, (prompt, score) in enumerate(row["prompts"].items()):
            lines.append(
                cells(row["label"] if n == 0 else "", row["step"], prompt, score, row["class"] if n == 0 else None)
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.append(
        f"photos: the {result.reference['images']} real photos, each against the others; ceiling: each photo after a "
        "round trip through the VAE, against the others"
    )
    for prompt, standing in result.standing.items():
        if standing["describe"] is not None:
            text.append(f'describe: the base model sampling "{standing["describe"]["description"]}" for "{prompt}"')
    if result.identifiers:
        text.append(f"subject prompts name {' or '.join(result.identifiers)}; the others are control prompts")
    if result.best is not None:
        best = result.best
        text.append(
            f"best checkpoint: {best['label']} (step {best['step']}, {METRIC_NAMES[best['metric']]} "
            f"{_number(best['score'])} on the subject prompts)"
        )
    if result.judge is None:
        text.append("DINO: no judge (pass --dino, e.g. facebook/dino-vits16, or use a model folder with a judge/)")
    if not has_clip_t:
        text.append("CLIP-T: not measured (pass --clip-model, a CLIP text/image pair)")
    return text


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
