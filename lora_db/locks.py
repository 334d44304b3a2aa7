"""One writer per output: an exclusive lock on a run's --output-dir (or a `sample` / `merge` --out) for its lifetime.

    with output_lock(Path("runs/sks-dog"), "--output-dir"):
        ...  # a second `lora-db train --output-dir runs/sks-dog` now fails at once, naming this process

The lock is `fcntl.flock` on a lock file: the kernel releases it when the process ends in any way (SIGKILL and
crashes included), so a dead owner's lock never blocks anyone; the file holds the owner's process id for the
message. A folder that is replaced whole (`sample --out`, `merge --out`) is locked through a file beside it,
a training folder through `.lora-db.lock` inside it. Runs that share a --class-dir take turns generating into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from lora_db.errors import LoraDBError
from lora_db.io import explain_os_error

logger = logging.getLogger("lora_db")

LOCK_FILE = ".lora-db.lock"


class OutputInUse(LoraDBError):
    """Another live process holds the output's lock."""


def lock_path(output: Path, inside: bool) -> Path:
    return output / LOCK_FILE if inside else output.parent / f".{output.name}.lora-db.lock"


def _owner(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").split()
    except OSError:
        return "another process"
    if len(text) >= 2 and text[1] != socket.gethostname():
        return f"process {text[0]} on {text[1]}"
    return f"process {text[0]}" if text else "another process"


def _open_locked(path: Path, option: str, output: Path, wait: bool) -> int:
    """Open and lock `path`, retrying if the previous owner removed the file between our open and our lock."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # again: an owner that created the folder removes it if empty
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not wait:
                os.close(fd)
                raise OutputInUse(
                    f"{option} {output} is in use by {_owner(path)} (lock {path}); wait for it to finish, stop it, "
                    "or choose another folder"
                ) from None
            logger.warning("%s %s is in use by %s: waiting for it to finish", option, output, _owner(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its owner had just unlinked: try again with the new one


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, option: str, *, inside: bool = True, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on `output` for the block; `inside=False` locks a folder that is replaced whole.

    Without `wait` a lock held by another process is an error naming it; with `wait` this process waits its turn.
    """
    output = Path(output)
    if inside and output.exists() and not output.is_dir():
        raise LoraDBError(f"{option} {output} is a file; choose a folder")
    created = inside and not output.exists()
    path = lock_path(output, inside)
    try:
        fd = _open_locked(path, option, output, wait)
    except OSError as err:
        raise explain_os_error(err, path) from err
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError:
        pass  # the lock holds without the note; only the message for a second run would be vaguer
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so a waiting process never locks a file that is gone
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # only if the run left it empty (it failed before writing anything)
