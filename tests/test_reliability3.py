"""Reliability, round three: each class of fault a hostile or unlucky user found, tested as a class.

Locks every command shares, --overwrite that keeps the user's files, divergence that cannot pass as success, one
adapter validation for every reader, class images recorded as they are written, signals answered, values read from
files, untrusted text on the terminal, and specific one-line errors where "unexpected ..." stood.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from lora_helpers import PROMPT, make_adapter, run_cli, train_command
from safetensors.torch import save_file

from lora_db.errors import LoraDBError


@pytest.fixture(scope="module")
def adapter_file(pristine, tmp_path_factory):
    return make_adapter(pristine, tmp_path_factory.mktemp("adapter") / "a.safetensors", seed=0)


# -- one lock per output, the same for every command ---------------------------------------------------------------


def every_command(out: Path, adapter: Path, instance_dir: Path):
    """Each command writing `out`, as a function of no arguments."""
    from lora_db.adapters.format import export_peft
    from lora_db.adapters.merge import merge
    from lora_db.adapters.sample import sample
    from lora_db.config.commands import MergeConfig, SampleConfig
    from lora_db.config.evaluate import EvalConfig
    from lora_db.config.train import TrainConfig
    from lora_db.evaluation.evaluate import evaluate
    from lora_db.training.loop import train

    training = TrainConfig(model="tiny", instance_dir=instance_dir, instance_prompt=PROMPT, output_dir=out)
    return {
        "train": lambda: train(training),
        "sample": lambda: sample(SampleConfig(out=out, model="tiny", prompts=["x"], overwrite=True)),
        "merge": lambda: merge(MergeConfig(adapters=[str(adapter)], model="tiny", out=out, overwrite=True)),
        "eval": lambda: evaluate(EvalConfig(out=out, instance_dir=instance_dir, model="tiny", prompts=["x"])),
        "export": lambda: export_peft(adapter, out, overwrite=True),
    }


@pytest.mark.parametrize("holder", ["--output-dir", "--out"])
def test_every_command_takes_the_same_lock_for_an_output(adapter_file, instance_dir, tmp_path, holder):
    """A `sample --out X` running while `train --output-dir X` starts (or the reverse) must refuse, not swap X."""
    from lora_db.locks import output_lock

    out = tmp_path / "out"
    with output_lock(out, holder):
        for name, command in every_command(out, adapter_file, instance_dir).items():
            with pytest.raises(LoraDBError, match=rf" {out} is in use by process {os.getpid()} ") as err:
                command()
            assert "\n" not in str(err.value), name
    assert not out.exists()


def test_a_link_named_like_the_lock_is_never_followed_nor_a_file_emptied(adapter_file, instance_dir, tmp_path):
    from lora_db.locks import lock_path, output_lock

    out = tmp_path / "out"
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data")
    lock = lock_path(out)
    lock.symlink_to(victim)
    for command in every_command(out, adapter_file, instance_dir).values():
        with pytest.raises(LoraDBError, match="is a symbolic link, which lora-db does not follow"):
            command()
    lock.unlink()
    os.link(victim, lock)  # a hard link: the same file under the lock's name
    with pytest.raises(LoraDBError, match=r"is not one of lora-db .* lora-db leaves it alone"):
        every_command(out, adapter_file, instance_dir)["sample"]()
    lock.unlink()
    lock.write_text("some other data")
    with pytest.raises(LoraDBError, match="is not one of lora-db"), output_lock(out, "--out"):
        pass
    assert victim.read_text() == "the user's data" and lock.read_text() == "some other data"
    lock.write_text("999999999 elsewhere-and-longer\n")  # a dead owner's lock file: taken over, rewritten
    with output_lock(out, "--out"):
        assert lock.read_text() == f"{os.getpid()} {__import__('socket').gethostname()}\n"
    assert not lock.exists()


@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_an_output_that_is_a_broken_link_is_named(tiny_config, tmp_path, kind):
    from lora_db.training.loop import train

    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere" if kind == "dangling" else out)
    with pytest.raises(
        LoraDBError, match=f"--output-dir {out} is a symbolic link to .*, which does not exist or loops"
    ):
        train(tiny_config(output_dir=out, max_train_steps=1))


def test_a_killed_writers_temporary_copies_are_removed_under_the_lock(tmp_path):
    from lora_db.locks import output_lock

    out = tmp_path / "samples"
    stale = [tmp_path / ".samples.k2j4_9zq.tmp", tmp_path / ".samples.abcdefgh.old"]
    for path in stale:
        path.mkdir()
        (path / "grid.png").write_bytes(b"x")
    kept = [tmp_path / ".samples.notes", tmp_path / ".other.abcdefgh.tmp", tmp_path / "samples.abcdefgh.tmp"]
    for path in kept:
        path.write_text("mine")
    with output_lock(out, "--out"):
        pass
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "mine" for path in kept)


# -- --overwrite never deletes a file lora-db did not write -------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "export", "merge"])
def test_overwrite_keeps_the_files_the_user_added(adapter_file, tmp_path, monkeypatch, capsys, command):
    out = tmp_path / "out"
    args = {
        "sample": ["sample", "--model", "tiny", "--prompt", "x", "--num-inference-steps", "1", "--out", out],
        "export": ["export", adapter_file, out],
        "merge": ["merge", "--model", "tiny", "--adapter", adapter_file, "--out", out],
    }[command]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    written = sorted(p.relative_to(out) for p in out.rglob("*"))
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 1 and len(err) == 1 and "1 file (notes.txt) that lora-db did not write" in err[0], err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run_cli(monkeypatch, capsys, *args, "--overwrite")[0] == 0  # what lora-db wrote is replaced
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == written


def test_train_overwrite_refuses_files_named_like_a_runs_but_not_its(instance_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "project"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "notes.md").write_text("mine")
    (out / "config.json").write_text('{"theme": "dark"}')
    train = [*train_command(instance_dir, out), "--max-train-steps", "1"]
    code, _, err = run_cli(monkeypatch, capsys, *train, "--overwrite")
    assert code == 1 and len(err) == 1, err
    assert "holds config.json, unet, named like a run's files but not written by lora-db" in err[0]
    assert (out / "unet" / "notes.md").read_text() == "mine"
    assert (out / "config.json").read_text() == '{"theme": "dark"}'


@pytest.mark.slow
def test_train_overwrite_replaces_a_previous_run_and_keeps_the_users_files(instance_dir, tmp_path, monkeypatch, capsys):
    from lora_db.layout import written_by_training

    out = tmp_path / "run"
    first = [*train_command(instance_dir, out), "--max-train-steps", "2", "--checkpointing-steps", "1"]
    assert run_cli(monkeypatch, capsys, *first)[0] == 0
    ours = sorted(p.name for p in out.iterdir() if written_by_training(p))
    assert {"adapter.safetensors", "metrics.jsonl", "config.json", "summary.json", "checkpoint-1"} <= set(ours), ours
    (out / "notes.txt").write_text("mine")
    second = [*train_command(instance_dir, out), "--max-train-steps", "1", "--overwrite"]
    assert run_cli(monkeypatch, capsys, *second)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoint-1").exists()  # the first run's checkpoints went with it
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    # An adapter file that is not lora-db's, put where the run's was, stops the next --overwrite.
    save_file({"w": torch.zeros(2, 2)}, str(out / "adapter.safetensors"))
    code, _, err = run_cli(monkeypatch, capsys, *second)
    assert code == 1 and "holds adapter.safetensors, named like a run's files but not written by lora-db" in err[0]
    assert (out / "notes.txt").exists() and (out / "metrics.jsonl").exists()


def test_a_file_added_while_an_output_is_written_is_kept(tmp_path):
    from lora_db.io import atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out, record=True) as tmp:
        (tmp / "grid.png").write_bytes(b"old")
    refused = pytest.raises(LoraDBError, match=r"now holds 1 file \(late.txt\), which lora-db did not write")
    with refused, atomic_directory(out, replace=True, record=True) as tmp:
        (tmp / "grid.png").write_bytes(b"new")
        (out / "late.txt").write_text("mine")  # the user, while the command runs
    assert (out / "late.txt").read_text() == "mine" and (out / "grid.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_holds_the_current_folder_is_refused(adapter_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--model", "tiny", "--adapter", adapter_file, "--out", ".")
    assert code == 1 and err == ["error: --out . holds the current folder, which it would replace; choose a new folder"]


# -- one adapter validation for every reader -----------------------------------------------------------------------


def rewrite(source: Path, target: Path, tensors=None, metadata=None) -> Path:
    """A copy of the adapter file `source` with some tensors and metadata changed (None as a value drops it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        meta, flat = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for changes, into in ((tensors or {}, flat), (metadata or {}, meta)):
        for key, value in changes.items():
            into.pop(key) if value is None else into.__setitem__(key, value)
    save_file(flat, str(target), metadata=meta)
    return target


def first_key(path: Path, kind: str) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return next(k for k in f.keys() if k.endswith(kind))  # noqa: SIM118


def components_with(path: Path, **changes) -> str:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        components = json.loads(f.metadata()["lora_db.components"])
    components["unet"].update(changes)
    return json.dumps(components)


def bad_adapters(good: Path):
    import torch

    a, b = first_key(good, "lora_A.weight"), first_key(good, "lora_B.weight")
    shape_b = (32, 4)
    return {
        "exploded B": ({b: torch.full(shape_b, 1e30)}, {}, "holds values up to 1e+30"),
        "NaN": ({a: torch.full((4, 32), float("nan"))}, {}, "holds NaN or infinite values"),
        "int8": ({b: torch.ones(shape_b, dtype=torch.int8)}, {}, "is int8; LoRA weights are floating point"),
        "bool": ({b: torch.ones(shape_b, dtype=torch.bool)}, {}, "is bool; LoRA weights are floating point"),
        "1-D A": ({a: torch.ones(4)}, {}, "has shape (4,); it must be 2-D"),
        "no components": (dict.fromkeys(_keys(good)), {"lora_db.components": "{}"}, "holds no adapter component"),
        "rank 4.5": ({}, {"lora_db.components": components_with(good, rank=4.5)}, "rank must be a whole number"),
        "text as bool": ({}, {"lora_db.components": components_with(good, use_rslora="no")}, "use_rslora must be"),
        "text as targets": ({}, {"lora_db.components": components_with(good, target_modules="to_q")}, "a list of"),
        "alpha 1e300": ({}, {"lora_db.components": components_with(good, alpha=1e300)}, "scales each update by"),
        "a list": ({}, {"lora_db.components": "[1, 2]"}, "lora_db.components is not a table of components"),
        "not JSON": ({}, {"lora_db.components": "{"}, "lora_db.components is not JSON"),
    }


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


BAD = ["exploded B", "NaN", "int8", "bool", "1-D A", "no components", "rank 4.5", "text as bool", "text as targets",
       "alpha 1e300", "a list", "not JSON"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_bad_adapter_is_one_line_naming_the_tensor_or_field(adapter_file, tmp_path, monkeypatch, capsys, case):
    from lora_db.adapters.format import read_adapter

    tensors, metadata, fragment = bad_adapters(adapter_file)[case]
    bad = rewrite(adapter_file, tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(LoraDBError) as err:
        read_adapter(bad)
    assert fragment in str(err.value) and str(bad) in str(err.value)
    code, _, lines = run_cli(monkeypatch, capsys, "info", bad)
    assert code == 1 and len(lines) == 1 and fragment in lines[0], lines


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--model", "tiny", "--prompt", "x", "--out", "{out}", "--adapter", "{bad}"],
        ["merge", "--model", "tiny", "--out", "{out}", "--adapter", "{bad}"],
        ["merge", "--into-adapter", "{out}.safetensors", "--adapter", "{good}", "--adapter", "{bad}"],
        ["export", "{bad}", "{out}"],
        ["eval", "--model", "tiny", "--instance-dir", "{photos}", "--prompt", "sks", "--out", "{out}",
         "--adapter", "{bad}"],
        ["train", "--model", "tiny", "--instance-dir", "{photos}", "--instance-prompt", "sks", "--output-dir", "{out}",
         "--max-train-steps", "1", "--init-adapter", "{bad}"],
    ],
    ids=["sample", "merge", "into-adapter", "export", "eval", "init-adapter"],
)  # fmt: skip
def test_every_reader_refuses_a_diverged_adapter(adapter_file, instance_dir, tmp_path, monkeypatch, capsys, command):
    tensors, metadata, fragment = bad_adapters(adapter_file)["exploded B"]
    bad = rewrite(adapter_file, tmp_path / "bad.safetensors", tensors, metadata)
    values = {"bad": bad, "good": adapter_file, "out": tmp_path / "out", "photos": instance_dir}
    code, _, lines = run_cli(monkeypatch, capsys, *(part.format(**values) for part in command))
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 1 and errors == [lines[-1]] and fragment in errors[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_booleans_in_files_are_read_as_booleans(adapter_file, tmp_path):
    import json

    from lora_db.adapters.format import export_peft, read_adapter

    false = rewrite(adapter_file, tmp_path / "f.safetensors", metadata={
        "lora_db.components": components_with(adapter_file, use_rslora="false", use_dora="False")
    })  # fmt: skip
    spec = read_adapter(false).specs["unet"]
    assert (spec.use_rslora, spec.use_dora) == (False, False)
    (folder,) = export_peft(adapter_file, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": "false"}))
    assert read_adapter(folder).specs["unet"].use_rslora is False
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": "sometimes"}))
    with pytest.raises(LoraDBError, match=r"adapter_config.json: use_rslora must be true or false, not 'sometimes'"):
        read_adapter(folder)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ([1, 2], "not a peft config (a JSON table of settings)"),
        ({"r": 4, "target_modules": ["to_q"]}, "no lora_alpha; the file is incomplete"),
        ({"r": "four", "lora_alpha": 4, "target_modules": ["to_q"]}, "r must be a whole number of at least 1"),
        ("{", "not readable JSON"),
    ],
)
def test_malformed_peft_configs_are_named(adapter_file, tmp_path, config, fragment):
    import json

    from lora_db.adapters.format import export_peft, read_adapter

    (folder,) = export_peft(adapter_file, tmp_path / "peft")
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for path in (folder, folder.parent):  # one peft folder, and the exported folder of components
        with pytest.raises(LoraDBError, match=re.escape("adapter_config.json: " + fragment)):
            read_adapter(path)


def test_a_training_checkpoint_is_validated_as_an_adapter(tiny_config):
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from lora_db.evaluation.evaluate import expand_adapters
    from lora_db.training.loop import train

    out = train(tiny_config(max_train_steps=1, checkpointing_steps=1)).output_dir
    weights = out / "checkpoint-1" / "trainable.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    save_file(dict(tensors, **{key: torch.full_like(tensors[key], 1e30)}), str(weights))
    with pytest.raises(LoraDBError, match=r"checkpoint-1: unet.* holds values up to 1e"):
        expand_adapters([str(out)])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"rank": "four"}))
    with pytest.raises(LoraDBError, match=r"config.json: rank must be a whole number of at least 1, not 'four'"):
        expand_adapters([str(out)])
    (out / "config.json").write_text("[]")
    with pytest.raises(LoraDBError, match=r"its config.json is not a table of options"):
        expand_adapters([str(out)])


