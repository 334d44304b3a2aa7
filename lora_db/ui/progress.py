"""What the page reads back from the commands' outputs: a run's steps and losses, its validation images, an
evaluation's table, the adapters in the workspace, the model card. Files only: the commands wrote them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_db.layout import ADAPTER_FILE, METRICS_FILE, list_checkpoints
from lora_db.ui.jobs import STATE_FOLDER

VALIDATION_GRID = re.compile(r"^step-(\d+)\.png$")
EVAL_FILE = "eval.json"
EVAL_PLOT = "metrics.png"
CARD_FILE = "README.md"


@dataclass
class RunProgress:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else 0


def run_progress(output: Path) -> RunProgress:
    """Steps and losses from metrics.jsonl (a line being written is skipped), and the checkpoints' steps."""
    progress = RunProgress()
    try:
        lines = (output / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        progress.steps.append(step)
        progress.losses.append(loss)
    progress.checkpoints = [int(path.name.split("-")[1]) for path in list_checkpoints(output)]
    return progress


def validation_images(output: Path) -> list[tuple[Path, int]]:
    """The validation grids (one per validation, all images of it side by side), newest first, with their step."""
    folder = output / "validation"
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = VALIDATION_GRID.match(path.name)
        if match:
            found.append((path, int(match.group(1))))
    return sorted(found, key=lambda item: -item[1])


@dataclass
class EvalTable:
    header: list[str]
    rows: list[list[object]]
    best: str | None
    plot: Path | None


def eval_table(out: Path) -> EvalTable | None:
    """`lora-db eval`'s eval.json as a table: one row per base, checkpoint and final adapter, the best one marked."""
    try:
        result = json.loads((out / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    best = (result.get("best_checkpoint") or {}).get("label")
    header = ["", "row", "step", "CLIP-I", "DINO", "pixel"]
    rows = []
    for row in result.get("rows", []):
        subject = row.get("subject") or {}
        scores = [None if subject.get(key) is None else round(subject[key], 3) for key in ("clip_i", "dino", "pixel")]
        rows.append(["best" if row.get("label") == best else "", row.get("label"), row.get("step"), *scores])
    plot = out / EVAL_PLOT
    return EvalTable(header, rows, best, plot if plot.is_file() else None)


def adapters_in(root: Path) -> list[Path]:
    """Every training run's final adapter in the workspace, newest first."""
    found = [
        path for path in root.rglob(ADAPTER_FILE) if STATE_FOLDER not in path.relative_to(root).parts and path.is_file()
    ]
    return sorted(found, key=lambda path: -path.stat().st_mtime)


def model_card(output: Path) -> str | None:
    """The run's README.md (its model card), its pictures pointed at the page's file route."""
    try:
        text = (output / CARD_FILE).read_text(encoding="utf-8")
    except OSError:
        return None
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)  # the hub's metadata block
    return re.sub(r"\]\((?!https?:|/)([^)\s]+)\)", lambda match: f"](/gradio_api/file={output / match.group(1)})", text)
