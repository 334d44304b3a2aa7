"""Child processes for tests that cannot outlive a timeout: the whole process tree is killed, not only its root.

A test that starts `lora-db` (or torchrun, whose workers run in sessions of their own) uses `run` or `spawn`
instead of subprocess: on a timeout or an assertion failure every descendant still alive is SIGKILLed, so a
hung rank can never keep the suite (or CI) waiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first found, grandchildren after), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process, its process group and every descendant, wherever they moved their session."""
    victims = descendants(process.pid)
    groups = set()
    for pid in [process.pid, *victims]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for pid in [process.pid, *victims]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def spawn(command: list[str], **kwargs):
    """subprocess.Popen in a session of its own; on leaving the block, whatever is still running is killed."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None or descendants(process.pid):
            kill_tree(process)
        for stream in (process.stdout, process.stderr, process.stdin):
            if stream is not None:
                stream.close()


def run(command: list[str], *, timeout: float, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) whose timeout kills the whole process tree."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    with spawn(command, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result
