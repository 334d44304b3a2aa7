"""The `lora-db` command as users run it: real processes, exit codes, one-line errors, Ctrl-C, two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from lora_helpers import help_entries, train_command
from processes import run, spawn

CLI = [sys.executable, "-m", "lora_db.cli"]


def run_cli(*args, check=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run([*CLI, *map(str, args)], env=env, timeout=600, **kwargs)
    if check is not None:
        assert result.returncode == check, result.stderr[-3000:]
    return result


def train_args(instance_dir, output_dir, *extra):
    return [*train_command(instance_dir, output_dir), "--learning-rate", "5e-3", *extra]


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.slow
def test_train_command_end_to_end(instance_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        *train_args(instance_dir, out, "--max-train-steps", "6", "--validation-prompt", "a photo of sks robot"),
        "--validation-steps",
        "3",
        "--validation-inference-steps",
        "2",
        check=0,
    )
    assert f"adapter: {out / 'adapter.safetensors'}" in result.stdout
    assert f"validation images: {out / 'validation'}" in result.stdout
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == [
        "step-000003-0.png",
        "step-000003-1.png",
        "step-000003.png",
        "step-000006-0.png",
        "step-000006-1.png",
        "step-000006.png",
    ]


@pytest.mark.slow
def test_config_file_and_command_line(instance_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny"\ninstance-dir = "{instance_dir}"\ninstance-prompt = "sks"\nrank = 2\n')
    out = tmp_path / "out"
    run_cli("train", "--config", config, "--output-dir", out, "--max-train-steps", "2", "--rank", "3", check=0)
    assert json.loads((out / "config.json").read_text())["rank"] == 3


@pytest.mark.parametrize(
    ("make_input", "extra", "fragment"),
    [
        (lambda d: d / "missing", [], "--instance-dir"),
        (lambda d: (d / "empty").mkdir() or d / "empty", [], "--instance-dir"),
        (lambda d: folder_with(d / "bad", "x.jpg", b"not a jpeg"), [], "x.jpg"),
        (lambda d: folder_with(d / "zero", "y.png", b""), [], "y.png"),
        (lambda d: None, ["--rank", "0"], "--rank must be at least 1"),
        (lambda d: None, ["--learning-rate", "nan"], "--learning-rate"),
        (lambda d: None, ["--class-prompt", "a robot"], "--class-prompt needs --class-dir"),
        (lambda d: None, ["--resolution", "96"], "use --resolution 64"),
        (lambda d: None, ["--target-modules", "to_x"], "available:"),
        (lambda d: None, ["--mixed-precision", "fp16"], "fp16 needs a GPU"),
        (lambda d: None, ["--attention", "xformers"], "xformers"),
        (lambda d: None, ["--resume-from-checkpoint", "nowhere"], "folder not found"),
        (lambda d: None, ["--model", "./no/such/folder"], "folder not found"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_code_1(
    instance_dir, tmp_path, make_input, extra, fragment, monkeypatch, capsys
):
    from lora_db.cli.application import main

    folder = make_input(tmp_path) or instance_dir
    args = train_args(folder, tmp_path / "out", "--max-train-steps", "1", *extra)
    monkeypatch.setattr(sys, "argv", ["lora-db", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], stderr[-2000:]
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def folder_with(folder, name, content):
    folder.mkdir()
    (folder / name).write_bytes(content)
    return folder


def test_usage_errors_keep_exit_code_2(tmp_path):
    assert run_cli("train", "--rank", "many").returncode == 2
    assert run_cli("train", "--mixed-precision", "fp8").returncode == 2


@pytest.mark.slow
def test_hub_model_out_of_reach_explains_how_to_use_a_local_copy(instance_dir, tmp_path):
    env_result = run_cli(*train_args(instance_dir, tmp_path / "out", "--model", "thu-ml/unidiffuser-v1"), check=1)
    line = error_line(env_result)
    assert "thu-ml/unidiffuser-v1" in line and "--model DIR" in line


@pytest.mark.slow
def test_hub_out_of_network_reach_is_one_line_at_once(instance_dir, tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf-home")}
    args = train_args(instance_dir, tmp_path / "out", "--model", "thu-ml/unidiffuser-v1")
    result = run([*CLI, *map(str, args)], env=env, timeout=300)
    assert result.returncode == 1
    # No retry lines, no library warnings: the one line names the network as the cause and the way out.
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --model thu-ml/unidiffuser-v1: the network is out of reach"), line
    assert "--model DIR" in line


@pytest.mark.slow
def test_a_cached_hub_model_trains_and_estimates_when_the_hub_is_out_of_reach(instance_dir, tmp_path):
    """A hub id whose snapshot is in the local Hugging Face cache (tiny-world, as acme/tiny-world) loads from the
    cache, with one warning, when the hub does not answer."""
    import shutil

    from lora_db.models.loading import tiny_world_dir as asset_dir

    revision = "0" * 40
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny-world"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(asset_dir(), repo / "snapshots" / revision)
    env = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf-home")}

    out = tmp_path / "out"
    args = train_args(instance_dir, out, "--model", "acme/tiny-world", "--max-train-steps", "2")
    result = run([*CLI, *map(str, args)], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "out of reach: loading acme/tiny-world from the local cache" in result.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    estimate = run([*CLI, "estimate", "--model", "acme/tiny-world"], env=env, timeout=300)
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    assert "peak of the step" in estimate.stdout


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(instance_dir, tmp_path):
    steps = ["--max-train-steps", "120", "--lora-dropout", "0.1"]
    reference = tmp_path / "reference"
    run_cli(*train_args(instance_dir, reference, *steps), check=0)

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [*CLI, *map(str, train_args(instance_dir, out, *steps))]
    with spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "--resume-from-checkpoint latest" in stderr
    assert list(out.glob("checkpoint-*")), "Ctrl-C must leave a checkpoint"
    assert not (out / "adapter.safetensors").exists()

    resumed = run_cli(*train_args(instance_dir, out, *steps, "--resume-from-checkpoint", "latest"), check=0)
    # Resuming from scratch would reproduce the losses too: the run must say where it picked up.
    assert re.search(r"resumed from \S*checkpoint-\d+ at step [1-9]", resumed.stderr), resumed.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert losses == expected


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_data_parallel_run(instance_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extra = ["--max-train-steps", "10", "--checkpointing-steps", "5", "--train-text-encoder"]
    result = run(torchrun(instance_dir, out, *extra), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # Every trained tensor (U-ViT and text-encoder LoRA), gathered from both ranks at the end: bit-identical.
    assert summary["replica_max_abs_difference"] == 0.0
    assert "different weights" not in result.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert result.stdout.count("adapter:") == 1  # only the main process writes and reports


def torchrun(instance_dir, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "lora_db.cli",
        *map(str, train_args(instance_dir, out, *extra)),
    ]


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_once_and_resume_matches_an_uninterrupted_run(instance_dir, tmp_path):
    """Preemption of a two-process run (torchrun forwards SIGTERM to both workers): the processes agree on the
    step, the main one saves the checkpoint and says so once, and resuming reproduces the uninterrupted run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    steps = ["--max-train-steps", "200", "--lora-dropout", "0.1"]
    reference = tmp_path / "reference"
    result = run(torchrun(instance_dir, reference, *steps), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "out"
    metrics = out / "metrics.jsonl"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with spawn(torchrun(instance_dir, out, *steps), env=env, **pipes) as process:
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    stops = [line for line in stderr.splitlines() if line.startswith("error: stopped by SIGTERM")]
    assert len(stops) == 1 and f"saved to {out}" in stops[0], stderr[-3000:]
    (saved,) = out.glob("checkpoint-*")
    step = int(saved.name.removeprefix("checkpoint-"))
    assert 3 <= step < 200 and len(metrics.read_text().splitlines()) == step
    assert not (out / "adapter.safetensors").exists()

    result = run(torchrun(instance_dir, out, *steps, "--resume-from-checkpoint", "latest"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert losses == expected


def test_train_help_shows_every_default():
    import dataclasses

    from lora_db.config.train import TrainConfig

    result = run([*CLI, "train", "--help-all"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = help_entries(result.stdout)
    shown = 0
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            expected = flag if default else "--no-" + flag[2:]
        else:
            expected = ",".join(default) if isinstance(default, list) else str(default)
        assert f"[default: {expected}]" in entries[flag], entries.get(flag)
        shown += 1
    assert shown > 30
