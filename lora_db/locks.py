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


def _open_locked(path: Path, option: str, output: Path, wait: bool) -> int:
    """Open and lock `path`, retrying if the previous owner removed the file between our open and our lock."""
    while True:
        try:
            fd = _open_lock_file(path, option, output)
        except FileNotFoundError:
            continue  # its owner removed it between our two opens
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not wait:
                owner = _owner(fd)
                os.close(fd)
                raise OutputInUse(
                    f"{option} {output} is in use by {owner} (lock {path}); wait for it to finish, stop it, "
                    "or choose another folder"
                ) from None
            logger.warning("%s %s is in use by %s: waiting for it to finish", option, output, _owner(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its owner had just unlinked: try again with the new one


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
    created: list[Path] = []
    try:
        created = _make_parents(path.parent)
        fd = _open_locked(path, option, output, wait)
    except OSError as err:
        raise explain_os_error(err, path) from err
    try:
        note = f"{os.getpid()} {socket.gethostname()}\n".encode()
        with contextlib.suppress(OSError):  # the lock holds without the note; only a second run's message is vaguer
            os.pwrite(fd, note, 0)
            os.ftruncate(fd, len(note))  # a lock file of ours (checked on opening): an older owner's longer note
        remove_stale_copies(output)
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                path.unlink()  # while still locked, so a waiting process never locks a file that is gone
        os.close(fd)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if nothing was written into it
