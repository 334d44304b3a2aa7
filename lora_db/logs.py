"""What lora-db prints: the libraries' per-load warnings quieted, and text from files escaped and cut to size.

Light on purpose: the CLI calls it before any command imports torch."""

from __future__ import annotations

import logging
import os
import sys


def quiet_library_logs() -> None:
    """diffusers/transformers warn about UniDiffuser's deprecation and tiny-model details on every load.

    Environment variables they read when imported, so that the CLI need not import them (seconds) to set this;
    a library already imported gets its verbosity set directly.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes warns at import about an optional 4-bit CPU kernel that 8-bit Adam does not use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()


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
