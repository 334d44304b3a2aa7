"""The `lora-db` application: the commands of lora_db.cli.train, .adapters, .evaluate and .ui, and one-line errors.

A problem the user can fix prints one line on stderr and exits with code 1 (`--debug` or LORA_DB_DEBUG=1 shows
the traceback); usage errors keep typer's exit code 2. An error of the operating system (a full disk, a missing
permission) is one line too, and so is an unexpected error: no path shows a traceback without `--debug`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import sys
import threading
from typing import Annotated

import typer
import typer.core

from lora_db.cli.adapters import app as adapter_commands
from lora_db.cli.evaluate import app as eval_commands
from lora_db.cli.help import Command, Group
from lora_db.cli.train import app as train_commands
from lora_db.cli.ui import app as ui_commands
from lora_db.errors import LoraDBError
from lora_db.interrupts import deferrable, remove_leftovers
from lora_db.io import explain_os_error, os_error_of
from lora_db.logs import ESCAPE_CONTROLS, QUIET_LIBRARIES, printable_line, quiet_library_logs

app = typer.Typer(
    name="lora-db",
    help="Memory-optimized LoRA DreamBooth for UniDiffuser (thu-ml/unidiffuser-v1). Start with `lora-db demo`.",
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help (cli/help.py) and click's plain usage errors
)

_DEBUG_ENV = "LORA_DB_DEBUG"


def _debug_enabled() -> bool:
    return os.environ.get(_DEBUG_ENV, "") not in ("", "0")


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors (implies --verbose).")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the libraries' own logs, loading bars and deprecation warnings."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    if debug:
        os.environ[_DEBUG_ENV] = "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logging.getLogger("lora_db").addFilter(ESCAPE_CONTROLS)
    if verbose or _debug_enabled():
        os.environ.pop(QUIET_LIBRARIES, None)  # a parent lora-db's choice does not outlast this one's
    else:
        quiet_library_logs()


for commands in (train_commands, adapter_commands, eval_commands, ui_commands):
    for command in commands.registered_commands:
        if command.cls in (None, typer.core.TyperCommand):  # help laid out by cli/help.py
            command.cls = Command
    app.registered_commands += commands.registered_commands


def _thread_error(args) -> None:
    """A library's background thread (tensorboard's event writer on a full disk, say) failed: one line, no traceback.
    The main thread meets the same failure at its next call into that library and stops with its own error."""
    if _debug_enabled() or args.exc_type is SystemExit:
        threading.__excepthook__(args)
        return
    name = args.thread.name if args.thread is not None else "a background thread"
    typer.echo(f"warning: {name} stopped: {_one_line(args.exc_value)}", err=True)


STDOUT_CLOSED_EXIT = 128 + signal.SIGPIPE  # what a Unix tool killed by SIGPIPE exits with (`yes | head -1`)


class Stopped(LoraDBError):
    """A stop signal outside training's loop: raised where the program is, so that every temporary file and lock is
    cleaned up on the way out (the default action of SIGTERM kills without that)."""

    def __init__(self, signum: int):
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; nothing half-written is left (outputs are written whole or "
            "not at all)"
        )
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _signals_stop_cleanly():
    """SIGINT, SIGTERM and SIGHUP raise Stopped for every command (training's loop installs its own handlers)."""

    @deferrable  # raised only outside the lines that create or swap a temporary file (lora_db.interrupts)
    def stop(signum, frame):
        raise Stopped(signum)

    signums = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _stops_leave_nothing():
    """The stop handlers for the block; then whatever a stop signal kept a cleanup from removing is removed (a stop
    that lands in a `finally` before its cleanup starts; lora_db.interrupts)."""
    try:
        with _signals_stop_cleanly():
            yield
    finally:
        remove_leftovers()


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`lora-db ... | head -1`)."""
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _check_working_directory() -> None:
    try:
        os.getcwd()
    except FileNotFoundError:
        raise LoraDBError(
            "the current folder no longer exists (it was deleted or moved); cd into an existing folder and run again"
        ) from None


def main() -> None:
    threading.excepthook = _thread_error
    try:
        _check_working_directory()
        with _stops_leave_nothing():
            app()
    except SystemExit:
        if _stdout_closed():  # the output's reader is gone: end as quietly as any Unix tool does
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
            sys.exit(STDOUT_CLOSED_EXIT)
        raise
    except LoraDBError as err:
        if _debug_enabled():
            raise
        if not getattr(err, "quiet", False):
            typer.echo(f"error: {printable_line(str(err))}", err=True)
        sys.exit(getattr(err, "exit_code", 1))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        if _debug_enabled():
            raise
        typer.echo(f"error: {printable_line(_one_line(err))}", err=True)
        sys.exit(1)


def _one_line(err: Exception) -> str:
    os_error = os_error_of(err)
    if os_error is not None:
        where = getattr(os_error, "filename", None)
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT) or (where and os_error.errno == errno.EROFS):
            return str(explain_os_error(os_error, where or "a file"))
        return f"{where}: {os_error.strerror or os_error}" if where else f"{os_error.strerror or os_error}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return (
            "out of memory: use --mixed-precision bf16 or --quantize-base nf4, fewer --num-images, or a machine with "
            "more memory (for training, `lora-db estimate` predicts the peak)"
        )
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"unexpected {type(err).__name__}{': ' + detail if detail else ''} "
        "(run again with --debug for the traceback, and please report it)"
    )


if __name__ == "__main__":
    main()
