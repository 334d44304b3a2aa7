"""Stop signals that wait for the few lines in which a file system change must not be cut in half.

lora-db's stop handlers raise an exception where the program is, so that every temporary file and lock is cleaned
up on the way out. Python runs a handler between any two bytecodes, which includes the lines between creating a
temporary folder and the `try` that removes it, and the two renames that swap a finished folder for the previous
one. Those lines run inside `uninterrupted()`: a handler wrapped by `deferrable` that fires there is only recorded,
and runs as the block ends, when everything created is known to its cleanup. The blocks are short (a mkdtemp, an
open and a lock, a rename or two, a cleanup): never a wait, a computation or an fsync of many files.

Handlers run in the main thread only, so only the main thread's blocks defer them; elsewhere the block does nothing.

A signal can still land in a `finally` before its cleanup starts. So every temporary file, folder and lock file is
also registered as a leftover (`leftover()`, in the block that creates it) until it is renamed into place or removed,
and the command's entry point removes whatever is still registered as it ends (`remove_leftovers`): after one stop
signal, wherever it landed, nothing is left beside an output.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from types import FrameType

Handler = Callable[[int, FrameType | None], object]

_depth = 0  # the main thread's nesting of uninterrupted() blocks
_pending: list[tuple[Handler, int]] = []  # handlers held back by the current block, in arrival order


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back `deferrable` signal handlers for the block; the first one held runs as it ends (raising there)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            handler, signum = _pending[0]
            _pending.clear()  # one signal ends the block's command; later ones arrived while it was being answered
            handler(signum, None)


def deferrable(handler: Handler) -> Handler:
    """`handler` as a signal handler that waits for the end of the current `uninterrupted()` block, if any."""

    def wrapped(signum: int, frame: FrameType | None) -> object:
        if _depth:
            _pending.append((handler, signum))
            return None
        return handler(signum, frame)

    wrapped.__wrapped__ = handler
    return wrapped


# No lock: a stop handler raising inside `with lock:` can leave the lock held (Python does not make that atomic), and
# the dictionary's single operations are atomic for other threads.
_leftovers: dict[int, Callable[[], object]] = {}
_tokens = itertools.count()


def leftover(remove: Callable[[], object]) -> int:
    """Register what `remove()` removes (a temporary copy, a lock file) until `done(token)`; call it in the
    `uninterrupted()` block that creates the thing, so that no signal can fall between the two."""
    token = next(_tokens)
    _leftovers[token] = remove
    return token


def done(token: int | None) -> None:
    """The registered thing was renamed into place or removed: nothing to remove at the end any more."""
    _leftovers.pop(token, None)


def remove_leftovers() -> None:
    """Remove everything still registered, newest first (a temporary folder before the lock of its output)."""
    for token in sorted(list(_leftovers), reverse=True):
        remove = _leftovers.pop(token, None)
        if remove is not None:
            with contextlib.suppress(OSError):
                remove()