# -- text from files on the terminal; the base model a file names -------------------------------------------------

HOSTILE = "\x1b]0;owned\x07\x1b[2J\u202e" + "A" * 5_000_000  # sets the title, clears the screen, reverses, fills


def test_text_from_a_file_is_printed_escaped_and_cut(adapter_file, tmp_path, monkeypatch, capsys, caplog):
    import json

    bad = rewrite(adapter_file, tmp_path / "x.safetensors", metadata={
        "instance_prompt": HOSTILE, "base_model": "\x1b[2Jtiny", "quantize_base": "nf4\x1b[31m", "steps": "\r1",
    })  # fmt: skip
    code, out, _ = run_cli(monkeypatch, capsys, "info", bad)
    assert code == 0 and "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in out and len(out) < 3000 and "more characters)" in out
    code, out, _ = run_cli(monkeypatch, capsys, "info", "--json", bad)
    assert code == 0 and "\x1b" not in out and len(json.loads(out)["instance_prompt"]) < 1000
    caplog.set_level(logging.INFO, logger="lora_db")
    sample = ("sample", "--model", "tiny", "--adapter", bad, "--prompt", "x", "--num-inference-steps", "1")
    code, out, lines = run_cli(monkeypatch, capsys, *sample, "--out", tmp_path / "samples")
    assert code == 0 and "\x1b" not in "".join([out, *lines, caplog.text])
    assert "trained on \\x1b[2Jtiny (its metadata says), not tiny" in caplog.text
    assert "trained on an nf4\\x1b[31m base" in caplog.text
    logging.getLogger("lora_db").warning("%s", HOSTILE)  # any log line of lora-db, once the CLI has run
    assert "\x1b" not in caplog.text and len(caplog.text) < 10_000


