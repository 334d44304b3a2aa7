"""Reliability, round three: each class of fault a hostile or unlucky user found, tested as a class.

Locks every command shares, --overwrite that keeps the user's files, divergence that cannot pass as success, one
adapter validation for every reader, class images recorded as they are written, signals answered, values read from
files, untrusted text on the terminal, and specific one-line errors where "unexpected ..." stood.
"""

from __future__ import annotations

import os
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
