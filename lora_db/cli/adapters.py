"""`lora-db sample`, `merge`, `info` and `export`: thin typer commands over lora_db.adapters.

    lora-db sample --adapter robot/adapter.safetensors --adapter none --prompt "a photo of sks robot" --out samples
    lora-db merge --adapter robot/adapter.safetensors --out robot-merged
    lora-db info robot/adapter.safetensors
    lora-db export robot/adapter.safetensors --format peft robot-peft

Options, defaults and help text come from SampleConfig / MergeConfig / InfoConfig / ExportConfig
(lora_db.config.commands) through the one option generator. Each command imports the library when it runs, so
--help and usage errors never import torch.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from lora_db.cli.options import build_config, with_config_options
from lora_db.config.commands import ExportConfig, InfoConfig, MergeConfig, SampleConfig
from lora_db.logs import MAX_SHOWN, printable

app = typer.Typer()


@app.command("sample", no_args_is_help=True)
@with_config_options(SampleConfig)
def sample_command(**values: Any) -> None:
    """Sample adapters side by side from one loaded base: a grid row per adapter, a column per prompt and seed.

    Example: lora-db sample --adapter none --adapter robot/adapter.safetensors --adapter toy/adapter.safetensors:0.8
    --prompt "a photo of sks robot" --num-images 2 --out samples
    """
    from lora_db.adapters.sample import sample

    _print_sample(sample(build_config(SampleConfig, values)))


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


@app.command("merge", no_args_is_help=True)
@with_config_options(MergeConfig)
def merge_command(**values: Any) -> None:
    """Fold adapters into the base weights (a stock diffusers pipeline), or combine them into one adapter.

    Examples: lora-db merge --adapter robot/adapter.safetensors --out robot-merged;
    lora-db merge --adapter a.safetensors:0.6 --adapter b.safetensors:0.4 --into-adapter ab.safetensors [--rank 4]
    """
    from lora_db.adapters.merge import merge, write_combined

    config = build_config(MergeConfig, values)
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


@app.command("info", no_args_is_help=True)
@with_config_options(InfoConfig)
def info_command(**values: Any) -> None:
    """Describe an adapter from its metadata: base model, components, rank, alpha, targets, size, training."""
    from lora_db.adapters.format import describe_adapter, read_adapter

    config = build_config(InfoConfig, values)
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
    version = f", lora-db {printable(v)}" if (v := info["lora_db_version"]) else ""
    lines.append(f"parameters    {info['parameters']:,}{version}")
    return lines


@app.command("export", no_args_is_help=True)
@with_config_options(ExportConfig)
def export_command(**values: Any) -> None:
    """Export an adapter as peft folders that PeftModel.from_pretrained loads onto the U-ViT and the text encoder.

    Example: lora-db export robot/adapter.safetensors --format peft robot-peft
    """
    from lora_db.adapters.format import export_peft

    config = build_config(ExportConfig, values)
    for folder in export_peft(config.adapter, config.out, overwrite=config.overwrite):
        typer.echo(f"{config.format}: {folder}")
