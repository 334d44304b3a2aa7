"""Reliability, round two: every fault ends in one clear line, and nothing is lost.

Bad values of every numeric option, folders that collide, output folders two runs share, SIGTERM / SIGHUP,
resume rules, a real full disk, permissions, symlinks and captions the text encoder cuts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch

from lora_db.config.fields import field_types, option_type
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError


def cli(args, monkeypatch, capsys) -> tuple[int, str]:
    """Run `lora-db ARGS` in this process; (exit code, the one `error:` line, or all of stderr if none)."""
    from lora_db.cli.application import main

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
    from lora_db.config.commands import MergeConfig, SampleConfig

    with pytest.raises(LoraDBError, match=r"--seed must be in \[0, 4294967295\] \(got -1\)"):
        SampleConfig(out=tmp_path, prompts=["x"], seed=-1)
    with pytest.raises(LoraDBError, match="--guidance-scale must be a finite number"):
        SampleConfig(out=tmp_path, prompts=["x"], guidance_scale=math.nan)
    with pytest.raises(LoraDBError, match="--rank must be at least 1"):
        MergeConfig(adapters=["a.safetensors"], into_adapter="b.safetensors", rank=0)


def test_unexpected_errors_are_one_line_without_debug(monkeypatch, capsys):
    import lora_db.adapters.format as adapters

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
    from lora_db.adapters.format import read_adapter
    from lora_db.layout import list_checkpoints
    from lora_db.training.checkpoint import load_checkpoint
    from lora_db.training.loop import train

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


@pytest.mark.parametrize(
    ("leave_kib", "report_to", "failing"),
    [(8, "none", "metrics.jsonl"), (12, "none", "adapter.safetensors"), (12, "tensorboard", "")],
)
def test_a_real_full_disk_after_training_rescues_the_weights(
    small_disk, tiny_config, tmp_path, monkeypatch, leave_kib, report_to, failing
):
    pytest.importorskip(report_to) if report_to != "none" else None
    from lora_db.adapters.format import read_adapter
    from lora_db.training.loop import train

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    fill_disk(small_disk, leave_kib * 1024)
    out = small_disk / "out"
    with pytest.raises(LoraDBError) as err:
        train(tiny_config(output_dir=out, max_train_steps=2, report_to=report_to))
    message = str(err.value)
    assert message.startswith(f"the disk is full (no space left) while writing {out / failing}".rstrip("/"))
    rescued = message.split("were saved to ")[1].split(" instead")[0]
    steps = read_adapter(rescued).metadata["steps"]
    assert f"(step {steps})" in message
    assert not (out / "adapter.safetensors").exists()
    assert not list(out.glob(".*.tmp"))


# -- one writer per output folder ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from lora_db.locks import output_lock
with output_lock(sys.argv[1], "--output-dir"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def lock_holder():
    """Start a process that holds the lock of a folder; yields (start(folder, inside) -> process)."""
    import subprocess

    from processes import spawn

    with contextlib.ExitStack() as stack:

        def start(folder, seconds=120):
            process = stack.enter_context(
                spawn([sys.executable, "-c", HOLD_LOCK, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
            )
            assert process.stdout.readline().strip() == "locked"
            return process

        yield start


def test_a_second_run_in_the_same_output_folder_is_refused_naming_the_first(tiny_config, lock_holder, tmp_path):
    from lora_db.locks import lock_path
    from lora_db.training.loop import train

    out = tmp_path / "out"
    holder = lock_holder(out)
    with pytest.raises(LoraDBError, match=rf"--output-dir {out} is in use by process {holder.pid} "):
        train(tiny_config(output_dir=out, max_train_steps=1))
    assert not out.exists(), "the refused run wrote nothing"

    holder.kill()  # a dead owner's lock (its file is still there) must not block the next run
    holder.wait()
    assert lock_path(out).exists()
    train(tiny_config(output_dir=out, max_train_steps=1))
    assert (out / "adapter.safetensors").exists()
    assert not lock_path(out).exists(), "the lock is released when the run ends"


def test_sample_and_merge_outputs_are_locked_too(lock_holder, tmp_path, four_step_run):
    from lora_db.adapters.merge import merge, write_combined
    from lora_db.adapters.sample import sample
    from lora_db.config.commands import MergeConfig, SampleConfig

    merged = tmp_path / "merged"
    holder = lock_holder(merged)
    with pytest.raises(LoraDBError, match=rf"--out {merged} is in use by process {holder.pid}"):
        merge(MergeConfig(adapters=[str(four_step_run / "adapter.safetensors")], out=merged))

    samples = tmp_path / "samples"
    holder = lock_holder(samples)
    with pytest.raises(LoraDBError, match=rf"--out {samples} is in use by process {holder.pid}"):
        sample(SampleConfig(out=samples, model="tiny", prompts=["x"], num_inference_steps=1))
    combined = tmp_path / "both.safetensors"
    holder = lock_holder(combined)
    with pytest.raises(LoraDBError, match=rf"--into-adapter {combined} is in use by process {holder.pid}"):
        write_combined(MergeConfig(adapters=["a.safetensors"], into_adapter=combined))


def test_runs_sharing_a_class_folder_wait_their_turn(lock_holder, tmp_path, caplog):
    import time

    from lora_db.locks import output_lock

    classes = tmp_path / "classes"
    holder = lock_holder(classes, seconds=2)
    started = time.monotonic()
    with output_lock(classes, "--class-dir", wait=True):
        assert holder.poll() is not None or time.monotonic() - started > 1.0
    assert f"--class-dir {classes} is in use by process {holder.pid}: waiting for it to finish" in caplog.text


# -- stop signals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_before_training_stop_at_once_and_during_it_ask_for_a_checkpoint(signum):
    from lora_db.training.stopping import TrainingInterrupted, stop_on_signals

    with pytest.raises(TrainingInterrupted, match="before training started") as err, stop_on_signals():
        os.kill(os.getpid(), signum)
    assert err.value.exit_code == 128 + signum
    with stop_on_signals() as stop:
        stop.armed = True
        os.kill(os.getpid(), signum)
        assert stop.is_set() and stop.name == signal.Signals(signum).name
        with pytest.raises(TrainingInterrupted, match=f"^stopped at once by a second {signum.name}, without") as err:
            os.kill(os.getpid(), signum)  # a second signal stops at once, with one line
        assert err.value.exit_code == 128 + signum


def test_a_slow_checkpoint_is_reported_with_the_time_a_stop_signal_needs(caplog):
    from lora_db.training.stopping import StopRequest

    stop = StopRequest()
    stop.note_checkpoint(2.0, "out/checkpoint-1")
    assert caplog.text == ""
    stop.note_checkpoint(34.0, "out/checkpoint-2")
    assert "saving out/checkpoint-2 took 34 s: a stop signal" in caplog.text and "docker stop -t 78" in caplog.text
    stop.step_s = 3.0
    assert stop.expected() == " (a step takes ~3.0 s, a checkpoint ~34.0 s)"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_a_checkpoint_and_the_run_resumes(instance_dir, tmp_path, signum):
    import subprocess
    import time

    from processes import run, spawn

    out = tmp_path / "out"
    command = [sys.executable, "-m", "lora_db.cli", *map(str, train_args(instance_dir, out))]
    command[command.index("--max-train-steps") + 1] = "400"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith(f"error: stopped by {name} at step ")
    assert "--resume-from-checkpoint latest" in errors[0] and " s; continue" in errors[0]
    assert f"{name}: stopping after this micro-batch to save a checkpoint (a step takes ~" in stderr
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    if signum != signal.SIGTERM:
        return  # resuming works the same whichever signal stopped the run: once is enough
    resumed = run([*command, "--resume-from-checkpoint", "latest", "--max-train-steps", str(step + 1)], env=env,
                  timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(metrics.read_text().splitlines()) == step + 1


# -- resume rules -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_step_run(instance_dir, tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4, trained once for the module."""
    from lora_db.training.loop import train

    config = TrainConfig(
        model="tiny", instance_dir=instance_dir, instance_prompt="a photo of sks robot", learning_rate=5e-3,
        output_dir=tmp_path_factory.mktemp("four") / "out", max_train_steps=4, checkpointing_steps=2,
    )  # fmt: skip
    train(config)
    return config.output_dir


