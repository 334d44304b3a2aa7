"""Failing and interrupted runs: SIGKILL at any moment, NaN losses, a full or read-only disk, out of memory."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from processes import run, spawn

from lora_db.adapters.format import read_adapter
from lora_db.errors import LoraDBError
from lora_db.layout import list_checkpoints
from lora_db.training.checkpoint import load_checkpoint
from lora_db.training.loop import train


def read_losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_everything_loadable(output_dir):
    for path in list_checkpoints(output_dir):
        load_checkpoint(path)
    if (output_dir / "adapter.safetensors").exists():
        read_adapter(output_dir / "adapter.safetensors")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_matches_the_uninterrupted_run(instance_dir, tmp_path, tiny_config):
    steps = 14
    reference = tmp_path / "reference"
    train(tiny_config(output_dir=reference, max_train_steps=steps, checkpointing_steps=1))
    expected = read_losses(reference)

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "lora_db.cli", "train", "--model", "tiny", "--instance-dir", str(instance_dir),
        "--instance-prompt", "a photo of sks robot", "--output-dir", str(out), "--learning-rate", "5e-3",
        "--max-train-steps", str(steps), "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(0)
    # Checkpoints are written every step, so kills land before, during and after checkpoint and adapter writes.
    for kill_after_lines in (2, 6, 11, steps):
        with spawn(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) as process:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + 300
            while process.poll() is None and time.time() < deadline:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_lines:
                    time.sleep(rng.uniform(0, 0.03))
                    break
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        assert_everything_loadable(out)

    finished = run(command, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert read_losses(out) == expected
    a, b = read_adapter(out / "adapter.safetensors"), read_adapter(reference / "adapter.safetensors")
    assert all(torch.equal(a.tensors["unet"][k], b.tensors["unet"][k]) for k in b.tensors["unet"])
    assert not list(out.glob(".*.tmp")), "temporary files of killed runs are cleaned up"


def test_divergence_stops_at_once_and_keeps_no_checkpoint_of_diverged_weights(tiny_config):
    config = tiny_config(max_train_steps=20, checkpointing_steps=1, learning_rate=1e30, max_grad_norm=0)
    with pytest.raises(LoraDBError, match=r"training diverged at step 1: .* holds values up to .*--learning-rate"):
        train(config)
    assert list_checkpoints(config.output_dir) == []
    assert not (config.output_dir / "adapter.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("code", "fragment"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_keeps_the_previous_files(tiny_config, monkeypatch, code, fragment):
    config = tiny_config(max_train_steps=2, checkpointing_steps=2)
    train(config)
    adapter = config.output_dir / "adapter.safetensors"
    before = adapter.read_bytes()

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)  # half the file reaches the disk, then the disk fails
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(LoraDBError, match=fragment):
        train(tiny_config(max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"))
    assert adapter.read_bytes() == before
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["checkpoint-2"]
    assert not list(config.output_dir.glob(".*.tmp"))


def test_out_of_memory_suggests_the_options_that_would_help(tiny_config, monkeypatch):
    import lora_db.training.loop as train_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "dreambooth_loss", out_of_memory)
    with pytest.raises(
        LoraDBError,
        match=r"out of cpu memory at step 1: try --mixed-precision bf16, "
        r"--gradient-checkpointing, --optimizer adamw8bit, --cache-latents",
    ):
        train(tiny_config(max_train_steps=2))


def test_adapter_metadata_that_lies_about_rank_is_refused(tiny_config, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = train(tiny_config(max_train_steps=1)).adapter_path
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    metadata["lora_db.components"] = metadata["lora_db.components"].replace('"rank": 4', '"rank": 8')
    liar = tmp_path / "liar.safetensors"
    save_file(tensors, str(liar), metadata=metadata)
    with pytest.raises(LoraDBError, match="has rank 4 but the metadata says 8"):
        read_adapter(liar)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_formats_are_refused_before_reading(tmp_path, suffix):
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoraDBError, match="pickles, which can run code"):
        read_adapter(path)


def _set_a_weight_after_update(monkeypatch, update: int, value: float) -> None:
    """After optimizer update `update` (1-based), one trained weight becomes `value`, the loss untouched."""
    from lora_db.training import loop

    real = loop.optimizer_step

    def step(run, index, *args):
        loss = real(run, index, *args)
        if index + 1 == update:
            next(iter(run.models.named_trainable.values())).data.view(-1)[0] = value
        return loss

    monkeypatch.setattr(loop, "optimizer_step", step)


def test_weights_are_checked_every_n_steps_and_at_the_end_not_after_every_update(tiny_config, monkeypatch):
    from lora_db.training import loop
    from lora_db.training.divergence import WEIGHT_CHECK_STEPS

    checked = []
    real = loop.check_weights
    monkeypatch.setattr(loop, "check_weights", lambda config, models, step, *a: checked.append(step) or real(
        config, models, step, *a))  # fmt: skip
    train(tiny_config(max_train_steps=WEIGHT_CHECK_STEPS + 2))
    assert checked == [WEIGHT_CHECK_STEPS, WEIGHT_CHECK_STEPS + 2]


def test_an_outsized_weight_between_checks_is_found_at_the_next_check_and_never_saved(tiny_config, monkeypatch):
    from lora_db.training.divergence import WEIGHT_CHECK_STEPS

    _set_a_weight_after_update(monkeypatch, 3, 2e4)  # finite, above MAX_ABS_WEIGHT: the loss stays finite
    config = tiny_config(max_train_steps=WEIGHT_CHECK_STEPS + 2)
    with pytest.raises(LoraDBError, match=rf"training diverged between steps 1 and {WEIGHT_CHECK_STEPS} \(weights "
                       rf"checked every {WEIGHT_CHECK_STEPS} steps\): unet\..* holds values up to 2"):  # fmt: skip
        train(config)
    losses = read_losses(config.output_dir)
    assert len(losses) == WEIGHT_CHECK_STEPS - 1 and all(map(math.isfinite, losses))  # no line for the step found
    assert not (config.output_dir / "adapter.safetensors").exists()


def test_a_checkpoint_checks_the_weights_before_it_is_written(tiny_config, monkeypatch):
    _set_a_weight_after_update(monkeypatch, 3, 2e4)
    config = tiny_config(max_train_steps=8, checkpointing_steps=2)
    with pytest.raises(
        LoraDBError, match=r"training diverged between steps 3 and 4 \(.*\): unet\..* holds values up to 2"
    ):
        train(config)  # checkpoint-2 found step 2's weights sane: checkpoint-4's check names steps 3 and 4
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["checkpoint-2"]


def test_a_nan_weight_between_checks_is_named_by_the_next_loss(tiny_config, monkeypatch):
    _set_a_weight_after_update(monkeypatch, 3, float("nan"))
    config = tiny_config(max_train_steps=8)
    with pytest.raises(LoraDBError, match=r"training diverged at step 3: the loss became nan"):
        train(config)
    assert len(read_losses(config.output_dir)) == 3
