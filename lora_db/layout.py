"""Where a training run keeps its files: the names that training writes and that sample, eval and merge read.

OUTPUT_DIR/adapter.safetensors        the final adapter (lora_db.adapters.format)
OUTPUT_DIR/metrics.jsonl              one JSON object per optimizer step
OUTPUT_DIR/checkpoint-STEP/state.json the marker of a complete checkpoint (lora_db.training.checkpoint)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


CHECKPOINT_MARKER = "state.json"


ADAPTER_FILE = "adapter.safetensors"
RAW_ADAPTER_FILE = "adapter-raw.safetensors"  # --use-ema: the trained weights, beside their average in ADAPTER_FILE


def is_run_folder(path: Path) -> bool:
    """A `lora-db train` output folder: it holds its final adapter or a complete checkpoint."""
    return path.is_dir() and ((path / ADAPTER_FILE).is_file() or bool(list_checkpoints(path)))


METRICS_FILE = "metrics.jsonl"


ABANDONED_DIR = "abandoned"  # checkpoints retired by a resume from an earlier one, or written after a divergence


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _adapter_header(path: Path) -> dict:
    """The `__metadata__` of a safetensors file, read from its header alone (no tensors, no torch)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _first_metrics_row(path: Path) -> dict | None:
    try:
        with path.open(encoding="utf-8") as f:
            line = f.readline()
    except (OSError, ValueError):
        return None
    if not line.strip():
        return {"step": None}  # an empty metrics file: a run stopped before its first step
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def written_by_training(path: Path) -> bool:
    """Whether `path`, named like a file or folder that training writes into its output folder, holds what lora-db
    writes under that name: what `train --overwrite` may remove. Told by content, not by name, so a user's own
    `config.json` or `unet/` that happens to share a name is never taken for a run's file."""
    name = path.name
    if path.is_symlink():
        return False
    if name in (ADAPTER_FILE, RAW_ADAPTER_FILE):
        return path.is_file() and str(_adapter_header(path).get("format", "")).startswith("lora-db/")
    if name == METRICS_FILE:
        row = _first_metrics_row(path) if path.is_file() else None
        return row is not None and "step" in row
    if name == "config.json":
        return {"instance_prompt", "output_dir", "model"} <= _json_object(path).keys()
    if name == "summary.json":
        return {"steps", "output"} <= _json_object(path).keys()
    if name == "unet":
        return _json_object(path / "config.json").get("_class_name") == "UniDiffuserModel"
    if CHECKPOINT_PATTERN.match(name):
        return (path / CHECKPOINT_MARKER).is_file()
    if name == ABANDONED_DIR:
        return path.is_dir() and all(
            child.name.startswith("checkpoint-") and (child / CHECKPOINT_MARKER).is_file() for child in path.iterdir()
        )
    return False
