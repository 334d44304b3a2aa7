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
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import LoraDBError
from .eval_config import EvalConfig

__all__ = ["EvalConfig", "evaluate"]

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

    from .adapters import AdapterFile, LoraSpec
    from .config import TEXT_ENCODER_TARGETS

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
    from .adapters import read_adapter
    from .checkpoint import list_checkpoints
    from .train import ADAPTER_FILE

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


class ImageEmbedder:
    """Unit-length image embeddings from the pipeline's CLIP image encoder."""

    def __init__(self, pipe):
        self.encoder, self.processor = pipe.image_encoder, pipe.clip_image_processor

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device, dtype = self.encoder.device, self.encoder.dtype
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, dtype)
        return F.normalize(self.encoder(pixel_values=pixels).image_embeds.float(), dim=-1).cpu()


class ClipPair:
    """A matched CLIP text and image model (transformers `CLIPModel`) for CLIP-T."""

    def __init__(self, name: str):
        from transformers import AutoProcessor, CLIPModel

        path = _named_model(name)
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise _cannot_load("--clip-model", name, err) from None

    @torch.no_grad()
    def similarity(self, text: str, images: Sequence[Image.Image]) -> list[float]:
        inputs = self.processor(text=[text], images=list(images), return_tensors="pt", padding="max_length")
        text_out = self.model.text_model(input_ids=inputs["input_ids"]).pooler_output
        image_out = self.model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        text_embed = F.normalize(self.model.text_projection(text_out), dim=-1)
        image_embed = F.normalize(self.model.visual_projection(image_out), dim=-1)
        return (image_embed @ text_embed.T)[:, 0].tolist()


class DinoEmbedder:
    """CLS embeddings of a transformers ViT (the paper's DINO ViT-S/16), unit length."""

    def __init__(self, name: str):
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(name, use_safetensors=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise _cannot_load("--dino", name, err) from None

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)


def _named_model(name: str) -> str:
    if name == "tiny-world":
        from .tiny_world import asset_dir

        return str(asset_dir() / "clip")
    return name


def _cannot_load(option: str, name: str, err: Exception) -> LoraDBError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return LoraDBError(
        f"{option} {name}: cannot load it ({first}); offline, download it elsewhere "
        f"(`hf download {name} --local-dir DIR`) and pass {option} DIR"
    )


# -- metrics --------------------------------------------------------------------------------------------------------


def mean_cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (a_i, b_j) of unit vectors."""
    return (a @ b.T).mean().item()


def mean_pairwise_distance(a: torch.Tensor) -> float:
    """Mean 1 - cosine over the distinct pairs within one set of unit vectors."""
    n = a.shape[0]
    if n < 2:
        return float("nan")
    similarity = a @ a.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return 1.0 - (off_diagonal / (n * (n - 1))).item()


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of a_i with b_i (the same seed with and without an adapter)."""
    return (a * b).sum(-1).mean().item()


def clip_t_text(prompt: str, identifier: str | None) -> str:
    if not identifier:
        return prompt
    return re.sub(rf"\b{re.escape(identifier)}\b", "a", prompt)


@dataclass
class Reference:
    """Embeddings of the real photos, and the real-vs-real figures a user compares the rows with."""

    clip: torch.Tensor
    dino: torch.Tensor | None = None

    def summary(self) -> dict[str, float | None]:
        return {
            "clip_i": _self_similarity(self.clip),
            "dino": _self_similarity(self.dino) if self.dino is not None else None,
            "images": self.clip.shape[0],
        }


def _self_similarity(a: torch.Tensor) -> float:
    return 1.0 - mean_pairwise_distance(a)


