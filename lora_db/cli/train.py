"""`lora-db demo`, `train`, `estimate` and `demo-images`: thin typer commands over lora_db.training.

    lora-db demo                                               # tiny-world learns a subject it never saw
    lora-db demo-images photos/
    lora-db train --model tiny --instance-dir photos/ --instance-prompt "a photo of sks dog" --output-dir out/
    lora-db train --config run.toml --max-train-steps 800     # the command line wins over the file
    lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing \
        --optimizer adamw8bit --cache-latents --gpu-memory 24GB

`estimate` takes every `lora-db train` option (the folders are optional there) and traces two training steps of
the real training code on fake tensors; see lora_db/training/estimate.py for how, and benchmarks/README.md for how
close it is. Options come from TrainConfig / EstimateConfig / DemoImagesConfig / DemoConfig through the one option
generator. Each command builds and checks its config before importing the library, so that a usage error answers
without importing torch.
"""

from __future__ import annotations

from typing import Any

import typer

from lora_db.cli.help import usage_error
from lora_db.cli.options import ConfigFile, build_config, build_train_config, with_config_options
from lora_db.config.commands import DemoConfig, DemoImagesConfig
from lora_db.config.evaluate import EstimateConfig, parse_memory
from lora_db.config.train import TrainConfig

app = typer.Typer()


@app.command("demo")
@with_config_options(DemoConfig)
def demo_command(**values: Any) -> None:
    """Watch tiny-world (a small UniDiffuser shipped with lora-db) learn a subject it never saw, in a minute or two.

    Writes five photos of the subject, trains a LoRA on them (rank 8 on attention and MLP, 1200 steps at lr 2e-3) and
    samples the subject prompt before and after training at the same seeds, into FOLDER/before-after.png.

        lora-db demo
        lora-db demo demo-bolt --subject bolt
    """
    config = build_config(DemoConfig, values)
    from lora_db.training.demo import run_demo

    result = run_demo(config)
    typer.echo(f"before/after grid: {result.grid}")
    typer.echo(f"pixel score against the photos (1 = identical): before {result.before:.3f}, after {result.after:.3f}")
    typer.echo(f"adapter: {result.adapter} ({result.seconds:.0f} s in all)")


@app.command("train")
@with_config_options(TrainConfig)
def train_command(ctx: typer.Context, config_file: ConfigFile = None, **values: Any) -> None:
    """Train a DreamBooth LoRA adapter (or, with --method full, every U-ViT weight).

    Example (tiny-world is a small UniDiffuser shipped with lora-db; docs/training.md has more):

        lora-db demo-images photos --subject heart
        lora-db train --model tiny-world --instance-dir photos \\
          --instance-prompt "a photo of sks toy" --output-dir heart \\
          --max-train-steps 400 --learning-rate 1e-3
    """
    config = build_train_config(config_file, values)
    missing = config.missing_run_inputs()
    if missing:
        usage_error(ctx, f"Missing option{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}.")
    from lora_db.training.loop import train

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

    Takes every `lora-db train` option; the folders are optional. Example:

        lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 \\
          --gradient-checkpointing --optimizer adamw8bit --cache-latents \\
          --gpu-memory 8GB
    """
    options = build_config(EstimateConfig, values)
    try:
        memory = parse_memory(options.gpu_memory) if options.gpu_memory is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--gpu-memory'") from None
    config = build_train_config(config_file, values)
    from lora_db.training.estimate import estimate_memory, local_gpu_bytes

    estimate = estimate_memory(config, device=options.device)
    typer.echo(estimate.format(memory or (local_gpu_bytes() if options.device == "cuda" else None)))


@app.command("demo-images")
@with_config_options(DemoImagesConfig)
def demo_images_command(**values: Any) -> None:
    """Write synthetic photos of one subject (a toy robot, or with --subject one of tiny-world's held-out subjects),
    for demos and tests without downloads."""
    config = build_config(DemoImagesConfig, values)
    from lora_db.locks import output_lock
    from lora_db.synthetic.demo import make_demo_images
    from lora_db.synthetic.subjects import write_subject_photos

    with output_lock(config.folder, "FOLDER"):
        if config.subject is None:
            paths = make_demo_images(config.folder, count=config.count, size=config.size, seed=config.seed)
        else:
            paths = write_subject_photos(config.subject, config.folder, config.count, config.size, config.seed)
    typer.echo(f"wrote {len(paths)} photos to {config.folder}")
