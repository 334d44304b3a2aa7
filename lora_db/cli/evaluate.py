"""`lora-db eval`: a thin typer command over lora_db.evaluation.

    lora-db eval --model tiny-world --adapter heart-run --instance-dir photos --prompt "a photo of sks toy" \
        --prompt "a photo of a blue ring" --class-prompt "a photo of a toy" --num-images 4 --out heart-eval

Options, defaults and help text come from EvalConfig (lora_db.config.evaluate) through the one option generator.
"""

from __future__ import annotations

from typing import Any

import typer

from lora_db.cli.options import build_config, with_config_options
from lora_db.config.evaluate import EvalConfig

app = typer.Typer()


@app.command("eval")
@with_config_options(EvalConfig)
def eval_command(**values: Any) -> None:
    """Score adapters (and the base) against the subject's photos: CLIP-I, DINO (a judge), pixel, CLIP-T, prior
    drift, diversity, beside the photos, the ceiling (photos through the VAE) and --describe.

    A run folder as --adapter evaluates each checkpoint and its final adapter, plots subject fidelity against the
    step and names the best checkpoint. Example (docs/eval.md):

        lora-db eval --adapter heart --instance-dir photos \\
          --prompt "a photo of sks toy" --prompt "a photo of a blue ring" \\
          --class-prompt "a photo of a toy" \\
          --describe "a photo of a red toy with pink stripes" --out heart-eval
    """
    config = build_config(EvalConfig, values)
    from lora_db.evaluation.evaluate import evaluate, table_lines

    result = evaluate(config)
    if config.quantize_base != "none":
        typer.echo(f"every row sampled on the {config.quantize_base}-quantized base")
    for line in table_lines(result):
        typer.echo(line)
    typer.echo(f"results: {result.out / 'eval.json'}")
    typer.echo(f"grids: {', '.join(str(p) for p in result.grids)}")
    if result.plot is not None:
        typer.echo(f"plot: {result.plot}")
