"""The command line people already type: fast --help and usage errors, and diffusers' DreamBooth flag names."""

import json
import sys
from pathlib import Path

import pytest
from lora_helpers import assert_one_line_error, run_cli, train_command
from processes import run

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "PIL")


def imported_modules(*args: str) -> tuple[int, set[str]]:
    """`lora-db ARGS` under `python -X importtime`: exit code and the top-level modules it imported."""
    result = run([sys.executable, "-X", "importtime", "-m", "lora_db.cli", *args], timeout=60)
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result.returncode, {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["sample", "--help"], 0),
        (["merge", "--help"], 0),
        (["estimate", "--help"], 0),
        (["info", "--help"], 0),
        (["export", "--help"], 0),
        (["train", "--rank", "four"], 2),
        (["sample", "--out", "x", "--num-images", "many"], 2),
    ],
)
def test_help_and_usage_errors_import_no_heavy_library(args, code):
    """torch and diffusers took ~2 s to import before --help printed; now they load only when a command runs."""
    returncode, modules = imported_modules(*args)
    assert returncode == code
    assert "lora_db" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


# -- diffusers' flag names ------------------------------------------------------------------------------------------


def test_a_diffusers_dreambooth_command_runs(instance_dir, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    code, _, err = run_cli(
        monkeypatch, capsys, "train",
        "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", instance_dir,
        "--instance_prompt", "a photo of sks robot", "--output_dir", out, "--resolution", "64",
        "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", "2", "--use_8bit_adam",
        "--max_grad_norm", "0",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--checkpointing_steps", "1", "--seed", "3",
        "--network_dim", "2", "--network_alpha", "3", "--report_to", "none", "--snr_gamma", "5.0", "--cache_latents",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    expected = {
        "model": "tiny", "instance_dir": str(instance_dir), "output_dir": str(out), "resolution": 64,
        "learning_rate": 5e-3, "max_train_steps": 2, "optimizer": "adamw8bit", "gradient_checkpointing": True,
        "max_grad_norm": 0.0,
        "mixed_precision": "bf16", "checkpointing_steps": 1, "seed": 3, "rank": 2, "alpha": 3.0, "report_to": "none",
        "snr_gamma": 5.0, "cache_latents": True,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert (out / "checkpoint-2").is_dir() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--num_train_epochs", "3"], ["--num_train_epochs is a diffusers option", "use --max-train-steps"]),
        (["--center_crop"], ["--center_crop", "center-crops unless --random-crop"]),
        (["--hub_token", "hf_x"], ["--hub_token", "`hf auth login`"]),
        (["--with_prior_preservation"], ["--with_prior_preservation", "--class_prompt and --class_data_dir"]),
        (["--push_to_hub"], ["--push_to_hub", "--hub_model_id REPO"]),
        (["--hub_model_id", "me/x"], ["--hub_model_id names the repository of --push_to_hub"]),
        (["--use_8bit_adam", "--optimizer", "adamw"], ["--use_8bit_adam and --optimizer both set"]),
        (["--max_train_steps", "5", "--max-train-steps", "6"], ["--max_train_steps and --max-train-steps"]),
    ],
)
def test_flags_lora_db_does_not_mean_are_refused_with_what_to_use(
    args, fragments, instance_dir, tmp_path, monkeypatch, capsys
):
    base = train_command(instance_dir, tmp_path / "o", prompt="p")
    assert_one_line_error(run_cli(monkeypatch, capsys, *base, *args), *fragments)
    assert not (tmp_path / "o").exists()


def test_aliases_stay_out_of_help_and_wrong_values_are_usage_errors(monkeypatch, capsys):
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", "--help")
    assert code == 0 and "--max-train-steps" in stdout
    assert "--max_train_steps" not in stdout and "pretrained_model_name_or_path" not in stdout
    code, _, err = run_cli(monkeypatch, capsys, "train", "--mixed_precision", "fp8")
    assert code == 2 and any("--mixed_precision" in line for line in err)


def test_every_alias_is_documented():
    import dataclasses

    from lora_db.cli.aliases import REFUSED, RENAMED, REQUIRES
    from lora_db.config.train import TrainConfig

    doc = (Path(__file__).parents[1] / "docs" / "diffusers-flags.md").read_text()
    rows = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `--")}
    aliases = {a.flag for a in RENAMED} | set(REQUIRES) | set(REFUSED)
    assert aliases <= rows
    same_name = {"--" + f.name for f in dataclasses.fields(TrainConfig)}  # underscores, or lora-db's own flag
    assert rows <= aliases | same_name