@pytest.mark.parametrize("base", ["someone/other-model", "../../../../etc", "\x1b[2J/tmp/x", "random:unidiffuser-v1"])
def test_a_base_model_named_by_a_file_is_never_loaded_without_model(adapter_file, tmp_path, monkeypatch, capsys, base):
    import lora_db.models.loading as loading

    bad = rewrite(adapter_file, tmp_path / "x.safetensors", metadata={"base_model": base})
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(loading, "load_unet_config", lambda *a, **k: pytest.fail("a model config was read"))
    for command in (["sample", "--prompt", "x"], ["merge"], ["eval", "--prompt", "x", "--instance-dir", tmp_path]):
        code, _, lines = run_cli(monkeypatch, capsys, *command, "--adapter", bad, "--out", tmp_path / "out")
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith("error: --model is required: the adapter's metadata names its base model as ")
        assert "\x1b" not in lines[0] and "pass --model with the base you mean" in lines[0]
    built_in = rewrite(adapter_file, tmp_path / "tiny.safetensors", metadata={"base_model": "tiny"})
    from lora_db.adapters.format import read_adapter
    from lora_db.adapters.hotswap import resolve_model

    assert resolve_model(None, [read_adapter(built_in)]) == "tiny"  # lora-db's own builds load nothing from outside


