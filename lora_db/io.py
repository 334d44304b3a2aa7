"""Atomic file writes: a file or folder either appears whole under its final name or not at all.

Everything is written under a temporary name in the destination folder, flushed to disk with fsync, then
renamed with `os.replace`, so a crash, a SIGKILL or a full disk leaves the previous version intact. The final
files get the permissions `open()` would give them (0666 / 0777 less the umask), not the private 0600 / 0700 of
temporary files. A write error of any library (safetensors reports a full disk as a `SafetensorError`) becomes one
line that says what happened and which file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_db.errors import LoraDBError
from lora_db.interrupts import done, leftover, uninterrupted


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


_umask_lock = threading.Lock()


def current_umask() -> int:
    # Reading the umask means setting it: keep other threads from seeing the interim value, and a stop signal from
    # leaving it set.
    with uninterrupted(), _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _as_created_by_open(path: Path, directory: bool) -> None:
    """mkstemp / mkdtemp create private files and folders; give them what `open()` / `mkdir()` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


class WriteError(LoraDBError):
    """A file could not be written (a full disk, no permission, a read-only or immutable folder): names the file."""


class DiskFullError(WriteError):
    """No space left while writing a file: the message names the file."""


_OS_ERROR_CODE = re.compile(r"os error (\d+)|code: (\d+)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind a write failure, also when a library reports it in its own exception type.

    safetensors raises `SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')`
    for a full disk.
    """
    if isinstance(err, OSError):
        return err
    if type(err).__name__ == "SafetensorError":
        match = _OS_ERROR_CODE.search(str(err))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
    return None


def explain_os_error(err: OSError, path: str | os.PathLike) -> WriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"the disk is full (no space left) while writing {path}: free some space and run again")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(
            f"cannot write {path}: permission denied, read-only or immutable; make it writable or choose another folder"
        )
    return WriteError(f"cannot write {path}: {err.strerror or err}")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a metrics record); on failure the file is cut back to what it held, never half a line."""
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(line + "\n")
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise
    except OSError as err:
        raise explain_os_error(err, path) from err


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then move the temporary file onto `path` in one rename."""
    path = Path(path)
    tmp_path = token = None
    try:
        try:
            with uninterrupted():  # a stop signal waits until the temporary file is known to the cleanup below
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                tmp_path = Path(tmp)
                token = leftover(lambda: tmp_path.unlink(missing_ok=True))
                os.close(fd)
        except OSError as err:
            raise explain_os_error(err, path) from err
        write(tmp_path)
        _as_created_by_open(tmp_path, directory=False)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        with uninterrupted():
            os.replace(tmp_path, path)
            done(token)
        fsync_dir(path.parent)
    except BaseException as err:
        if tmp_path is not None:
            with uninterrupted():
                tmp_path.unlink(missing_ok=True)
                done(token)
        os_error = os_error_of(err)
        if os_error is not None:
            raise explain_os_error(os_error, path) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False, record: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it is fsynced and renamed to `path`.

    With `replace=True` an existing `path` is swapped out only after the new folder is complete. With `record=True`
    the folder lists what lora-db wrote into it (WRITTEN_RECORD), and an existing `path` is replaced only if it holds
    nothing else: a command's output folder, which `--overwrite` may replace but never a file the user put there.
    """
    path = Path(os.path.abspath(path))
    tmp = token = None
    try:
        try:
            with uninterrupted():  # a stop signal waits until the temporary folder is known to the cleanup below
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                token = leftover(lambda: shutil.rmtree(tmp, ignore_errors=True))
        except OSError as err:
            raise explain_os_error(err, path) from err
        yield tmp
        if record:
            _record_written(tmp)
        _as_created_by_open(tmp, directory=True)
        _fsync_tree(tmp)
        if path.exists():
            if not replace:
                raise LoraDBError(f"{path} already exists")
            if record and (foreign := files_not_written(path)):
                raise LoraDBError(
                    f"{path} now holds {_some(foreign)}, which lora-db did not write; it is left as it was and the "
                    "new output was not written: move those files out and run again"
                )
            with uninterrupted():  # never cut between the two renames: `path` moved aside and nothing in its place
                _swap(tmp, path)
                done(token)
        else:
            with uninterrupted():
                os.replace(tmp, path)
                done(token)
        fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            with uninterrupted():
                shutil.rmtree(tmp, ignore_errors=True)
                done(token)
        os_error = os_error_of(err)
        if os_error is not None:
            raise explain_os_error(os_error, _name_in(path, tmp, err) if tmp else path) from err
        raise


def _swap(new: Path, path: Path) -> None:
    """Put the folder `new` in place of the folder `path`; if the second rename fails, `path` is put back."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old)
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


WRITTEN_RECORD = ".lora-db-written.json"  # in a command's output folder: every file and folder lora-db wrote there


def _entries(folder: Path) -> list[str]:
    """Every file and folder below `folder`, as relative POSIX paths (links listed, not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        below = Path(dirpath).relative_to(folder)
        found += [(below / name).as_posix() for name in (*dirnames, *filenames)]
    return found


def _record_written(folder: Path) -> None:
    (folder / WRITTEN_RECORD).write_text(json.dumps({"files": sorted(_entries(folder))}, indent=1) + "\n")


def files_not_written(folder: Path) -> list[str]:
    """What an output folder holds beyond what lora-db recorded writing there (everything, if it kept no record)."""
    try:
        recorded = json.loads((folder / WRITTEN_RECORD).read_text(encoding="utf-8"))["files"]
        recorded = {name for name in recorded if isinstance(name, str)}
    except (OSError, ValueError, KeyError, TypeError):
        recorded = set()
    return sorted(name for name in _entries(folder) if name != WRITTEN_RECORD and name not in recorded)


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} file{'s' if len(names) != 1 else ''} ({shown})"


STALE_COPY = r"\.{name}\.[a-z0-9_]{{8}}\.(?:tmp|old)"  # the temporary names atomic_write / atomic_directory use


def remove_stale_copies(path: str | os.PathLike) -> None:
    """The temporary copies of `path` a killed writer left beside it (`.NAME.xxxxxxxx.tmp` / `.old`), nothing else.
    Call it only while holding the output's lock, when no other lora-db process can be writing them."""
    path = Path(os.path.abspath(path))
    pattern = re.compile(STALE_COPY.format(name=re.escape(path.name)))
    try:
        siblings = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for sibling in siblings:
        with contextlib.suppress(OSError):
            shutil.rmtree(sibling) if sibling.is_dir() and not sibling.is_symlink() else sibling.unlink()


def _name_in(path: Path, tmp: Path, err: BaseException) -> Path:
    """The file inside `path` that failed, when the error names one in the temporary folder; else `path`."""
    filename = getattr(err, "filename", None)
    if filename and str(filename).startswith(str(tmp)):
        return path / Path(filename).relative_to(tmp)
    return path


def check_output_folder(out: Path, overwrite: bool, marker: str, option: str = "--out") -> None:
    """Refuse an existing --out unless --overwrite, and never replace a folder that holds a file lora-db did not
    write (the folder's WRITTEN_RECORD says what it did write)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LoraDBError(f"{option} {out} is a file; choose a folder")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise LoraDBError(f"{option} {out} holds the current folder, which it would replace; choose a new folder")
    if not overwrite:
        raise LoraDBError(f"{option} {out} already exists; choose another folder, or pass --overwrite to replace it")
    if not any(out.iterdir()):
        return
    if not (out / marker).is_file():
        raise LoraDBError(
            f"{option} {out} holds files lora-db did not write (no {marker}); it will not be replaced: "
            "choose another folder"
        )
    foreign = files_not_written(out)
    if foreign:
        raise LoraDBError(
            f"{option} {out} holds {_some(foreign)} that lora-db did not write; --overwrite replaces only what "
            "lora-db wrote: move them out, or choose another folder"
        )
