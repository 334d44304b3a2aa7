"""`lora-db sample`, `merge`, `info`, `export` and `caption`: thin typer commands over lora_db.adapters.

    lora-db sample --adapter robot/adapter.safetensors --adapter none --prompt "a photo of sks robot" --out samples
    lora-db merge --adapter robot/adapter.safetensors --out robot-merged
    lora-db info robot/adapter.safetensors
    lora-db export robot/adapter.safetensors --format peft robot-peft
    lora-db caption photos/ --prefix "a photo of sks"

Options, defaults and help text come from SampleConfig / MergeConfig / InfoConfig / ExportConfig
(lora_db.config.commands) through the one option generator. Each command imports the library when it runs, so
--help and usage errors never import torch.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from lora_db.cli.options import build_config, with_config_options
from lora_db.config.commands import CaptionConfig, ExportConfig, InfoConfig, MergeConfig, SampleConfig
from lora_db.layout import ADAPTER_FILE, is_run_folder
from lora_db.logs import MAX_SHOWN, printable

app = typer.Typer()


@app.command("sample")
@with_config_options(SampleConfig)
def sample_command(**values: Any) -> None:
    """Sample adapters side by side from one loaded base: a grid row per adapter, a column per prompt and seed.

    An adapter is a file, a training run's folder, or either with a weight (FILE:0.8). Example:

        lora-db sample --adapter none --adapter robot --adapter toy:0.8 \\
          --prompt "a photo of sks robot" --num-images 2 --out samples
    """
    config = build_config(SampleConfig, values)
    from lora_db.adapters.sample import sample

    _print_sample(sample(config))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("ch") else "s")


def _print_sample(result) -> None:
    for caption in result.captions:  # generated text: escaped like text from a file
        typer.echo(f"{caption['row']} (seed {caption['seed']}): {printable(caption['caption'])}")
    if result.grid is not None:
        typer.echo(f"grid: {result.grid} ({_count(len(result.rows), 'row')}: {', '.join(result.rows)})")
        typer.echo(f"images: {_count(len(result.images), 'PNG')} in {result.out}")
    else:
        typer.echo(f"captions: {result.out / 'captions.txt'} and captions.json")
    typer.echo(f"base model load: {result.base_load_s:.2f} s")
    if result.adapter_load_s:
        loads = result.adapter_load_s.values()
        typer.echo(
            f"adapter load (inject + weights): {1000 * sum(loads) / len(loads):.1f} ms mean, "
            f"{_count(len(loads), 'adapter')}"
        )
    switches = result.switch_s
    typer.echo(
        f"adapter switch: {1000 * sum(switches) / len(switches):.2f} ms mean, "
        f"{1000 * max(switches):.2f} ms max, {_count(len(switches), 'switch')}"
    )


@app.command("merge")
@with_config_options(MergeConfig)
def merge_command(**values: Any) -> None:
    """Fold adapters into the base weights (a stock diffusers pipeline), or combine them into one adapter.

    Examples:

        lora-db merge --adapter robot --out robot-merged
        lora-db merge --adapter a.safetensors:0.6 --adapter b.safetensors:0.4 \\
          --into-adapter ab.safetensors --rank 4
    """
    config = build_config(MergeConfig, values)
    from lora_db.adapters.merge import merge, write_combined

    if config.into_adapter is not None:
        _print_combined(write_combined(config), config)
    else:
        result = merge(config)
        onto = f", onto the {result.dequantized_base} base dequantized" if result.dequantized_base else ""
        typer.echo(f"merged {result.layers} layers into {result.out} ({config.save_dtype}{onto})")
        typer.echo(f"base model load: {result.base_load_s:.2f} s")


def _print_combined(result, config: MergeConfig) -> None:
    ranks = ", ".join(f"{component} rank {rank}" for component, rank in result.ranks.items())
    typer.echo(f"wrote {result.out}: {result.layers} layers, {ranks}")
    if config.rank is None:
        typer.echo("exact: ranks concatenated, each adapter's weight x scale folded into its B")
    else:
        typer.echo(f"SVD to rank {config.rank}: relative error {result.relative_error:.3g} (Frobenius, all layers)")


@app.command("info")
@with_config_options(InfoConfig)
def info_command(**values: Any) -> None:
    """Describe an adapter from its metadata: base model, components, rank, alpha, targets, size, training.

    A training run's folder is read as `lora-db eval` reads it: its final adapter (or, if it has none yet, its
    latest checkpoint) is described, and its checkpoints are listed.
    """
    config = build_config(InfoConfig, values)
    from lora_db.adapters.format import describe_adapter, read_adapter

    if is_run_folder(config.file):
        from lora_db.evaluation.evaluate import expand_adapters

        candidates = expand_adapters([str(config.file)])[1:]  # the base comes first
        final = config.file / ADAPTER_FILE
        read = str(final) if final.is_file() else candidates[-1].source  # the final adapter, else the last checkpoint
        info = describe_adapter(read_adapter(final) if final.is_file() else candidates[-1].adapter)
        info["run"] = {"folder": str(config.file), "steps": [c.step for c in candidates], "read": read}
    else:
        info = describe_adapter(read_adapter(config.file))
    typer.echo(json.dumps(_cut(info), indent=2) if config.as_json else "\n".join(info_lines(info)))


def _cut(value: Any) -> Any:
    """Every string from the file cut to a sane length (json.dumps escapes control characters itself)."""
    if isinstance(value, str):
        return (
            value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + f"... ({len(value) - MAX_SHOWN} more characters)"
        )
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    return [_cut(item) for item in value] if isinstance(value, list) else value


def _quoted(value: Any) -> str:
    return f"'{printable(value)}'"


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and not isinstance(value, bool) else printable(value)


def info_lines(info: dict) -> list[str]:
    """`lora-db info` as text; every value from the file escaped and cut (`printable`), whatever its type."""
    lines = [
        f"file          {printable(info['file'])} ({info['size_bytes'] / 1024:.1f} KiB, {printable(info['format'])})",
        f"base model    {printable(info['base_model']) or 'unknown'} (from its metadata)",
    ]
    if info["instance_prompt"]:
        trained = f"{printable(info['steps'])} steps on {_quoted(info['instance_prompt'])}"
        if info["class_prompt"]:
            trained += f", prior {_quoted(info['class_prompt'])}"
        lines.append(f"trained       {trained}" + (f" at {printable(r)} px" if (r := info["resolution"]) else ""))
    if (quantized := info.get("quantize_base")) not in (None, "", "none"):
        kind = printable(quantized)
        lines.append(
            f"trained on    a {kind}-quantized base (QLoRA): sample it with --quantize-base {kind}, or merge it with "
            "--dequantized-base (onto the base training saw) or without (onto the full-precision base)"
        )
    sources = info.get("combined_from", [])
    for source in sources if isinstance(sources, list) else [sources]:
        if isinstance(source, dict):
            described = f"{printable(source.get('path'))} x{_number(source.get('weight'))}"
            lines.append(f"combined from {described} ({_quoted(source.get('instance_prompt', ''))})")
        else:
            lines.append(f"combined from {printable(source)}")
    if isinstance(combination := info.get("combination"), dict):
        lines.append(
            f"combination   {printable(combination.get('method'))}, relative error "
            f"{_number(combination.get('relative_error'))}"
        )
    for component, part in info["components"].items():
        lines.append(
            f"{component:<13} rank {part['rank']}, alpha {part['alpha']:g} (scale {part['scale']:g}), "
            + ("" if part["variant"] == "LoRA" else f"{part['variant']}, ")
            + f"{part['layers']} layers ({printable(', '.join(part['target_modules']))}), "
            f"{part['parameters']:,} parameters"
        )
    if info.get("tokens"):
        lines.append(f"tokens        {printable(', '.join(info['tokens']))} (pivotal tuning: their embeddings)")
    version = f", lora-db {printable(v)}" if (v := info["lora_db_version"]) else ""
    lines.append(f"parameters    {info['parameters']:,}{version}")
    if "run" in info:
        steps = ", ".join(str(step) for step in info["run"]["steps"])
        lines.append(
            f"run folder    adapters at steps {steps} (eval scores each); this is {printable(info['run']['read'])}"
        )
    return lines


@app.command("export")
@with_config_options(ExportConfig)
def export_command(**values: Any) -> None:
    """Export an adapter as peft folders that PeftModel.from_pretrained loads onto the U-ViT and the text encoder.

    Example:

        lora-db export robot/adapter.safetensors --format peft robot-peft
    """
    config = build_config(ExportConfig, values)
    from lora_db.adapters.format import export_peft

    for folder in export_peft(config.adapter, config.out, overwrite=config.overwrite):
        typer.echo(f"{config.format}: {folder}")


@app.command("caption")
@with_config_options(CaptionConfig)
def caption_command(**values: Any) -> None:
    """Write a caption beside every photo (NAME.txt) with UniDiffuser's own image-to-text mode.

    Existing captions are kept unless --overwrite. Example:

        lora-db caption photos --prefix "a photo of sks"
    """
    config = build_config(CaptionConfig, values)
    from lora_db.adapters.caption import caption

    result = caption(config)
    for path, text in result.written.items():  # generated text: escaped like text from a file
        typer.echo(f"{path.name}: {printable(text)}")
    typer.echo(f"wrote {_count(len(result.written), 'caption')} in {config.folder}")
    if result.kept:
        typer.echo(f"kept {_count(len(result.kept), 'existing caption')} (--overwrite replaces them)")