# -- divergence cannot pass as success ------------------------------------------------------------------------------


def test_a_diverged_run_never_exits_0(instance_dir, tmp_path, monkeypatch, capsys):
    from lora_helpers import train_command

    out = tmp_path / "out"
    code, _, lines = run_cli(monkeypatch, capsys, *train_command(instance_dir, out), "--learning-rate", "1e10",
                             "--max-train-steps", "1")  # fmt: skip
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, lines
    assert errors[0].startswith("error: training diverged at step 1: unet.") and "holds values up to " in errors[0]
    assert "lower --learning-rate 1e+10" in errors[0] and "start afresh with --overwrite" in errors[0]
    assert not (out / "adapter.safetensors").exists()


def test_no_checkpoint_after_divergence_is_kept_and_the_last_good_resumes_with_a_lower_rate(tiny_config):
    from lora_db.adapters.format import read_adapter
    from lora_db.layout import list_checkpoints
    from lora_db.training.divergence import Diverged
    from lora_db.training.loop import train

    # Warm-up from a learning rate of 0: step 1 changes nothing, step 2 at 5e9 explodes.
    diverging = {"learning_rate": 1e10, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}
    config = tiny_config(max_train_steps=4, checkpointing_steps=1, **diverging)
    with pytest.raises(Diverged, match="training diverged at step 2: ") as err:
        train(config)
    first = config.output_dir / "checkpoint-1"
    assert f"resume the last good checkpoint with --resume-from-checkpoint {first} and a lower" in str(err.value)
    assert list_checkpoints(config.output_dir) == [first]
    assert not (config.output_dir / "adapter.safetensors").exists()
    with pytest.raises(LoraDBError, match="a resumed run may only lower it"):
        train(tiny_config(**{**diverging, "learning_rate": 2e10}, max_train_steps=4, resume_from_checkpoint="latest"))
    resumed = train(tiny_config(**{**diverging, "learning_rate": 5e-3}, max_train_steps=4,
                                resume_from_checkpoint="latest"))  # fmt: skip
    assert resumed.steps == 4 and read_adapter(resumed.adapter_path).metadata["steps"] == "4"
    rates = [json.loads(line)["lr"] for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([5e9, 5e-3, 5e-3, 5e-3])  # each the next step's rate: the lower one from step 2


def test_a_non_finite_loss_retires_the_checkpoint_of_the_weights_that_made_it(tiny_config, tmp_path):
    import torch

    from lora_db.layout import CHECKPOINT_MARKER, list_checkpoints
    from lora_db.training.divergence import Diverged, check_loss

    config = tiny_config(output_dir=tmp_path / "run", alpha=512.0)
    for step in (1, 2):
        (config.output_dir / f"checkpoint-{step}").mkdir(parents=True)
        (config.output_dir / f"checkpoint-{step}" / CHECKPOINT_MARKER).write_text("{}")
    with pytest.raises(Diverged) as err:
        check_loss(config, torch.tensor(float("nan")), weights_step=2)  # step 3's loss, from step 2's weights
    message = str(err.value)
    assert message.startswith("training diverged at step 2: the loss became nan; --alpha 512 over --rank 4 scales")
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["checkpoint-1"]
    assert (config.output_dir / "abandoned" / "checkpoint-2").is_dir()
    with pytest.raises(LoraDBError, match=r"--alpha must be in \(0, 10000.0\]"):
        tiny_config(alpha=1e300)


# -- signals --------------------------------------------------------------------------------------------------------


def test_a_stop_request_is_answered_within_one_micro_batch_and_resumes_exactly(tiny_config, monkeypatch):
    import signal

    import lora_db.training.loop as loop
    from lora_db.training.stopping import TrainingInterrupted

    calls = []
    real = loop.micro_batch_loss

    def counted(run, micro_step):
        calls.append(micro_step)
        if micro_step == 5 and signal_at_five:  # step 2's second micro-batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, micro_step)

    monkeypatch.setattr(loop, "micro_batch_loss", counted)
    options = {"gradient_accumulation_steps": 4, "max_train_steps": 3, "lora_dropout": 0.1, "random_flip": True}
    signal_at_five = False
    straight = loop.train(tiny_config(output_dir=tiny_config().output_dir.parent / "straight", **options)).losses
    signal_at_five, calls[:] = True, []
    with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGTERM at step 1; checkpoint saved to ") as err:
        loop.train(tiny_config(**options))
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert calls == [0, 1, 2, 3, 4, 5], "no micro-batch after the one that was running"
    signal_at_five = False
    loop.train(tiny_config(**options, resume_from_checkpoint="latest"))
    metrics = (tiny_config().output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in metrics] == straight


def test_sigterm_during_sample_leaves_no_temporary_folder_and_no_lock(tmp_path):
    import signal
    import subprocess
    import time

    from processes import spawn

    from lora_db.locks import lock_path

    out = tmp_path / "samples"
    command = [sys.executable, "-m", "lora_db.cli", "sample", "--model", "tiny", "--prompt", "x", "--num-images", "50",
               "--num-inference-steps", "1000", "--out", str(out)]  # fmt: skip
    with spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".samples.*.tmp")):
            time.sleep(0.05)
        assert list(tmp_path.glob(".samples.*.tmp")) and lock_path(out).exists()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: stopped by SIGTERM; nothing half-written is left (outputs are written whole or not at all)"
    ]
    assert "Traceback" not in stderr and sorted(tmp_path.iterdir()) == []


