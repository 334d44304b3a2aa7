"""Reliability, round two: every fault ends in one clear line, and nothing is lost.

Bad values of every numeric option, folders that collide, output folders two runs share, SIGTERM / SIGHUP,
resume rules, a real full disk, permissions, symlinks and captions the text encoder cuts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import sys

import pytest

from lora_db.config import TrainConfig, field_types, option_type
from lora_db.errors import LoraDBError


def cli(args, monkeypatch, capsys) -> tuple[int, str]:
    """Run `lora-db ARGS` in this process; (exit code, the one `error:` line, or all of stderr if none)."""
    from lora_db.cli import main

    monkeypatch.setattr(sys, "argv", ["lora-db", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) <= 1, stderr
    return exit_info.value.code, lines[0] if lines else stderr


def train_args(instance_dir, output_dir, *extra):
    return [
        "train", "--model", "tiny", "--instance-dir", instance_dir, "--instance-prompt", "a photo of sks robot",
        "--output-dir", output_dir, "--learning-rate", "5e-3", "--max-train-steps", "1", *extra,
    ]  # fmt: skip


# -- bad values ---------------------------------------------------------------------------------------------------


def numeric_fields():
    hints = field_types(TrainConfig)
    return [f for f in dataclasses.fields(TrainConfig) if option_type(hints[f.name])[0] in (int, float)]


def test_every_numeric_option_declares_its_range():
    undeclared = [f.name for f in numeric_fields() if not {"minimum", "above", "maximum", "below"} & set(f.metadata)]
    assert not undeclared, f"numeric options without a range: {undeclared}"


@pytest.mark.parametrize("name", [f.name for f in numeric_fields()])
def test_every_numeric_option_refuses_values_outside_its_range(name):
    field = next(f for f in numeric_fields() if f.name == name)
    is_float = option_type(field_types(TrainConfig)[name])[0] is float
    bad = [float("nan"), float("inf"), -float("inf")] if is_float else []
    low = field.metadata.get("minimum", field.metadata.get("above"))
    high = field.metadata.get("maximum", field.metadata.get("below"))
    if low is not None:
        bad.append(low - 1 if "minimum" in field.metadata else low)
    if high is not None:
        bad.append(high + 1 if "maximum" in field.metadata else high)
    for value in bad:
        with pytest.raises(LoraDBError, match=f"^--{name.replace('_', '-')} must be "):
            TrainConfig(**{name: value})


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seed", "-1"], "--seed must be in [0, 4294967295] (got -1)"),
        (["--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
        (["--validation-guidance-scale", "nan"], "--validation-guidance-scale must be a finite number"),
        (["--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number"),
        (["--num-class-images", "0"], "--num-class-images must be at least 1"),
        (["--class-prompt", ""], "--class-prompt is empty"),
    ],
)
def test_bad_numbers_on_the_command_line_get_one_line(instance_dir, tmp_path, monkeypatch, capsys, extra, fragment):
    code, line = cli(train_args(instance_dir, tmp_path / "out", *extra), monkeypatch, capsys)
    assert code == 1
    assert fragment in line
    assert not (tmp_path / "out").exists()


def test_config_pointing_at_a_folder(tmp_path, monkeypatch, capsys):
    code, line = cli(["train", "--config", tmp_path], monkeypatch, capsys)
    assert (code, line) == (1, f"error: --config {tmp_path}: is a folder; pass a TOML file")


def test_empty_output_folder_is_refused_not_the_current_folder(instance_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, line = cli(train_args(instance_dir, ""), monkeypatch, capsys)
    assert code == 1 and "--output-dir is empty" in line
    assert list(tmp_path.iterdir()) == []
    code, line = cli(["sample", "--out", "", "--model", "tiny", "--prompt", "x"], monkeypatch, capsys)
    assert code == 1 and "--out is required" in line
    code, line = cli(["merge", "--adapter", "a.safetensors", "--out", ""], monkeypatch, capsys)
    assert code == 1 and "--out is empty" in line


@pytest.mark.parametrize("relation", ["same", "inside", "outside"])
def test_class_folder_may_not_overlap_the_photos(instance_dir, relation):
    class_dir = {"same": instance_dir, "inside": instance_dir / "classes", "outside": instance_dir.parent}[relation]
    with pytest.raises(LoraDBError, match="overlap: generated class images would mix with the subject's photos"):
        TrainConfig(instance_dir=instance_dir, class_dir=class_dir, class_prompt="a photo of a robot")


def test_sample_and_merge_check_their_numbers_too(tmp_path):
    from lora_db.inference import SampleConfig
    from lora_db.merge import MergeConfig

    with pytest.raises(LoraDBError, match=r"--seed must be in \[0, 4294967295\] \(got -1\)"):
        SampleConfig(out=tmp_path, prompts=["x"], seed=-1)
    with pytest.raises(LoraDBError, match="--guidance-scale must be a finite number"):
        SampleConfig(out=tmp_path, prompts=["x"], guidance_scale=math.nan)
    with pytest.raises(LoraDBError, match="--rank must be at least 1"):
        MergeConfig(adapters=["a.safetensors"], into_adapter="b.safetensors", rank=0)


def test_unexpected_errors_are_one_line_without_debug(monkeypatch, capsys):
    import lora_db.adapters as adapters

    def broken(*args, **kwargs):
        raise TypeError("something internal broke")

    monkeypatch.setattr(adapters, "read_adapter", broken)
    code, line = cli(["info", "x.safetensors"], monkeypatch, capsys)
    assert code == 1
    assert line.startswith("error: unexpected TypeError: something internal broke (run again with --debug")


# -- permissions --------------------------------------------------------------------------------------------------


def test_outputs_respect_the_umask(tmp_path):
    from lora_db.io import atomic_directory, atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "file.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("y")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


# -- a real full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: a real file system that fills up (root only; skipped elsewhere)."""
    import shutil
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder, leave_bytes):
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


