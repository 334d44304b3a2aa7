"""Resumable training checkpoints, stored without pickle.

`OUTPUT_DIR/checkpoint-STEP/` holds the trainable weights (`trainable.safetensors`), the optimizer state
(tensors in `optimizer.safetensors`, the rest in `state.json`), the learning-rate scheduler, each process's
RNG states (`rng.safetensors`), fp16's loss-scaler state (in `state.json`) and the step. A folder is written
under a temporary name and renamed when complete, so a crash mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LoraDBError
from .io import atomic_directory

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = "state.json"


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    scaler: dict[str, Any] | None = None  # fp16's GradScaler: scale and growth tracker (plain numbers)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`latest` -> newest checkpoint or None if there is none yet; otherwise a folder that must be one."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise LoraDBError(
            f"--resume-from-checkpoint {resume}: folder not found; pass `latest` or a checkpoint-N folder"
        )
    if not (path / MARKER).is_file():
        raise LoraDBError(f"--resume-from-checkpoint {resume}: not a complete lora-db checkpoint (no {MARKER})")
    return path


def _flatten(tree: Mapping[str, Any], prefix: str, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    """Split a nested dict into tensors (keyed by their '/'-joined path) and JSON-able values."""
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if torch.is_tensor(value):
            tensors[path] = value.detach().cpu().contiguous()
        elif isinstance(value, Mapping):
            _flatten(value, path, tensors, rest)
        else:
            rest[path] = value


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # Optimizer states nest (bitsandbytes keeps its quantisation state in a dict per parameter).
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    _flatten({str(index): values for index, values in state_dict["state"].items()}, "", tensors, scalars)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in [*tensors.items(), *rest["scalars"].items()]:
        _set_path(tree, path, value)
    return {"state": {int(index): values for index, values in tree.items()}, "param_groups": rest["param_groups"]}


def save_checkpoint(
    output_dir: Path,
    state: TrainingState,
    total_limit: int | None = None,
    records: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint-STEP atomically; `records` are extra JSON files to keep in it (name -> content)."""
    from safetensors.torch import save_file

    path = output_dir / f"checkpoint-{state.step}"
    optimizer_tensors, optimizer_rest = _flatten_optimizer(state.optimizer)
    with atomic_directory(path, replace=True) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in state.rng.items()}, str(tmp / "rng.safetensors"))
        meta = {"step": state.step, "optimizer": optimizer_rest, "scheduler": state.scheduler, "scaler": state.scaler}
        for name, content in (records or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1))
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
    if total_limit is not None:
        prune_checkpoints(output_dir, total_limit, keep_also=path)
    return path


def prune_checkpoints(output_dir: Path, keep: int, keep_also: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never `keep_also` (the one just saved); returns the deleted."""
    old = [path for path in list_checkpoints(output_dir)[:-keep] if path != keep_also]
    for path in old:
        shutil.rmtree(path)
    return old


def load_checkpoint(path: Path) -> TrainingState:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / MARKER).read_text())
        return TrainingState(
            step=int(meta["step"]),
            trainable=load_file(str(path / "trainable.safetensors")),
            optimizer=_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]),
            scheduler=meta["scheduler"],
            rng=load_file(str(path / "rng.safetensors")),
            scaler=meta.get("scaler"),
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise LoraDBError(f"checkpoint {path} is damaged ({err}); resume from an earlier checkpoint-N folder") from None
