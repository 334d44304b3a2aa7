"""`lora-db eval`: a thin typer command over lora_db.evaluate.

    lora-db eval --model tiny-world --adapter robot --instance-dir photos --prompt "a photo of sks robot" \
        --class-prompt "a photo of a robot" --num-images 4 --out robot-eval

Defaults and help text come from the EvalConfig fields, the one place they are defined.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from .config import Quantization
from .eval_config import EvalConfig


def _eval(name: str, flag: str | None = None):
    field = next(f for f in dataclasses.fields(EvalConfig) if f.name == name)
    return typer.Option(flag or "--" + name.replace("_", "-"), help=field.metadata["help"])


_DEFAULTS = SimpleNamespace(
    **{f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
)


def eval_command(
    out: Annotated[Path, _eval("out")],
    instance_dir: Annotated[Path, _eval("instance_dir")],
    prompt: Annotated[list[str], _eval("prompts", "--prompt")],
    adapter: Annotated[list[str] | None, _eval("adapters", "--adapter")] = None,
    model: Annotated[str | None, _eval("model")] = _DEFAULTS.model,
    class_prompt: Annotated[str | None, _eval("class_prompt")] = _DEFAULTS.class_prompt,
    num_images: Annotated[int, _eval("num_images")] = _DEFAULTS.num_images,
    seed: Annotated[int, _eval("seed")] = _DEFAULTS.seed,
    num_inference_steps: Annotated[int, _eval("num_inference_steps")] = _DEFAULTS.num_inference_steps,
    guidance_scale: Annotated[float, _eval("guidance_scale")] = _DEFAULTS.guidance_scale,
    clip_model: Annotated[str | None, _eval("clip_model")] = _DEFAULTS.clip_model,
    dino: Annotated[str | None, _eval("dino")] = _DEFAULTS.dino,
    identifier: Annotated[str | None, _eval("identifier")] = _DEFAULTS.identifier,
    quantize_base: Annotated[Quantization, _eval("quantize_base")] = _DEFAULTS.quantize_base,
    overwrite: Annotated[bool, _eval("overwrite")] = _DEFAULTS.overwrite,
) -> None:
    """Score adapters (and the base) with DreamBooth's metrics: CLIP-I, DINO, CLIP-T, prior drift, diversity.

    A run folder as --adapter evaluates each checkpoint and its final adapter and plots the metrics against the
    step. Example: lora-db eval --model tiny-world --adapter robot-run --instance-dir photos
    --prompt "a photo of sks robot" --class-prompt "a photo of a robot" --out robot-eval
    """
    from .evaluate import evaluate, table_lines

    config = EvalConfig(
        out=out,
        instance_dir=instance_dir,
        model=model,
        adapters=adapter or [],
        prompts=prompt,
        class_prompt=class_prompt,
        num_images=num_images,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        clip_model=clip_model,
        dino=dino,
        identifier=identifier,
        quantize_base=quantize_base,
        overwrite=overwrite,
    )
    result = evaluate(config)
    if config.quantize_base != "none":
        typer.echo(f"every row sampled on the {config.quantize_base}-quantized base")
    for line in table_lines(result):
        typer.echo(line)
    typer.echo(f"results: {result.out / 'eval.json'}")
    typer.echo(f"grids: {', '.join(str(p) for p in result.grids)}")
    if result.plot is not None:
        typer.echo(f"plot: {result.plot}")


def register(app: typer.Typer) -> None:
    app.command("eval", no_args_is_help=True)(eval_command)
