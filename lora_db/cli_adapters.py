"""`lora-db sample`, `lora-db merge` and `lora-db info`: thin typer commands over lora_db.inference / lora_db.merge.

    lora-db sample --adapter robot/adapter.safetensors --adapter none --prompt "a photo of sks robot" --out samples
    lora-db merge --adapter robot/adapter.safetensors --out robot-merged
    lora-db info robot/adapter.safetensors
    lora-db export robot/adapter.safetensors --format peft robot-peft

Defaults and help text come from the SampleConfig / MergeConfig fields, the one place they are defined.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import typer

from .command_configs import MergeConfig, SampleConfig
from .config import MixedPrecision, Quantization


def _option(cls: type, name: str, flag: str | None = None):
    """A typer option whose help text is the config field's (the flag defaults to the field name)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return typer.Option(flag or "--" + name.replace("_", "-"), help=field.metadata["help"])


def _defaults(cls: type) -> SimpleNamespace:
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls)})


_SAMPLE, _MERGE = _defaults(SampleConfig), _defaults(MergeConfig)


def _sample(name: str, flag: str | None = None):
    return _option(SampleConfig, name, flag)


def _merge(name: str, flag: str | None = None):
    return _option(MergeConfig, name, flag)


def sample_command(
    out: Annotated[str, _sample("out")],  # text, not Path: typer would turn "" into "." (the current folder)
    adapter: Annotated[list[str] | None, _sample("adapters", "--adapter")] = None,
    prompt: Annotated[list[str] | None, _sample("prompts", "--prompt")] = None,
    prompts_file: Annotated[Path | None, _sample("prompts_file")] = _SAMPLE.prompts_file,
    model: Annotated[str | None, _sample("model")] = _SAMPLE.model,
    num_images: Annotated[int, _sample("num_images")] = _SAMPLE.num_images,
    seed: Annotated[int, _sample("seed")] = _SAMPLE.seed,
    num_inference_steps: Annotated[int, _sample("num_inference_steps")] = _SAMPLE.num_inference_steps,
    guidance_scale: Annotated[float, _sample("guidance_scale")] = _SAMPLE.guidance_scale,
    height: Annotated[int | None, _sample("height")] = _SAMPLE.height,
    width: Annotated[int | None, _sample("width")] = _SAMPLE.width,
    mixed_precision: Annotated[MixedPrecision, _sample("mixed_precision")] = _SAMPLE.mixed_precision,
    quantize_base: Annotated[Quantization, _sample("quantize_base")] = _SAMPLE.quantize_base,
    mode: Annotated[Literal["t2i", "i2t"], _sample("mode")] = _SAMPLE.mode,
    image: Annotated[Path | None, _sample("image")] = _SAMPLE.image,
    combine: Annotated[bool, _sample("combine")] = _SAMPLE.combine,
    overwrite: Annotated[bool, _sample("overwrite")] = _SAMPLE.overwrite,
) -> None:
    """Sample adapters side by side from one loaded base: a grid row per adapter, a column per prompt and seed.

    Example: lora-db sample --adapter none --adapter robot/adapter.safetensors --adapter toy/adapter.safetensors:0.8
    --prompt "a photo of sks robot" --num-images 2 --out samples
    """
    from .inference import sample

    config = SampleConfig(
        out=out,
        model=model,
        adapters=adapter or [],
        prompts=prompt or [],
        prompts_file=prompts_file,
        num_images=num_images,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        mixed_precision=mixed_precision,
        quantize_base=quantize_base,
        mode=mode,
        image=image,
        combine=combine,
        overwrite=overwrite,
    )
    _print_sample(sample(config))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("ch") else "s")


def _print_sample(result) -> None:
    for caption in result.captions:
        typer.echo(f"{caption['row']} (seed {caption['seed']}): {caption['caption']}")
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


