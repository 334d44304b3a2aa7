"""The model card (`README.md`) a run writes beside its adapter, as diffusers' trainers do with `save_model_card`.

It names the base model and instance prompt, shows how to sample and merge the adapter with lora-db, lists the
training options and embeds the last validation grid; `--push-to-hub` uploads it as the repository's front page.
A README.md that lora-db did not write is left alone.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lora_db.config.train import TrainConfig
from lora_db.io import atomic_write_text
from lora_db.version import __version__

logger = logging.getLogger("lora_db")

CARD_FILE = "README.md"
MARKER = "<!-- lora-db model card: `lora-db train` rewrites this file at the end of each run -->"
GRID = re.compile(r"step-(\d{6})\.png")


def latest_validation_grid(output_dir: Path) -> Path | None:
    folder = output_dir / "validation"
    grids = sorted(p for p in folder.glob("step-*.png") if GRID.fullmatch(p.name)) if folder.is_dir() else []
    return grids[-1] if grids else None


def model_card(config: TrainConfig, summary: dict[str, object], output: Path) -> str:

    concepts = config.concepts()
    base, prompt = config.model, concepts[0].instance_prompt or "captioned photos"
    variant = " + ".join(n for n, on in (("DoRA", config.use_dora), ("rsLoRA", config.use_rslora)) if on) or "LoRA"
    tags = ["lora-db", "unidiffuser", "dreambooth", "text-to-image", "lora" if config.method == "lora" else "full"]
    tags += [t for t, on in (("dora", config.use_dora), ("rslora", config.use_rslora)) if on]
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        f"instance_prompt: {json.dumps(prompt)}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        MARKER,
        "",
    ]
    title = (
        f"# {variant} DreamBooth of UniDiffuser: {prompt}"
        if config.method == "lora"
        else f"# UniDiffuser U-ViT fine-tuned on: {prompt}"
    )
    lines = [
        title,
        "",
        f"Trained with lora-db {__version__} on `{base}` for {summary['steps']} steps"
        + (f" with prior preservation ({config.class_prompt!r})" if config.class_prompt else "")
        + f"; final loss {_number(summary.get('final_loss'))}, {summary['trainable_parameters']:,} trained parameters.",
        "",
    ]
    if config.dataset_config is not None:
        lines += _concepts_table(concepts)
    grid = latest_validation_grid(config.output_dir)
    if grid is not None:
        relative = grid.relative_to(config.output_dir).as_posix()
        lines += ["## Validation", "", f"`{config.validation_prompt}` at step {int(GRID.fullmatch(grid.name)[1])}:", ""]
        lines += [f"![validation images]({relative})", ""]
    lines += _usage(config, output)
    lines += ["## Training options", "", "| option | value |", "| --- | --- |"]
    for name, value in config.to_dict().items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"| `--{name.replace('_', '-')}` | `{shown}` |")
    return "\n".join(front + lines) + "\n"


def _concepts_table(concepts) -> list[str]:
    lines = [
        "## Concepts",
        "",
        "| photos | instance prompt | repeats | weight | class prompt |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in concepts:
        prompt = c.instance_prompt or "(caption files)"
        lines.append(f"| `{c.folder.name}` | {prompt} | {c.repeats} | {c.weight:g} | {c.class_prompt or '-'} |")
    return [*lines, ""]


def _usage(config: TrainConfig, output: Path) -> list[str]:
    if config.method == "full":
        return [
            "## Use it",
            "",
            f"`{output.name}/` is a diffusers `UniDiffuserModel` folder: load it with "
            f'`UniDiffuserModel.from_pretrained("{output.name}")` and put it into the base pipeline as `unet`.',
            "",
        ]
    prompt = (config.validation_prompt or config.concepts()[0].instance_prompt or "a photo").replace('"', '\\"')
    return [
        "## Use it",
        "",
        "```bash",
        f'lora-db sample --model {config.model} --adapter {output.name} --prompt "{prompt}" --out samples',
        f"lora-db merge --model {config.model} --adapter {output.name} --out merged   # a stock diffusers pipeline",
        f"lora-db info {output.name}",
        "```",
        "",
        "From Python:",
        "",
        "```python",
        "import lora_db",
        f'pipe = lora_db.load_pipeline("{config.model}", adapters=["{output.name}"])',
        f'image = pipe(prompt="{prompt}").images[0]',
        "```",
        "",
    ]


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(config: TrainConfig, summary: dict[str, object], output: Path) -> Path | None:
    """OUTPUT_DIR/README.md, unless a README.md lora-db did not write is there (then a warning)."""
    path = config.output_dir / CARD_FILE
    if path.is_file() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        logger.warning("%s was not written by lora-db: the model card is not written over it", path)
        return None
    return atomic_write_text(path, model_card(config, summary, output))
