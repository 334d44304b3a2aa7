"""Where a training run keeps its files: the names that training writes and that sample, eval and merge read.

OUTPUT_DIR/adapter.safetensors        the final adapter (lora_db.adapters.format)
OUTPUT_DIR/metrics.jsonl              one JSON object per optimizer step
OUTPUT_DIR/checkpoint-STEP/state.json the marker of a complete checkpoint (lora_db.training.checkpoint)
"""

from __future__ import annotations

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


METRICS_FILE = "metrics.jsonl"
