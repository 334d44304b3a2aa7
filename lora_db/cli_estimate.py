"""`lora-db estimate`: the peak GPU memory of a training configuration, predicted without a GPU.

    lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing \
        --optimizer adamw8bit --cache-latents --gpu-memory 24GB
    lora-db estimate --config run.toml --gpu-memory 12GB      # the options of a planned `lora-db train`

It takes every `lora-db train` option (the folders are optional here) and traces two training steps of the
real training code on fake tensors; see lora_db/estimate.py for how, and benchmarks/README.md for how close it is.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import typer

from .cli_options import ConfigFile, build_train_config, with_dataclass_options
from .config import TrainConfig


def _memory_bytes(value: str | None) -> int | None:
    from .estimate import parse_memory

    if value is None:
        return None
    try:
        return parse_memory(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _local_gpu_bytes() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def estimate_command(
    config_file: ConfigFile = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory",
            help="Memory of the GPU to check against, e.g. 24GB (binary units, as cards are labelled); "
            "defaults to this machine's GPU.",
        ),
    ] = None,
    device: Annotated[
        Literal["cuda", "cpu"],
        typer.Option(help="`cuda` predicts a GPU run; `cpu` the tensors of a CPU run (what the benchmark measures)."),
    ] = "cuda",
    **values: Any,
) -> None:
    """Predict the peak memory of a training step, broken down by component, and whether it fits.

    Example: lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing
    --optimizer adamw8bit --cache-latents --gpu-memory 8GB
    """
    from .estimate import estimate_memory

    memory = _memory_bytes(gpu_memory)
    config = build_train_config(config_file, values)
    estimate = estimate_memory(config, device=device)
    typer.echo(estimate.format(memory or (_local_gpu_bytes() if device == "cuda" else None)))


def register(app: typer.Typer) -> None:
    # A fresh wrapper each time: `python -m lora_db.cli` runs cli.py twice (as __main__ and as lora_db.cli).
    @functools.wraps(estimate_command)
    def command(**values: Any) -> None:
        estimate_command(**values)

    app.command("estimate")(with_dataclass_options(TrainConfig)(command))
