"""Exact resume, as every training feature's tests check it: a run, and the same run cut short after a checkpoint
and resumed from a copy of that checkpoint alone, must log the same losses and write the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def run_and_resume(make_config, tmp_path: Path, step: int, **options) -> tuple[Path, Path]:
    """`make_config(output_dir=..., **options)` trained whole into tmp_path/full, then resumed into
    tmp_path/interrupted from a copy of full's checkpoint-`step`; returns both folders."""
    from lora_db.training.loop import train

    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    train(make_config(output_dir=full, **options))
    interrupted.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", interrupted / f"checkpoint-{step}")
    train(make_config(output_dir=interrupted, resume_from_checkpoint="latest", **options))
    return full, interrupted


def assert_resumed_exactly(full: Path, interrupted: Path, step: int, files=("adapter.safetensors",)) -> None:
    """The resumed steps log the losses and learning rates of the whole run's, and `files` hold equal tensors."""
    whole, resumed = metrics(full)[step:], metrics(interrupted)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in whole]
    for name in files:
        a, b = load_file(str(interrupted / name)), load_file(str(full / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