def test_a_real_full_disk_during_a_checkpoint_keeps_everything(small_disk, tiny_config, tmp_path, monkeypatch):
    from lora_db.adapters import read_adapter
    from lora_db.checkpoint import list_checkpoints, load_checkpoint
    from lora_db.train import train

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the rescued weights go: a disk with room
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    out = small_disk / "out"
    train(tiny_config(output_dir=out, max_train_steps=2, checkpointing_steps=2))
    adapter = (out / "adapter.safetensors").read_bytes()
    fill_disk(small_disk, 16 * 1024)
    with pytest.raises(LoraDBError) as err:
        train(tiny_config(output_dir=out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"))
    message = str(err.value)
    assert f"the disk is full (no space left) while writing {out / 'checkpoint-4'}" in message
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in message
    assert "\n" not in message
    rescued = message.split("were saved to ")[1].split(" instead")[0]
    assert read_adapter(rescued).metadata["steps"] == "4"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    load_checkpoint(out / "checkpoint-2")
    assert (out / "adapter.safetensors").read_bytes() == adapter
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(("leave_kib", "failing"), [(12, "metrics.jsonl"), (24, "adapter.safetensors")])
def test_a_real_full_disk_after_training_rescues_the_weights(
    small_disk, tiny_config, tmp_path, monkeypatch, leave_kib, failing
):
    from lora_db.adapters import read_adapter
    from lora_db.train import train

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    fill_disk(small_disk, leave_kib * 1024)
    out = small_disk / "out"
    with pytest.raises(LoraDBError) as err:
        train(tiny_config(output_dir=out, max_train_steps=2))
    message = str(err.value)
    assert message.startswith(f"the disk is full (no space left) while writing {out / failing}")
    rescued = message.split("were saved to ")[1].split(" instead")[0]
    steps = read_adapter(rescued).metadata["steps"]
    assert f"(step {steps})" in message
    assert not (out / "adapter.safetensors").exists()
    assert not list(out.glob(".*.tmp"))