def merge_command(
    adapter: Annotated[list[str], _merge("adapters", "--adapter")],
    out: Annotated[str | None, _merge("out")] = _MERGE.out,  # text: typer would turn "" into "."
    into_adapter: Annotated[str | None, _merge("into_adapter")] = _MERGE.into_adapter,
    model: Annotated[str | None, _merge("model")] = _MERGE.model,
    rank: Annotated[int | None, _merge("rank")] = _MERGE.rank,
    save_dtype: Annotated[Literal["fp32", "fp16", "bf16"], _merge("save_dtype")] = _MERGE.save_dtype,
    dequantized_base: Annotated[bool, _merge("dequantized_base")] = _MERGE.dequantized_base,
    overwrite: Annotated[bool, _merge("overwrite")] = _MERGE.overwrite,
) -> None:
    """Fold adapters into the base weights (a stock diffusers pipeline), or combine them into one adapter.

    Examples: lora-db merge --adapter robot/adapter.safetensors --out robot-merged;
    lora-db merge --adapter a.safetensors:0.6 --adapter b.safetensors:0.4 --into-adapter ab.safetensors [--rank 4]
    """
    from .merge import merge, write_combined

    config = MergeConfig(
        adapters=adapter,
        out=out,
        into_adapter=into_adapter,
        model=model,
        rank=rank,
        save_dtype=save_dtype,
        dequantized_base=dequantized_base,
        overwrite=overwrite,
    )
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


def info_command(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors) or exported peft folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe an adapter from its metadata: base model, components, rank, alpha, targets, size, training."""
    from .adapters import describe_adapter, read_adapter

    info = describe_adapter(read_adapter(file))
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(info_lines(info)))


def info_lines(info: dict) -> list[str]:
    lines = [
        f"file          {info['file']} ({info['size_bytes'] / 1024:.1f} KiB, {info['format']})",
        f"base model    {info['base_model'] or 'unknown'}",
    ]
    if info["instance_prompt"]:
        trained = f"{info['steps']} steps on {info['instance_prompt']!r}"
        if info["class_prompt"]:
            trained += f", prior {info['class_prompt']!r}"
        lines.append(f"trained       {trained}" + (f" at {info['resolution']} px" if info["resolution"] else ""))
    if info.get("quantize_base") not in (None, "", "none"):
        lines.append(
            f"trained on    a {info['quantize_base']}-quantized base (QLoRA): sample it with --quantize-base "
            f"{info['quantize_base']}, or merge it with --dequantized-base (onto the base training saw) or without "
            "(onto the full-precision base)"
        )
    for source in info.get("combined_from", []):
        lines.append(f"combined from {source['path']} x{source['weight']:g} ({source['instance_prompt']!r})")
    if "combination" in info:
        combination = info["combination"]
        lines.append(f"combination   {combination['method']}, relative error {combination['relative_error']:.3g}")
    for component, part in info["components"].items():
        lines.append(
            f"{component:<13} rank {part['rank']}, alpha {part['alpha']:g} (scale {part['scale']:g}), "
            + ("" if part["variant"] == "LoRA" else f"{part['variant']}, ")
            + f"{part['layers']} layers ({', '.join(part['target_modules'])}), {part['parameters']:,} parameters"
        )
    lines.append(f"parameters    {info['parameters']:,}" + (f", lora-db {v}" if (v := info["lora_db_version"]) else ""))
    return lines


def export_command(
    adapter: Annotated[Path, typer.Argument(help="Adapter file (.safetensors) or folder to export.")],
    out: Annotated[Path, typer.Argument(help="Folder to write: one peft folder per component (unet/, text_encoder/).")],
    format: Annotated[
        Literal["peft"], typer.Option("--format", help="peft: adapter_config.json + adapter_model.safetensors.")
    ] = "peft",
    overwrite: Annotated[bool, typer.Option(help="Replace a folder lora-db exported before.")] = False,
) -> None:
    """Export an adapter as peft folders that PeftModel.from_pretrained loads onto the U-ViT and the text encoder.

    Example: lora-db export robot/adapter.safetensors --format peft robot-peft
    """
    from .peft_export import export_peft

    for folder in export_peft(adapter, out, overwrite=overwrite):
        typer.echo(f"{format}: {folder}")


def register(app: typer.Typer) -> None:
    app.command("sample", no_args_is_help=True)(sample_command)
    app.command("merge", no_args_is_help=True)(merge_command)
    app.command("info", no_args_is_help=True)(info_command)
    app.command("export", no_args_is_help=True)(export_command)
