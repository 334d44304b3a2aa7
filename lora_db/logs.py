"""Quiet the libraries' per-load warnings; light on purpose: the CLI calls it before any command imports torch."""

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
