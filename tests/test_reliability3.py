"""Reliability, round three: each class of fault a hostile or unlucky user found, tested as a class.

Locks every command shares, --overwrite that keeps the user's files, divergence that cannot pass as success, one
adapter validation for every reader, class images recorded as they are written, signals answered, values read from
files, untrusted text on the terminal, and specific one-line errors where "unexpected ..." stood.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from lora_helpers import PROMPT, make_adapter, run_cli

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


@pytest.mark.parametrize("base", ["someone/other-model", "../../../../etc", "\x1b[2J/tmp/x"])
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
