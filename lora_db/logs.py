"""What lora-db prints: the libraries' per-load warnings quieted, and text from files escaped and cut to size.

Light on purpose: the CLI calls it before any command imports torch."""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET_LIBRARIES = "LORA_DB_QUIET_LIBRARIES"  # set by quiet_library_logs, for this process and those it starts


def quiet_library_logs() -> None:
    """The libraries' own output off: diffusers' and transformers' per-load warnings and loading bars
    ("Loading pipeline components...", "Loading weights", the hub's "Fetching N files") and deprecation warnings.
    The CLI calls it unless --verbose or --debug; lora-db's own progress bars stay.

    Environment variables they read when imported, so that the CLI need not import them (seconds) to set this;
    a library already imported is quieted directly, and one imported later by `quiet_loaded_libraries`.
    """
    os.environ[QUIET_LIBRARIES] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the hub's bars, and transformers' (it asks the hub)
    # bitsandbytes warns at import about an optional 4-bit CPU kernel that 8-bit Adam does not use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for handler in logging.getLogger().handlers:  # what reaches the root's handlers from other libraries' loggers
        handler.addFilter(LORA_DB_OR_ERRORS)
    quiet_loaded_libraries()


class LoraDBOrErrors(logging.Filter):
    """lora-db's own log lines, and only the errors of other libraries (bitsandbytes' kernel lookups, say)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.partition(".")[0] == "lora_db" or record.levelno >= logging.ERROR


LORA_DB_OR_ERRORS = LoraDBOrErrors()  # one instance: adding it to a handler twice keeps one


def quiet_loaded_libraries() -> None:
    """After quiet_library_logs, quiet what has been imported since: diffusers reads no variable for its bars, so
    model loading calls this once diffusers is in."""
    if os.environ.get(QUIET_LIBRARIES) != "1":
        return
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            library_logging = sys.modules[name].utils.logging
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()


MAX_SHOWN = 200  # characters of a string from a file shown in a message (a prompt in metadata may be megabytes)


def escape_controls(text: str) -> str:
    """`text` with every character a terminal would act on written out instead: control and format characters
    (escape sequences, carriage returns, bidi overrides) as \\x1b / \\n / \\u202e, undecodable bytes as \\xff."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (Python's surrogateescape)
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode("ascii")


def printable(value: object, limit: int = MAX_SHOWN) -> str:
    """A value from a file, safe and short to print: escaped (`escape_controls`) and cut to `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) - limit
    return escape_controls(text[:limit]) + (f"... ({cut} more characters)" if cut > 0 else "")


MAX_LINE = 2000  # characters of one log or error line


def printable_line(text: str) -> str:
    """One line lora-db prints (a log line, an error): escaped as `printable`, cut to MAX_LINE characters."""
    return text if len(text) <= MAX_LINE and text.isprintable() else printable(text, MAX_LINE)


class EscapeControls(logging.Filter):
    """Every lora-db log line escaped and cut (`printable_line`): a path or prompt from a file cannot set the
    terminal's title, clear it, break the line or fill the screen."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        line = printable_line(message)
        if line is not message:
            record.msg, record.args = line, ()
        return True


ESCAPE_CONTROLS = EscapeControls()  # one instance: adding it to a logger twice keeps one
