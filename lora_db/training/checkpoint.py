"""Resumable training checkpoints, stored without pickle.

`OUTPUT_DIR/checkpoint-STEP/` holds the trainable weights (`trainable.safetensors`), their EMA with `--use-ema`
(`ema.safetensors`), the optimizer state
(tensors in `optimizer.safetensors`, the rest in `state.json`), the learning-rate scheduler, each process's
RNG states (`rng.safetensors`), fp16's loss-scaler state (in `state.json`) and the step. A folder is written
under a temporary name and renamed when complete, so a crash mid-save leaves the previous checkpoints as they were.

`rng_state`, `trainable_state` and `scaler_state` capture a run's state for one; `restore` puts it back.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_db.errors import LoraDBError
from lora_db.io import atomic_directory
from lora_db.layout import CHECKPOINT_MARKER as MARKER
from lora_db.layout import list_checkpoints

logger = logging.getLogger("lora_db")

EMA_FILE = "ema.safetensors"


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    scaler: dict[str, Any] | None = None  # fp16's GradScaler: scale and growth tracker (plain numbers)
    ema: dict[str, torch.Tensor] | None = None  # --use-ema: the moving average of each trained tensor


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
        if state.ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.ema.items()}, str(tmp / EMA_FILE))
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
            ema=load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise LoraDBError(f"checkpoint {path} is damaged ({err}); resume from an earlier checkpoint-N folder") from None


# -- capturing and restoring a run's state ---------------------------------------------------------------------------


def trainable_state(models) -> dict[str, torch.Tensor]:
    """Every trained tensor of `models.trained` (component -> module), keyed component.parameter."""
    return {f"{c}.{n}": p for c, m in models.trained.items() for n, p in m.named_parameters() if p.requires_grad}


def local_rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's noise generator and torch RNG (for LoRA dropout)."""
    local = {"noise": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        local["cuda"] = torch.cuda.get_rng_state()
    return local


def set_local_rng_state(generator: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    generator.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def rng_state(generator: torch.Generator, accelerator) -> dict[str, torch.Tensor]:
    """Every process's `local_rng_state`, gathered onto the main process."""
    local = local_rng_state(generator)
    return {name: accelerator.gather(state.to(accelerator.device)[None]).cpu() for name, state in local.items()}


def restore_rng_state(rng: dict[str, torch.Tensor], generator: torch.Generator, rank: int, reseed: int = 0) -> None:
    """This process's row of the gathered states. Each row is copied into a tensor of its own first: torch's
    `set_state` reads a state from the start of its storage, so rank 1's row of the (processes, bytes) tensor, a
    view at an offset, was refused as an invalid mt19937 state or crashed the process.

    A process the checkpoint has no row for (resuming with more processes than wrote it) seeds its generators
    from `reseed` and its rank instead.
    """
    if rank >= rng["noise"].shape[0]:
        generator.manual_seed(reseed * 7919 + rank)
        torch.manual_seed(reseed * 7919 + rank)
        return

    def own(name: str) -> torch.Tensor:
        return rng[name][rank].to(torch.uint8).clone()

    generator.set_state(own("noise"))
    torch.set_rng_state(own("torch"))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(own("cuda"))


def restore(
    path: Path, models, optimizer, scheduler, generator: torch.Generator, accelerator, seed: int = 0, ema=None
) -> int:
    state = load_checkpoint(path)
    if (ema is None) != (state.ema is None):
        held = "holds" if state.ema is not None else "holds no"
        raise LoraDBError(
            f"checkpoint {path} {held} an EMA of the weights (--use-ema); resume with the options of that run"
        )
    if ema is not None:
        try:
            ema.load_state_dict(state.ema)
        except KeyError as err:
            raise LoraDBError(f"checkpoint {path}: {err.args[0]}; resume with the options of that run") from None
    params = trainable_state(models)
    if set(state.trainable) != set(params):
        raise LoraDBError(
            f"checkpoint {path} was written by a different configuration (other trained weights); "
            "resume with the options of that run"
        )
    with torch.no_grad():
        for name, tensor in state.trainable.items():
            if tensor.shape != params[name].shape:
                raise LoraDBError(
                    f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the run expects "
                    f"{tuple(params[name].shape)}; resume with the options of that run"
                )
            params[name].copy_(tensor)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    written_by = state.rng["noise"].shape[0]
    if written_by != accelerator.num_processes and accelerator.is_main_process:
        logger.warning(
            "%s was written by %d process(es), resumed by %d: weights, optimizer and schedule continue from step %d, "
            "but the data order and random draws differ from a run that kept %d",
            path, written_by, accelerator.num_processes, state.step, written_by,
        )  # fmt: skip
    restore_rng_state(state.rng, generator, accelerator.process_index, reseed=seed + state.step)
    restore_scaler(state.scaler, accelerator, path)
    return state.step


def scaler_state(accelerator) -> dict | None:
    """fp16's loss scale and growth tracker (accelerate keeps the GradScaler outside the optimizer state)."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else None


def restore_scaler(state: dict | None, accelerator, path: Path) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    if state is None:
        logger.warning("checkpoint %s has no fp16 loss-scale state: the loss scale starts afresh", path)
        return
    scaler.load_state_dict(state)
