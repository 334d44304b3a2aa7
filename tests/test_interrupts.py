"""A stop signal at any line of a write leaves the old output or the new one, whole, and nothing beside it.

Each test runs one write again and again, sending itself SIGTERM at its 1st, 2nd, 3rd ... traced line inside the
writing code (lora-db's io and locks, tempfile, shutil, pathlib), under the handlers every command installs. Whatever
line the signal lands on: the command stops (the signal is never lost), the output is the previous version or the
new one and never a mixture or nothing, and no temporary file, `.old` folder or lock file is left beside it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
from pathlib import Path

import pytest

from lora_db.cli.application import Stopped, _stops_leave_nothing
from lora_db.io import atomic_directory, atomic_write
from lora_db.locks import output_lock
from lora_db.training.stopping import TrainingInterrupted, stop_on_signals

TRACED = ("lora_db/io.py", "lora_db/locks.py", "lora_db/interrupts.py", "tempfile.py", "shutil.py", "pathlib.py")


class _SignalAt:
    """A tracer that sends this process SIGTERM at the `at`-th line executed in the traced files."""

    def __init__(self, at: int):
        self.at, self.lines, self.sent = at, 0, False

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.endswith(TRACED):
            return None
        return self.line

    def line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
        return self.line


def _let_handlers_run() -> None:
    """Python runs a pending signal handler at its next check; a call is one."""
    for _ in range(3):
        len([])


def _stop_everywhere(write, check, handlers, stopped_by) -> int:
    """Run `write` once per traced line with SIGTERM sent at that line; `check()` after each. Returns the count."""
    faulthandler.dump_traceback_later(300, exit=True)  # a stop that leaves a lock held hangs: end with the stacks
    try:
        return _stop_at_each_line(write, check, handlers, stopped_by)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _stop_at_each_line(write, check, handlers, stopped_by) -> int:
    at = 1
    while True:
        tracer = _SignalAt(at)
        stopped = False
        with handlers():
            sys.settrace(tracer)
            try:
                write()
                _let_handlers_run()
            except stopped_by:
                stopped = True
            finally:
                sys.settrace(None)
            _let_handlers_run()
        assert stopped == tracer.sent, f"SIGTERM at line {at} of the write was {'lost' if tracer.sent else 'invented'}"
        check(at)
        if not tracer.sent:
            return at - 1  # the write ran fewer lines than `at`: every line has had its signal
        at += 1


def _folder(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())} if path.is_dir() else {}


@pytest.fixture(params=["command", "training"])
def handlers(request):
    """The handlers of every command (a stop raises where the program is) and of training's loop (a first stop is a
    request; a second one, as here before training started, raises)."""
    if request.param == "command":
        return _stops_leave_nothing, Stopped

    @contextlib.contextmanager
    def training():  # `lora-db train`: the command's handlers, then training's own inside them
        with _stops_leave_nothing(), stop_on_signals():
            yield

    return training, TrainingInterrupted


def test_a_stop_at_any_line_of_a_folder_swap_leaves_the_old_folder_or_the_new_one(tmp_path, handlers):
    out = tmp_path / "samples"
    old = {"a.png": "old a", "b.png": "old b"}
    new = {"a.png": "new a", "c.png": "new c"}

    def write():
        with output_lock(out, "--out"), atomic_directory(out, replace=True) as tmp:
            for name, text in new.items():
                (tmp / name).write_text(text)

    def reset():
        for path in tmp_path.iterdir():
            for file in path.iterdir() if path.is_dir() else []:
                file.unlink()
            path.rmdir() if path.is_dir() else path.unlink()
        out.mkdir()
        for name, text in old.items():
            (out / name).write_text(text)

    def check(at):
        assert _folder(out) in (old, new), f"SIGTERM at line {at}: {_folder(out)}"
        assert [p.name for p in tmp_path.iterdir()] == ["samples"], f"SIGTERM at line {at} left {os.listdir(tmp_path)}"
        reset()

    reset()
    lines = _stop_everywhere(write, check, *handlers)
    assert lines > 50  # the tracer saw the lock, the temporary folder and the swap


def test_a_stop_at_any_line_of_a_new_folder_leaves_it_whole_or_absent(tmp_path, handlers):
    out = tmp_path / "deep" / "samples"  # its parents are made by the lock, and removed with it if left empty

    def write():
        with output_lock(out, "--out"), atomic_directory(out) as tmp:
            (tmp / "a.png").write_text("new a")

    def check(at):
        assert _folder(out) in ({}, {"a.png": "new a"}), f"SIGTERM at line {at}: {_folder(out)}"
        left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
        assert left in ([], ["deep", "deep/samples", "deep/samples/a.png"]), f"SIGTERM at line {at} left {left}"
        if out.exists():
            (out / "a.png").unlink()
            out.rmdir()
            out.parent.rmdir()

    assert _stop_everywhere(write, check, *handlers) > 30


def test_a_stop_at_any_line_of_a_file_write_leaves_the_old_file_or_the_new_one(tmp_path, handlers):
    out = tmp_path / "adapter.safetensors"
    out.write_text("old")

    def check(at):
        assert out.read_text() in ("old", "new"), f"SIGTERM at line {at}: {out.read_text()!r}"
        assert os.listdir(tmp_path) == [out.name], f"SIGTERM at line {at} left {os.listdir(tmp_path)}"
        out.write_text("old")

    assert _stop_everywhere(lambda: atomic_write(out, lambda tmp: tmp.write_text("new")), check, *handlers) > 10
