"""`lora-db train`, `lora-db estimate` and `lora-db demo-images`: thin typer commands over lora_db.training.

    lora-db demo-images photos/
    lora-db train --model tiny --instance-dir photos/ --instance-prompt "a photo of sks dog" --output-dir out/
    lora-db train --config run.toml --max-train-steps 800     # the command line wins over the file
    lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing \
        --optimizer adamw8bit --cache-latents --gpu-memory 24GB

`estimate` takes every `lora-db train` option (the folders are optional there) and traces two training steps of
the real training code on fake tensors; see lora_db/training/estimate.py for how, and benchmarks/README.md for how
close it is. Options come from TrainConfig / EstimateConfig / DemoImagesConfig through the one option generator.
"""

from __future__ import annotations

from typing import Any

import typer

from lora_db.cli.options import ConfigFile, build_config, build_train_config, with_config_options
from lora_db.config.commands import DemoImagesConfig
from lora_db.config.evaluate import EstimateConfig
from lora_db.config.train import TrainConfig

app = typer.Typer()


@app.command("train", no_args_is_help=True)
@with_config_options(TrainConfig)
def train_command(config_file: ConfigFile = None, **values: Any) -> None:
    """Train a DreamBooth LoRA adapter (or, with --method full, every U-ViT weight).

    Example: lora-db train --model tiny --instance-dir photos --instance-prompt "a photo of sks dog"
    --output-dir out --max-train-steps 30 --learning-rate 5e-3
    """
    from lora_db.training.loop import train

    config = build_train_config(config_file, values)
    result = train(config)
    if result.adapter_path is not None:
        typer.echo(f"adapter: {result.adapter_path}")
        typer.echo(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if result.validation_dir is not None:
        typer.echo(f"validation images: {result.validation_dir}")


@app.command("estimate")
@with_config_options(EstimateConfig, TrainConfig)
def estimate_command(config_file: ConfigFile = None, **values: Any) -> None:
    """Predict the peak memory of a training step, broken down by component, and whether it fits.

    Example: lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing
    --optimizer adamw8bit --cache-latents --gpu-memory 8GB
    """
    from lora_db.training.estimate import estimate_memory, local_gpu_bytes, parse_memory

    options = build_config(EstimateConfig, values)
    try:
        memory = parse_memory(options.gpu_memory) if options.gpu_memory is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    config = build_train_config(config_file, values)
    estimate = estimate_memory(config, device=options.device)
    typer.echo(estimate.format(memory or (local_gpu_bytes() if options.device == "cuda" else None)))


@app.command("demo-images")
@with_config_options(DemoImagesConfig)
def demo_images_command(**values: Any) -> None:
    """Write synthetic photos of one subject (a toy robot), for demos and tests without downloads."""
    from lora_db.locks import output_lock
    from lora_db.synthetic.demo import make_demo_images

    config = build_config(DemoImagesConfig, values)
    with output_lock(config.folder, "FOLDER"):
        paths = make_demo_images(config.folder, count=config.count, size=config.size, seed=config.seed)
    typer.echo(f"wrote {len(paths)} photos to {config.folder}")