def test_a_closed_stdout_ends_quietly(adapter_file):
    import subprocess

    from processes import spawn

    with spawn([sys.executable, "-m", "lora_db.cli", "info", str(adapter_file)], stdout=subprocess.PIPE,
               stderr=subprocess.PIPE) as process:  # fmt: skip
        process.stdout.close()  # `lora-db info ... | head -0`: the reader is gone before anything is printed
        stderr = process.communicate(timeout=120)[1].decode()
    assert (process.returncode, stderr) == (141, "")


def test_a_failed_write_rescues_the_weights_as_a_full_disk_does(tiny_config, monkeypatch):
    import errno

    import lora_db.training.loop as loop
    from lora_db.adapters.format import read_adapter
    from lora_db.io import WriteError, explain_os_error

    real, lines = loop.append_line, []

    def immutable(path, line):  # the folder made immutable (chattr +i) after step 2's metrics
        if len(lines) == 2:
            raise explain_os_error(OSError(errno.EPERM, "Operation not permitted"), path)
        lines.append(line)
        real(path, line)

    monkeypatch.setattr(loop, "append_line", immutable)
    config = tiny_config(max_train_steps=5, checkpointing_steps=1)
    with pytest.raises(WriteError) as err:
        loop.train(config)
    message = str(err.value)
    assert message.startswith(f"cannot write {config.output_dir / 'metrics.jsonl'}: permission denied")
    rescued = message.split("were saved to ")[1].split(" instead")[0]
    assert read_adapter(rescued).metadata["steps"] == "3" and "once it is writable again" in message
    assert f"the last checkpoint is {config.output_dir / 'checkpoint-2'}" in message