def score_prompt(
    images: Sequence[Image.Image], prompt: str, reference: Reference, embed, dino=None, clip_pair=None, identifier=None
) -> dict[str, float | None]:
    embeddings = embed(images)
    return {
        "clip_i": mean_cross_similarity(embeddings, reference.clip),
        "dino": mean_cross_similarity(dino(images), reference.dino) if dino is not None else None,
        "clip_t": _mean(clip_pair.similarity(clip_t_text(prompt, identifier), images)) if clip_pair else None,
        "diversity": mean_pairwise_distance(embeddings),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


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

    from .data import find_images, load_image
    from .inference import AdapterSet, check_output_folder, default_device, quantize_for, resolve_model
    from .io import atomic_directory, atomic_write_json
    from .models import load_pipeline

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


def _square(photos: Sequence[Image.Image], size: int) -> list[Image.Image]:
    from .data import prepare_image

    return [prepare_image(photo, size) for photo in photos]


def _generate(pipe, prompt: str, config: EvalConfig, on_batch) -> list[Image.Image]:
    from .sampling import generate_images

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
    from .sampling import image_grid, save_png

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


PLOT_SERIES = (("clip_i", "CLIP-I (subject)", (200, 40, 40)), ("prior_similarity", "prior similarity", (40, 90, 200)))


def save_plot(path: Path, rows: list[dict], with_class: bool) -> Path:
    """Metrics against the training step (PIL line chart): where a run starts to overfit."""
    from .sampling import save_png

    series = {"clip_i": [], "prior_similarity": [], "diversity": []}
    base = next((r for r in rows if r["adapter"] == "none"), None)
    for row in sorted((r for r in rows if r["step"] is not None), key=lambda r: r["step"]):
        series["clip_i"].append((row["step"], row["clip_i"]))
        series["diversity"].append((row["step"], _mean([p["diversity"] for p in row["prompts"].values()])))
        if with_class and row["class"]:
            series["prior_similarity"].append((row["step"], row["class"]["prior_similarity"]))
    lines = [
        ("CLIP-I (subject fidelity)", (200, 40, 40), series["clip_i"]),
        ("prior similarity (class prompt vs base)", (40, 90, 200), series["prior_similarity"]),
        ("diversity", (60, 150, 60), series["diversity"]),
    ]
    references = [("base CLIP-I", (200, 40, 40), base["clip_i"])] if base else []
    return save_png(line_chart(lines, references, "training step"), path)


def line_chart(lines, references, x_label: str, width: int = 640, height: int = 400) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 20, 20, height - 90
    points = [p for _, _, values in lines for p in values]
    xs = [x for x, _ in points] or [0, 1]
    ys = [y for _, y in points] + [y for _, _, y in references]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys, default=0.0)), max(1.0, max(ys, default=1.0))

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((8, at(x0, y)[1] - 6), f"{y:.2f}", fill="black", font=font)
        draw.line((left, at(x0, y)[1], right, at(x0, y)[1]), fill=(230, 230, 230))
    for x in sorted(set(xs)):
        draw.text((at(x, y0)[0] - 8, bottom + 4), str(x), fill="black", font=font)
    draw.text(((left + right) // 2 - 30, bottom + 20), x_label, fill="black", font=font)
    for _, colour, y in references:
        _dashed(draw, at(x0, y), at(x1, y), colour)
    for _, colour, values in lines:
        coords = [at(x, y) for x, y in values]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
    legend = [(name, colour, "solid") for name, colour, values in lines if values]
    legend += [(name, colour, "dashed") for name, colour, _ in references]
    for n, (name, colour, style) in enumerate(legend):
        y = bottom + 40 + 14 * (n // 2)
        x = left + (n % 2) * 290
        if style == "solid":
            draw.line((x, y + 6, x + 20, y + 6), fill=colour, width=2)
        else:
            _dashed(draw, (x, y + 6), (x + 20, y + 6), colour)
        draw.text((x + 26, y), name, fill="black", font=font)
    return image


def _dashed(draw, start, end, colour, dash: float = 6.0) -> None:
    (xa, ya), (xb, yb) = start, end
    length = math.hypot(xb - xa, yb - ya)
    for k in range(int(length // (2 * dash)) + 1):
        a, b = 2 * k * dash / length, min(1.0, (2 * k + 1) * dash / length)
        draw.line((xa + (xb - xa) * a, ya + (yb - ya) * a, xa + (xb - xa) * b, ya + (yb - ya) * b), fill=colour)


# -- during training ------------------------------------------------------------------------------------------------


class TrainingEval:
    """`lora-db train --eval-steps K`: the same metrics on a few seeds, on the model being trained.

    Built before the first step (and before a resume restores weights), so its class-prompt samples are the
    base model's: prior similarity then compares each later step with the untrained model at the same seeds.
    """

    def __init__(self, pipe, photos: Sequence[Image.Image], prompts: Sequence[str], class_prompt: str | None, **gen):
        self.pipe, self.prompts, self.class_prompt, self.gen = pipe, list(prompts), class_prompt, gen
        self.embed = ImageEmbedder(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.reference = Reference(self.embed(_square(photos, size)))
        self.base_class = self._embed_samples(class_prompt) if class_prompt else None

    def _embed_samples(self, prompt: str) -> torch.Tensor:
        from .sampling import generate_images

        return self.embed(generate_images(self.pipe, prompt, **self.gen))

    def __call__(self, step: int) -> dict[str, float]:
        record: dict[str, float] = {"step": step}
        scores = []
        for prompt in self.prompts:
            embeddings = self._embed_samples(prompt)
            scores.append((mean_cross_similarity(embeddings, self.reference.clip), mean_pairwise_distance(embeddings)))
        record["eval/clip_i"] = _mean([clip_i for clip_i, _ in scores])
        record["eval/diversity"] = _mean([diversity for _, diversity in scores])
        if self.base_class is not None:
            class_embeds = self._embed_samples(self.class_prompt)
            record["eval/prior_similarity"] = paired_similarity(class_embeds, self.base_class)
            record["eval/class_diversity"] = mean_pairwise_distance(class_embeds)
        return record
