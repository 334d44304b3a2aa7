"""One writer per output: an exclusive lock on a command's output folder (or file) for as long as it writes there.

    with output_lock(Path("runs/sks-dog"), "--output-dir"):
        ...  # any other lora-db command writing runs/sks-dog now fails at once, naming this process

Every command locks the same file for the same output: `PARENT/.NAME.lora-db.lock`, beside the output, named after
the real folder (symbolic links resolved), so `train --output-dir X`, `sample --out X`, `merge --out X`, `eval --out X`
and `export ... X` all see each other, also when the output is a folder that is replaced whole. The lock is taken
before the output is checked and held until the last write.

The lock is `fcntl.flock`: the kernel releases it when the process ends in any way (SIGKILL and crashes included),
so a dead owner's lock never blocks anyone; the file holds the owner's process id for the message. The lock file is
opened without following symbolic links and never truncated unless it is a lock file of lora-db: a link or another
file under that name is refused, not emptied. Runs that share a --class-dir take turns generating into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from lora_db.errors import LoraDBError
from lora_db.interrupts import done, leftover, uninterrupted
from lora_db.io import explain_os_error, remove_stale_copies

logger = logging.getLogger("lora_db")

LOCK_SUFFIX = ".lora-db.lock"
_OWNER_NOTE = re.compile(rb"\d+ [^\s]*\n?")  # what a lock file of lora-db holds: "PID HOST\n", or nothing yet


class OutputInUse(LoraDBError):
    """Another live process holds the output's lock."""


def real_output(output: str | os.PathLike, option: str) -> Path:
    """The output as an absolute path with symbolic links resolved; a link to nowhere (or to itself) is refused."""
    output = Path(output)
    if output.is_symlink() and not output.exists():
        raise LoraDBError(
            f"{option} {output} is a symbolic link to {os.readlink(output)}, which does not exist or loops back; "
            "remove the link or choose another folder"
        )
    real = Path(os.path.realpath(output))
    if not real.name:
        raise LoraDBError(f"{option} {output} is the root folder; choose a folder below it")
    return real


def lock_path(output: str | os.PathLike, option: str = "--out") -> Path:
    """The one lock file of an output, for every command: PARENT/.NAME.lora-db.lock beside the real folder."""
    real = real_output(output, option)
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        return "another process"
    if len(text) >= 2 and text[1] != socket.gethostname():
        return f"process {text[0]} on {text[1]}"
    return f"process {text[0]}" if text else "another process"


def _open_lock_file(path: Path, option: str, output: Path) -> int:
    """Create the lock file, or open the existing one; never through a symbolic link, never another kind of file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LoraDBError(
                f"{option} {output}: its lock file {path} is a symbolic link, which lora-db does not follow (it would "
                "write where the link points); remove the link"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not _OWNER_NOTE.fullmatch(os.pread(fd, 256, 0)):
        os.close(fd)
        raise LoraDBError(
            f"{option} {output}: {path} is in the way of its lock file and is not one of lora-db (a hard link, a "
            "special file, or other data); lora-db leaves it alone: move it away, or choose another folder"
        )
    return fd


class _Held:
    """What output_lock has created so far, for its cleanup: the lock file's descriptor and the parent folders."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.created: list[Path] = []


def _lock(path: Path, option: str, output: Path, wait: bool, held: _Held) -> None:
    """Open and lock `path` into `held.fd`, retrying if the previous owner removed the file between our open and our
    lock. Each descriptor is in `held` from the moment it exists, so that a stop signal anywhere leaves nothing."""
    while True:
        with uninterrupted():
            try:
                held.fd = _open_lock_file(path, option, output)
            except FileNotFoundError:
                continue  # its owner removed it between our two opens
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                contended = False
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                contended = True
        if contended:
            if not wait:
                raise OutputInUse(
                    f"{option} {output} is in use by {_owner(held.fd)} (lock {path}); wait for it to finish, stop it, "
                    "or choose another folder"
                ) from None
            logger.warning("%s %s is in use by %s: waiting for it to finish", option, output, _owner(held.fd))
            fcntl.flock(held.fd, fcntl.LOCK_EX)  # a stop signal ends the wait; the cleanup then only closes the file
        with uninterrupted():
            try:
                same = os.fstat(held.fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return
            os.close(held.fd)  # we locked a file its owner had just unlinked: try again with the new one
            held.fd = None


def _release(path: Path, held: _Held) -> None:
    """Remove the lock file if it is ours (locked by us, still the file at `path`), then the folders made for it."""
    if held.fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails if another process holds it: not ours
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(held.fd).st_ino:
                path.unlink()  # while still locked, so a waiting process never locks a file that is gone
        os.close(held.fd)
        held.fd = None
    for folder in reversed(held.created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing was written into it


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last), so they can be removed again if left empty."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing[::-1]


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, option: str, *, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of `output` (a folder or a file) for the block; yields the lock file's path.

    Without `wait` a lock held by another process is an error naming it; with `wait` this process waits its turn.
    Temporary copies a killed writer left beside the output are removed once the lock is ours.
    """
    output = Path(output)
    path = lock_path(output, option)
    held = _Held()
    token = None
    try:
        try:
            with uninterrupted():  # a stop signal waits until what is created here is known to the cleanup below
                token = leftover(lambda: _release(path, held))
                held.created = _make_parents(path.parent)
            _lock(path, option, output, wait, held)
        except OSError as err:
            raise explain_os_error(err, path) from err
        note = f"{os.getpid()} {socket.gethostname()}\n".encode()
        with contextlib.suppress(OSError):  # the lock holds without the note; only a second run's message is vaguer
            os.pwrite(held.fd, note, 0)
            os.ftruncate(held.fd, len(note))  # a lock file of ours (checked on opening): an older owner's longer note
        remove_stale_copies(output)
        yield path
    finally:
        with uninterrupted():
            _release(path, held)
            done(token)