# -- one line instead of "unexpected ..." ---------------------------------------------------------------------------


def test_out_of_memory_while_setting_up_is_one_line(tiny_config, monkeypatch):
    import torch

    import lora_db.training.loop as loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "setup_run", oom)
    with pytest.raises(LoraDBError, match=r"^out of cpu memory while setting up .*: try --mixed-precision bf16"):
        loop.train(tiny_config(max_train_steps=1))


def test_a_deleted_working_folder_is_one_line(tmp_path):
    from processes import run

    gone = tmp_path / "gone"
    gone.mkdir()
    script = (
        f"import os; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); from lora_db.cli.application import main; main()"
    )
    result = run([sys.executable, "-c", script, "info", "x.safetensors"], timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: the current folder no longer exists"), (
        result.stderr
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--text-encoder-learning-rate", "1e-3"],
            "--text-encoder-learning-rate sets the text-encoder LoRA's rate: add",
        ),
        (["--output-dir", "out\udcff"], "--output-dir out\\xff is not valid UTF-8"),
    ],
)
def test_options_that_would_be_ignored_or_break_later_are_refused(
    instance_dir, tmp_path, monkeypatch, capsys, args, fragment
):
    from lora_helpers import train_command

    monkeypatch.chdir(tmp_path)  # a refused relative --output-dir would otherwise land in the checkout
    command = train_command(instance_dir, tmp_path / "out") + args
    code, _, lines = run_cli(monkeypatch, capsys, *command)
    assert code == 1 and len(lines) == 1 and fragment in lines[0], lines


