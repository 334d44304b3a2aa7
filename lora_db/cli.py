"""The `lora-db` command line: thin typer commands that build a config and call one library function.

    lora-db demo-images photos/
    lora-db train --model tiny --instance-dir photos/ --instance-prompt "a photo of sks dog" --output-dir out/
    lora-db train --config run.toml --max-train-steps 800     # the command line wins over the file

A problem the user can fix prints one line on stderr and exits with code 1 (`--debug` or LORA_DB_DEBUG=1 shows
the traceback); usage errors keep typer's exit code 2. An error of the operating system (a full disk, a missing
permission) is one line too, and so is an unexpected error: no path shows a traceback without `--debug`.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_options import ConfigFile, build_train_config, with_dataclass_options
from .config import TrainConfig
from .errors import LoraDBError

app = typer.Typer(
    name="lora-db",
    help="Memory-optimized LoRA DreamBooth for UniDiffuser (thu-ml/unidiffuser-v1).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_DEBUG_ENV = "LORA_DB_DEBUG"


def _debug_enabled() -> bool:
    return os.environ.get(_DEBUG_ENV, "") not in ("", "0")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    if debug:
        os.environ[_DEBUG_ENV] = "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from .models import quiet_library_logs

    quiet_library_logs()


@app.command("train", no_args_is_help=True)
@with_dataclass_options(TrainConfig)
def train_command(config_file: ConfigFile = None, **values: Any) -> None:
    """Train a DreamBooth LoRA adapter (or, with --method full, every U-ViT weight).

    Example: lora-db train --model tiny --instance-dir photos --instance-prompt "a photo of sks dog"
    --output-dir out --max-train-steps 30 --learning-rate 5e-3
    """
    from .train import train

    config = build_train_config(config_file, values)
    result = train(config)
    if result.adapter_path is not None:
        typer.echo(f"adapter: {result.adapter_path}")
        typer.echo(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if result.validation_dir is not None:
        typer.echo(f"validation images: {result.validation_dir}")


@app.command("demo-images")
def demo_images_command(
    folder: Annotated[Path, typer.Argument(help="Folder to write the photos into.")],
    count: Annotated[int, typer.Option(help="How many photos.", min=1, max=10_000)] = 5,
    size: Annotated[int, typer.Option(help="Side of each photo in pixels.", min=16, max=4096)] = 256,
    seed: Annotated[int, typer.Option(help="Same seed, same photos.")] = 0,
) -> None:
    """Write synthetic photos of one subject (a toy robot), for demos and tests without downloads."""
    from .data import make_demo_images

    paths = make_demo_images(folder, count=count, size=size, seed=seed)
    typer.echo(f"wrote {len(paths)} photos to {folder}")


from .cli_adapters import register as _register_adapter_commands  # noqa: E402

_register_adapter_commands(app)

from .cli_estimate import register as _register_estimate_commands  # noqa: E402

_register_estimate_commands(app)

from .cli_eval import register as _register_eval_commands  # noqa: E402

_register_eval_commands(app)


def _thread_error(args) -> None:
    """A library's background thread (tensorboard's event writer on a full disk, say) failed: one line, no traceback.
    The main thread meets the same failure at its next call into that library and stops with its own error."""
    if _debug_enabled() or args.exc_type is SystemExit:
        threading.__excepthook__(args)
        return
    name = args.thread.name if args.thread is not None else "a background thread"
    typer.echo(f"warning: {name} stopped: {_one_line(args.exc_value)}", err=True)


def main() -> None:
    threading.excepthook = _thread_error
    try:
        app()
    except LoraDBError as err:
        if _debug_enabled():
            raise
        if not getattr(err, "quiet", False):
            typer.echo(f"error: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 1))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        if _debug_enabled():
            raise
        typer.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(1)


def _one_line(err: Exception) -> str:
    from .io import explain_os_error, os_error_of

    os_error = os_error_of(err)
    if os_error is not None:
        where = getattr(os_error, "filename", None)
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT) or (where and os_error.errno == errno.EROFS):
            return str(explain_os_error(os_error, where or "a file"))
        return f"{where}: {os_error.strerror or os_error}" if where else f"{os_error.strerror or os_error}"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"unexpected {type(err).__name__}{': ' + detail if detail else ''} "
        "(run again with --debug for the traceback, and please report it)"
    )


if __name__ == "__main__":
    main()