@pytest.fixture
def finished_run(four_step_run, tiny_config, tmp_path):
    """A copy of the 4-step run; returns (config factory resuming it, its config.json bytes)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(four_step_run, out)

    def again(**overrides):
        values = {"max_train_steps": 4, "checkpointing_steps": 2, "resume_from_checkpoint": "latest", **overrides}
        return tiny_config(output_dir=out, **values)

    return again, (out / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"rank": 8}, "--rank 8 (the checkpoint has 4)"),
        ({"target_modules": ["to_q"]}, "--target-modules to_q (the checkpoint has to_q,to_k,to_v,to_out.0)"),
        ({"learning_rate": 1e-2}, "--learning-rate 0.01 (the checkpoint has 0.005; a resumed run may only lower it)"),
        ({"model": "random:small"}, "--model random:small (the checkpoint has tiny)"),
    ],
)
def test_resume_refuses_other_options_before_writing_anything(finished_run, overrides, fragment):
    from lora_db.training.loop import train

    again, config_json = finished_run
    config = again(**overrides)
    with pytest.raises(LoraDBError, match="a resumed run may change only the steps") as err:
        train(config)
    assert fragment in str(err.value)
    assert (config.output_dir / "config.json").read_bytes() == config_json


def test_resume_refuses_max_steps_below_the_checkpoint(finished_run):
    from lora_db.training.loop import train

    again, config_json = finished_run
    config = again(max_train_steps=2)
    with pytest.raises(
        LoraDBError, match="it is at step 4, past --max-train-steps 2; pass --max-train-steps 4 or more"
    ):
        train(config)
    assert (config.output_dir / "config.json").read_bytes() == config_json


def test_resume_may_change_the_steps_and_config_json_says_what_runs(finished_run):
    import json

    from lora_db.training.loop import train

    again, _ = finished_run
    config = again(max_train_steps=5, checkpointing_steps=5, validation_steps=3)
    assert train(config).steps == 5
    written = json.loads((config.output_dir / "config.json").read_text())
    assert (written["max_train_steps"], written["checkpointing_steps"], written["validation_steps"]) == (5, 5, 3)


def test_resume_refuses_changed_photos(tiny_config, instance_dir, tmp_path):
    import shutil

    from PIL import Image

    from lora_db.training.loop import train

    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    train(tiny_config(instance_dir=photos, max_train_steps=2, checkpointing_steps=2))
    first = sorted(photos.glob("*.png"))[0]
    Image.new("RGB", (96, 96), "red").save(first)
    (photos / "extra.png").write_bytes((photos / sorted(p.name for p in photos.glob("*.png"))[1]).read_bytes())
    with pytest.raises(LoraDBError, match=rf"the training images changed .*--instance-dir: {first.name} changed, "):
        train(tiny_config(instance_dir=photos, max_train_steps=4, resume_from_checkpoint="latest"))


def test_resume_latest_on_a_finished_run_without_checkpoints_is_refused(tiny_config):
    from lora_db.training.loop import train

    config = tiny_config(max_train_steps=1)
    train(config)
    adapter = (config.output_dir / "adapter.safetensors").read_bytes()
    with pytest.raises(LoraDBError, match=r"holds a finished run \(adapter.safetensors\) and no checkpoint"):
        train(tiny_config(max_train_steps=1, resume_from_checkpoint="latest"))
    with pytest.raises(LoraDBError, match="already holds a run; it has no checkpoint to continue from: start afresh"):
        train(tiny_config(max_train_steps=1))  # the advice for a folder in use no longer points at resuming
    assert (config.output_dir / "adapter.safetensors").read_bytes() == adapter


def test_resuming_an_older_checkpoint_retires_the_later_ones_and_pruning_keeps_the_new(finished_run):
    from lora_db.layout import list_checkpoints
    from lora_db.training.checkpoint import load_checkpoint
    from lora_db.training.loop import train

    again, _ = finished_run
    config = again(resume_from_checkpoint=None)
    out = config.output_dir
    abandoned_four = load_checkpoint(out / "checkpoint-4").trainable
    train(again(resume_from_checkpoint=str(out / "checkpoint-2"), max_train_steps=3, checkpointing_steps=1,
                checkpoints_total_limit=1))  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"], "the one just saved is kept"
    assert sorted(p.name for p in (out / "abandoned").iterdir()) == ["checkpoint-4"]
    kept = load_checkpoint(out / "abandoned" / "checkpoint-4").trainable
    assert all(torch.equal(kept[k], abandoned_four[k]) for k in kept), "moved aside, not lost"


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    from lora_db.layout import CHECKPOINT_MARKER as MARKER
    from lora_db.layout import list_checkpoints
    from lora_db.training.checkpoint import prune_checkpoints

    for step in (2, 5, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / MARKER).write_text("{}")
    prune_checkpoints(tmp_path, 1, keep_also=tmp_path / "checkpoint-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9"]


# -- data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_broken_symlinks_among_the_photos_are_reported(instance_dir, tmp_path, kind, caplog):
    import shutil

    from lora_db.training.data import scan_images

    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    link = photos / "zz.jpg"
    link.symlink_to(tmp_path / "gone.jpg" if kind == "dangling" else link)
    with pytest.raises(LoraDBError, match=f"{link}: symbolic link to .*, which does not exist or loops back"):
        scan_images(photos, "a photo")
    records = scan_images(photos, "a photo", skip_bad_images=True)
    assert len(records) == 4 and "zz.jpg" in caplog.text


def test_files_that_are_not_read_are_named(instance_dir, tmp_path, caplog):
    import shutil

    from lora_db.images import find_images

    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    (photos / "IMG_0001.HEIC").write_bytes(b"x")
    assert len(find_images(photos)) == 4
    assert "ignoring 1 file(s) that are not jpg/jpeg/png/webp/bmp: IMG_0001.HEIC" in caplog.text


def test_an_extreme_side_is_refused_before_it_is_upscaled(tmp_path):
    from PIL import Image

    from lora_db.images import prepare_image
    from lora_db.training.data import scan_images

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (400000, 1), "white").save(photos / "line.png")
    with pytest.raises(LoraDBError, match=r"line.png is 400000 x 1 pixels: resized to 512 px on its short side it"):
        scan_images(photos, "a photo", resolution=512)
    with pytest.raises(LoraDBError, match="crop it closer to square"):
        prepare_image(Image.new("RGB", (400000, 1)), 512)


def test_captions_the_text_encoder_cuts_are_reported(tiny_config, tmp_path, caplog):
    import logging
    import shutil

    from lora_db.training.loop import train

    photos = tmp_path / "photos"
    shutil.copytree(tiny_config().instance_dir, photos)
    caption = photos / sorted(p.stem for p in photos.glob("*.png"))[0]
    caption = caption.with_suffix(".txt")
    caption.write_text("a very long description of the scene " * 3 + "with sks robot")
    with pytest.raises(LoraDBError, match=rf"{caption}: the caption is \d+ tokens and the text encoder reads 77, so "):
        train(tiny_config(instance_dir=photos, max_train_steps=1, strict=True))
    caplog.set_level(logging.INFO, logger="lora_db")
    train(tiny_config(instance_dir=photos, max_train_steps=1, output_dir=tmp_path / "warned"))
    assert f"{caption}: the caption is" in caplog.text and "with sks robot' at its end is cut off" in caplog.text
    assert "first caption: " in caplog.text and " of 77 tokens" in caplog.text


def test_a_rank_above_some_layers_width_is_a_warning_above_all_an_error(caplog):
    from torch import nn

    from lora_db.adapters.layers import check_rank
    from lora_db.adapters.spec import LoraSpec

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 16), nn.Linear(16, 16))
    check_rank(model, LoraSpec(8, 8.0, ("0", "1", "2")), "U-ViT")
    assert "--rank 8 is above the width of 2 of the 3 targeted U-ViT layers (narrowest 4, widest 16)" in caplog.text
    caplog.clear()
    with pytest.raises(
        LoraDBError,
        match=r"--rank 4096 is above the width of every targeted U-ViT layer \(widest 16\): a 0.9 MiB adapter with "
        r"no more capacity than --rank 16; choose --rank 16 or less",
    ):
        check_rank(model, LoraSpec(4096, 1.0, ("0", "1", "2")), "U-ViT")
    caplog.clear()
    check_rank(model, LoraSpec(4, 4.0, ("0", "1", "2")), "U-ViT")
    assert caplog.text == ""


def test_an_adapter_from_another_base_model_gets_one_warning(caplog):
    from lora_db.adapters.hotswap import resolve_model
    from lora_db.adapters.spec import AdapterFile

    adapter = AdapterFile(path=Path("robot.safetensors"), tensors={}, specs={}, metadata={"base_model": "tiny"})
    assert resolve_model("random:small", [adapter]) == "random:small"
    assert "robot.safetensors was trained on tiny (its metadata says), not random:small" in caplog.text
    caplog.clear()
    resolve_model("tiny", [adapter])
    assert caplog.text == ""


@pytest.mark.slow
def test_a_real_full_disk_under_the_tracker_is_one_error_line(small_disk, instance_dir):
    """tensorboard writes its event files from a thread of its own: the CLI still shows no traceback."""
    import sys

    from processes import run

    pytest.importorskip("tensorboard", reason="tensorboard is the tracker under test")
    fill_disk(small_disk, 12 * 1024)
    out = small_disk / "out"
    command = [sys.executable, "-m", "lora_db.cli", "train", "--model", "tiny", "--instance-dir", str(instance_dir),
               "--instance-prompt", "a photo of sks robot", "--output-dir", str(out), "--max-train-steps", "2",
               "--report-to", "tensorboard"]  # fmt: skip
    result = run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full (no space left) while writing" in errors[0], result.stderr[-2000:]
    assert not (out / "adapter.safetensors").exists()