# -- values read from files; ranges against what the input holds ---------------------------------------------------


def test_a_toml_option_given_twice_under_either_spelling_is_refused(tmp_path):
    from lora_db.config.train import TrainConfig

    config = tmp_path / "run.toml"
    config.write_text("learning-rate = 1e-4\nlearning_rate = 5e-3\n")
    with pytest.raises(LoraDBError, match="'learning-rate' and 'learning_rate' are the same option, given twice"):
        TrainConfig.from_sources(config)


def test_toml_paths_expand_home_and_variables_as_the_shell_does(tmp_path, monkeypatch):
    from lora_db.config.train import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    config = tmp_path / "run.toml"
    config.write_text(
        'output-dir = "~/x"\ninstance-dir = "$RUNS/photos"\nclass-dir = "${RUNS}/classes"\nclass-prompt = "a dog"\n'
        'init-adapter = "~/a.safetensors"\nresume-from-checkpoint = "$RUNS/x/checkpoint-2"\nmodel = "~/unidiffuser"\n'
    )
    loaded = TrainConfig.from_sources(config)
    assert loaded.output_dir == tmp_path / "home" / "x" and loaded.instance_dir == tmp_path / "runs" / "photos"
    assert loaded.class_dir == tmp_path / "runs" / "classes" and loaded.init_adapter == tmp_path / "home/a.safetensors"
    assert loaded.resume_from_checkpoint == str(tmp_path / "runs/x/checkpoint-2")
    assert loaded.model == str(tmp_path / "home/unidiffuser")
    config.write_text('output-dir = "$NOT_SET_ANYWHERE/x"\n')
    with pytest.raises(LoraDBError, match=r"output-dir: \$NOT_SET_ANYWHERE is not set in the environment"):
        TrainConfig.from_sources(config)


