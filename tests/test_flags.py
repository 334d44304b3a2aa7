"""The command line people already type: fast --help and usage errors, and diffusers' DreamBooth flag names."""

import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import pytest
import typer.main
from lora_helpers import assert_one_line_error, help_entries, run_cli, train_command
from processes import run

from lora_db.logs import QUIET_LIBRARIES

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


# -- help and usage errors a newcomer meets first --------------------------------------------------------------------

# `lora-db ARGS`, then the heavy libraries it imported on the last line of stderr, whatever the exit.
MODULES_RUNNER = f"""
import sys
from lora_db.cli import main
sys.argv[0] = "lora-db"
try:
    main()
finally:
    sys.stderr.write("\\nimported: " + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n")
"""


def run_cli_process(*args: str, env: dict | None = None):
    """`lora-db ARGS` in a fresh interpreter: (result, heavy modules imported, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run([sys.executable, "-c", MODULES_RUNNER, *args], timeout=60, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    imported = result.stderr.rsplit("imported:", 1)[-1].strip()
    return result, {name for name in imported.split(",") if name}, cpu


def cli_commands() -> list[str]:
    from lora_db.cli import app

    return list(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", ["", *cli_commands()])
def test_every_help_answers_in_well_under_a_second_without_torch(command):
    for flag in ("--help", "--help-all") if command else ("--help",):
        result, imported, cpu = run_cli_process(*filter(None, [command, flag]))
        if flag == "--help-all" and "No such option" in result.stderr:
            continue  # a command short enough to show every option under --help
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith("Usage: lora-db"), result.stdout[:200]
        assert not imported, (command, flag, imported)
        assert cpu < 1.0, f"lora-db {command} {flag}: {cpu:.2f} s of CPU"


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["train"], 2, "Missing options '--instance-dir', '--instance-prompt', '--output-dir'."),
        (["train", "--config", "missing.toml", "--rank", "four"], 2, "Invalid value for '--rank'"),
        (["demo", "--subject", "star"], 2, "Invalid value for '--subject'"),
        (["estimate", "--gpu-memory", "lots"], 2, "Invalid value for '--gpu-memory'"),
        (["info"], 2, "Missing argument 'FILE'."),
        (["eval", "--out", "x"], 2, "Missing option '--instance-dir'."),
        (["sample", "--out", "x", "--num-images", "many"], 2, "Invalid value for '--num-images'"),
        (["merge", "--adapter", "a.safetensors"], 1, "error: give one of --out DIR"),
        (["sample", "--out", "x"], 1, "error: --prompt (or --prompts-file) is required"),
    ],
)
def test_usage_errors_are_short_and_import_no_torch(args, code, says):
    """The usage, where help is and the one problem; never the whole help, never seconds of imports first."""
    result, imported, cpu = run_cli_process(*args)
    shown = result.stderr.rsplit("\nimported: ", 1)[0].strip()
    assert result.returncode == code, shown
    assert says in shown, shown
    if code == 2:
        lines = shown.splitlines()
        assert lines[0].startswith(f"Usage: lora-db {args[0]} ") and len(lines) <= 5, shown
    assert not imported and cpu < 1.0, (imported, cpu)


def test_train_without_instance_prompt_stops_in_under_a_second_without_torch(tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    result, imported, cpu = run_cli_process(
        "train", "--model", "tiny-world", "--instance-dir", str(tmp_path), "--output-dir", str(out)
    )
    wall = time.perf_counter() - started
    assert result.returncode == 2 and "Error: Missing option '--instance-prompt'." in result.stderr, result.stderr
    assert not imported, imported
    assert cpu < 1.0, f"{cpu:.2f} s of CPU ({wall:.2f} s of wall time on this machine)"
    assert not out.exists()


@pytest.mark.parametrize("command", cli_commands())
def test_help_fits_80_columns_with_whole_option_names_and_no_switch_metavar(command, monkeypatch, capsys):
    from lora_db.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    params = typer.main.get_command(app).commands[command].params
    has_all = any(p.name == "help_all" for p in params)
    code, text, _ = run_cli(monkeypatch, capsys, command, "--help-all" if has_all else "--help")
    assert code == 0
    assert max(map(len, text.splitlines())) <= 80, [line for line in text.splitlines() if len(line) > 80]
    entries = help_entries(text)
    for param in params:
        if param.param_type_name != "option" or (param.hidden and param.name != "help_all"):
            continue
        for flag in param.opts:
            assert flag in entries, (command, flag)  # whole, in the first column
            names = entries[flag].split("  ")[0]
            if param.is_flag:
                assert set(names.split(", ")) <= set(param.opts), (command, names)  # a switch: no metavar
            else:
                metavar = names.rsplit(" ", 1)[-1]
                assert names == f"{flag} {metavar}", (command, names)
                assert metavar.isupper() or metavar.startswith("["), (command, names)


def test_train_help_shows_the_main_options_and_names_the_other_panels(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    code, short, _ = run_cli(monkeypatch, capsys, "train", "--help")
    code_all, full, _ = run_cli(monkeypatch, capsys, "train", "--help-all")
    assert code == code_all == 0
    assert short.index("Main options:") < short.index("\n  --instance-prompt") < short.index("\n  --help-all")
    assert "--random-flip" not in short and "--random-flip" in full
    assert "More options, shown by --help-all: Model and data (" in " ".join(short.split())
    assert len(short.splitlines()) < 100 < len(full.splitlines())
    for panel in ("Main options:", "Model and data:", "Prior preservation:", "Memory:", "Validation:"):
        assert f"\n{panel}\n" in full


def progress_bars(stderr: str) -> list[str]:
    """The names of the progress bars in a command's stderr (`train:  40%|...` -> train), each once."""
    names = [line.split("%|")[0].rsplit(":", 1)[0].strip() for line in re.split(r"[\r\n]+", stderr) if "%|" in line]
    return list(dict.fromkeys(names))


@pytest.mark.slow
def test_library_bars_and_warnings_show_only_with_verbose(tmp_path):
    """diffusers' and transformers' loading bars (tiny-world loads from a folder) and their warnings: off by
    default, one lora-db bar for the one phase; --verbose shows them again."""
    command = ["sample", "--model", "tiny-world", "--prompt", "a photo of a toy", "--num-inference-steps", "1"]
    env = {key: value for key, value in os.environ.items() if key != QUIET_LIBRARIES}
    quiet = run([sys.executable, "-m", "lora_db.cli", *command, "--out", str(tmp_path / "a")], timeout=300, env=env)
    loud = run(
        [sys.executable, "-m", "lora_db.cli", "--verbose", *command, "--out", str(tmp_path / "b")], timeout=300, env=env
    )
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert progress_bars(quiet.stderr) == ["sample"], quiet.stderr[-2000:]
    assert "Loading pipeline components" not in quiet.stderr and "deprecated" not in quiet.stderr
    assert "Loading pipeline components" in loud.stderr, loud.stderr[-2000:]
    assert "sample" in progress_bars(loud.stderr) and len(progress_bars(loud.stderr)) > 1