def test_a_combined_rank_above_what_the_adapters_hold_is_refused(adapter_file, tmp_path):
    from lora_db.adapters.merge import write_combined
    from lora_db.config.commands import MergeConfig

    out = tmp_path / "both.safetensors"
    adapters = [str(adapter_file), f"{adapter_file}:0.5"]
    with pytest.raises(LoraDBError, match=r"--rank 100000: the adapters. updates have rank unet 8 at most .* pass "
                       r"--rank 8 or less, or leave --rank out"):  # fmt: skip
        write_combined(MergeConfig(adapters=adapters, into_adapter=out, rank=100000))
    assert not out.exists()
    assert write_combined(MergeConfig(adapters=adapters, into_adapter=out, rank=8)).ranks == {"unet": 8}


@pytest.mark.parametrize("size", ["0GB", "0", "0.0001KB"])
def test_an_empty_gpu_memory_is_refused(monkeypatch, capsys, size):
    code, _, lines = run_cli(monkeypatch, capsys, "estimate", "--model", "tiny", "--gpu-memory", size)
    assert code == 2 and any("holds nothing; give the GPU's memory, e.g. 24GB" in line for line in lines), lines


@pytest.mark.parametrize(
    "command",
    [
        ["info", ""],
        ["export", "{a}", ""],
        ["sample", "--model", "tiny", "--prompt", "x", "--out", "{o}", "--adapter", ""],
        ["sample", "--model", "tiny", "--prompt", "x", "--out", "{o}", "--prompts-file", ""],
        ["merge", "--adapter", "", "--into-adapter", "{o}.safetensors"],
        ["eval", "--instance-dir", "", "--prompt", "x", "--out", "{o}"],
        ["demo-images", ""],
    ],
)
def test_an_empty_path_is_never_the_current_folder(adapter_file, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    args = [part.format(a=adapter_file, o=tmp_path / "out") for part in command]
    code, _, lines = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and len(lines) == 1 and " is empty" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# -- class images recorded as they are written ----------------------------------------------------------------------


def test_an_interrupted_class_generation_leaves_no_image_taken_for_a_users_photo(pristine, tmp_path, monkeypatch):
    from PIL import Image

    import lora_db.training.class_images as class_images
    from lora_db.images import save_png

    folder = tmp_path / "classes"
    written = []

    def killed_after_two(image, path, text):
        written.append(save_png(image, path, text))
        if len(written) == 2:
            raise KeyboardInterrupt  # SIGKILL's stand-in: the batch of 3 never finishes

    monkeypatch.setattr(class_images, "save_png", killed_after_two)
    plan = class_images.plan_class_images(folder, "a photo of a dog", "tiny", 3)
    with pytest.raises(KeyboardInterrupt):
        class_images.generate_class_images(pristine, plan, seed=0, num_inference_steps=1, batch_size=3)
    cats = class_images.plan_class_images(folder, "a photo of a cat", "tiny", 3)
    assert (cats.own, cats.foreign) == ([], 2), "the dog images are not the user's cat photos"
    assert len(class_images.plan_class_images(folder, "a photo of a dog", "tiny", 3).reused) == 2

    (folder / class_images.MANIFEST).unlink()  # as an older lora-db left it: images its manifest never listed
    Image.new("RGB", (8, 8)).save(folder / "mine.png")
    cats = class_images.plan_class_images(folder, "a photo of a cat", "tiny", 3)
    assert ([p.name for p in cats.own], cats.foreign) == (["mine.png"], 2)
    dogs = class_images.plan_class_images(folder, "a photo of a dog", "tiny", 3)
    assert sorted(p.name for p in dogs.reused) == sorted(p.name for p in written)
