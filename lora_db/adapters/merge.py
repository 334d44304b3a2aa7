"""Folding LoRA adapters into the base weights (`lora-db merge`), and combining adapters into one adapter file.

    lora-db merge --model tiny --adapter robot/adapter.safetensors --out robot-merged
    python -c "from diffusers import UniDiffuserPipeline; UniDiffuserPipeline.from_pretrained('robot-merged')"
    lora-db merge --adapter robot/adapter.safetensors:0.6 --adapter toy/adapter.safetensors:0.4 \\
        --into-adapter both.safetensors                # exact: ranks concatenated
    lora-db merge --adapter ... --into-adapter both-r4.safetensors --rank 4   # SVD, error reported

Every adapter adds weight x scale x B @ A (`adapters.lora_scale`, the definition hot-swap uses), summed in fp32
and cast back to the stored dtype; a result that is not finite is refused. A DoRA adapter is folded as peft merges
it (its magnitude over the row norm of the adapted weight, `adapters.dora_delta`), and only alone: DoRA's output is
not a sum of updates, so it is neither added to other adapters nor combined into an adapter file. The merged
folder is a plain diffusers UniDiffuser pipeline: stock `UniDiffuserPipeline.from_pretrained` loads it, no
lora-db needed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora_db.adapters.format import read_adapter, save_adapter
from lora_db.adapters.hotswap import resolve_model
from lora_db.adapters.kinds import refuse_in_lora_file, update
from lora_db.adapters.layers import (
    check_fits,
    check_summable,
    dora_delta,
    lora_delta,
    lora_magnitudes,
    lora_pairs,
    lora_scale,
    lycoris_modules,
    pipeline_component,
)
from lora_db.adapters.spec import COMPONENTS, AdapterFile, LoraSpec
from lora_db.adapters.tokens import add_tokens_to_pipeline
from lora_db.config.commands import MergeConfig
from lora_db.config.fields import MixedPrecision
from lora_db.errors import LoraDBError
from lora_db.io import atomic_directory, atomic_write_json, check_output_folder
from lora_db.locks import output_lock
from lora_db.logs import printable
from lora_db.models.loading import load_pipeline
from lora_db.models.memory import weight_dtype
from lora_db.models.quantize import QUANTIZATIONS, check_quantization, dequantize_model, quantize_model
from lora_db.version import __version__

logger = logging.getLogger("lora_db")

MERGE_MARKER = "lora_db_merge.json"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Weighted = Sequence[tuple[AdapterFile, float]]


# -- folding into the base weights ----------------------------------------------------------------------------------


def fold_adapters(pipe, adapters: Weighted) -> int:
    """Add every adapter's weighted update into the pipeline's weights in place; returns how many layers changed.

    Each adapter is checked against the model before any weight changes. A non-finite result stops the merge
    with the pipeline partly merged: reload it before using it again.
    """
    check_summable(adapter for adapter, _ in adapters)
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for adapter, weight in adapters:
        for component, spec in adapter.specs.items():
            model = pipeline_component(pipe, adapter, component)
            check_fits(model, adapter, component)
            summed = deltas.setdefault(component, {})
            if spec.kind != "lora":
                for module, tensors in lycoris_modules(adapter, component).items():
                    delta = update(tensors, spec.kind, lora_scale(spec, weight))
                    summed[module] = summed[module] + delta if module in summed else delta
                continue
            magnitudes = lora_magnitudes(adapter, component)
            for module, (lora_a, lora_b) in lora_pairs(adapter, component).items():
                scale = lora_scale(spec, weight)
                if module in magnitudes:
                    base = model.get_submodule(module).weight
                    delta = dora_delta(base, lora_a, lora_b, magnitudes[module], scale)
                else:
                    delta = lora_delta(lora_a, lora_b, scale)
                summed[module] = summed[module] + delta if module in summed else delta
    for component, summed in deltas.items():
        model = getattr(pipe, component)
        for module, delta in summed.items():
            _add_in_fp32(model.get_submodule(module), delta, f"{component}.{module}")
    return sum(len(summed) for summed in deltas.values())


@torch.no_grad()
def _add_in_fp32(layer: nn.Linear, delta: torch.Tensor, name: str) -> None:
    merged = (layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype)
    if not torch.isfinite(merged).all():
        raise LoraDBError(
            f"merging gives non-finite weights in {name} ({layer.weight.dtype}); lower the adapter weights "
            "or merge into an fp32 model"
        )
    layer.weight.copy_(merged)


def _check_finite(pipe, dtype: torch.dtype) -> None:
    for component in COMPONENTS:
        for name, tensor in getattr(pipe, component).state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise LoraDBError(
                    f"{component}.{name} is not finite in {dtype}; save with --save-dtype fp32 or bf16 instead"
                )


def untie_caption_decoder(pipe) -> None:
    # GPT-2 ties lm_head to wte; safetensors refuses shared storage, so save_pretrained needs separate copies.
    decoder = pipe.text_decoder.transformer
    head, embedding = decoder.lm_head, decoder.get_input_embeddings()
    if head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone())
        decoder.config.tie_word_embeddings = False


@dataclass
class MergeResult:
    out: Path
    layers: int
    base_load_s: float = 0.0
    relative_error: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    dequantized_base: str | None = None  # nf4 / int8: merged onto the base as training quantized it


# -- the base as a QLoRA adapter was trained on ---------------------------------------------------------------------


def quantization_trained_on(adapters: Weighted) -> tuple[str, str]:
    """The quantization (nf4, int8) and mixed precision every adapter was trained with, for --dequantized-base;
    checked, with bitsandbytes, before the base loads."""
    from typing import get_args

    settings = set()
    for adapter, _ in adapters:
        kind, precision = adapter.trained_quantization, adapter.metadata.get("mixed_precision") or "no"
        if kind == "none":
            raise LoraDBError(
                f"--dequantized-base: {adapter.path} was trained on a full-precision base (no --quantize-base); "
                "merge it without --dequantized-base"
            )
        if kind not in QUANTIZATIONS or precision not in get_args(MixedPrecision):
            raise LoraDBError(
                f"--dequantized-base: {adapter.path} records a base quantized as '{printable(kind)}' under mixed "
                f"precision '{printable(precision)}', which lora-db does not know; merge it without --dequantized-base"
            )
        settings.add((kind, precision))
    if len(settings) > 1:
        described = ", ".join(sorted(f"{kind} under --mixed-precision {precision}" for kind, precision in settings))
        raise LoraDBError(
            f"--dequantized-base: the adapters were trained on differently quantized bases ({described}); "
            "merge each onto its own base, or all without --dequantized-base"
        )
    kind, precision = settings.pop()
    check_quantization(kind, torch.device("cpu"), torch.float32, option="--dequantized-base")  # no forward runs
    return kind, precision


def dequantize_base_as_trained(pipe, adapters: Weighted, kind: str, mixed_precision: str) -> None:
    """Quantize the parts the adapters train as `lora-db train --quantize-base` did (from weights in the training
    dtype), then store them back as fp32 linear layers: the weights the trained model computed with. (int8 also
    rounds each layer's input to 8 bits, which no stored weight can reproduce; NF4 computes with its weights as
    they are stored here.)"""

    dtype, device = weight_dtype(mixed_precision), torch.device("cpu")
    components = {component for adapter, _ in adapters for component in adapter.specs}
    for component in ("unet", "text_encoder"):
        if component in components:
            model = getattr(pipe, component)
            stored = next(model.parameters()).dtype
            model.to(dtype)
            quantize_model(model, kind, dtype, device)
            dequantize_model(model)
            model.to(stored)


def read_weighted(config: MergeConfig) -> list[tuple[AdapterFile, float]]:
    files = {c.path: read_adapter(c.path) for c in config.choices}
    return [(files[c.path], c.weight) for c in config.choices]


def merge(config: MergeConfig) -> MergeResult:
    """`lora-db merge --out`: load the base, fold the adapters in, save a stock diffusers pipeline atomically."""

    adapters = read_weighted(config)
    model = resolve_model(config.model, (a for a, _ in adapters))
    as_trained = quantization_trained_on(adapters) if config.dequantized_base else None
    with output_lock(config.out, "--out"):
        check_output_folder(config.out, config.overwrite, MERGE_MARKER)
        return _merge(config, adapters, model, as_trained)


def _merge(
    config: MergeConfig, adapters: list[tuple[AdapterFile, float]], model: str, as_trained: tuple[str, str] | None
) -> MergeResult:

    started = time.perf_counter()
    pipe = load_pipeline(model)
    base_load_s = time.perf_counter() - started
    dequantized = None
    if as_trained is not None:
        dequantized, mixed_precision = as_trained
        dequantize_base_as_trained(pipe, adapters, dequantized, mixed_precision)
    else:
        for adapter, _ in adapters:
            if adapter.trained_quantization != "none":
                logger.info(
                    "%s was trained on an %s base: merging onto the full-precision base; --dequantized-base merges "
                    "onto the base training saw",
                    adapter.path, adapter.trained_quantization,
                )  # fmt: skip
    layers = fold_adapters(pipe, adapters)
    for adapter, _ in adapters:  # pivotal tuning's tokens: in the tokenizer and embedding table a stock load reads
        add_tokens_to_pipeline(pipe, adapter.tokens, adapter.path)
    dtype = SAVE_DTYPES[config.save_dtype]
    pipe.to(dtype)
    _check_finite(pipe, dtype)
    untie_caption_decoder(pipe)
    with atomic_directory(config.out, replace=config.overwrite, record=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(
            tmp / MERGE_MARKER,
            {
                "base_model": model,
                "adapters": [{"path": str(a.path), "weight": w} for a, w in adapters],
                "save_dtype": config.save_dtype,
                "dequantized_base": dequantized or "none",
                "layers_merged": layers,
                "lora_db_version": __version__,
            },
        )
    return MergeResult(config.out, layers, base_load_s, dequantized_base=dequantized)


# -- combining adapters into one ------------------------------------------------------------------------------------


@dataclass
class Combined:
    tensors: dict[str, dict[str, torch.Tensor]]
    specs: dict[str, LoraSpec]
    relative_error: float  # ||sum - combined||_F / ||sum||_F over all layers; 0 when ranks are concatenated
    worst_layer: tuple[str, float] = ("", 0.0)


def combine_adapters(adapters: Weighted, rank: int | None = None) -> Combined:
    """One adapter whose update is the adapters' weighted sum: exact (ranks concatenated) or an SVD to `rank`.

    Concatenation stacks the A matrices and puts the B matrices side by side, each B times its adapter's
    weight x scale, so B @ A is the weighted sum; alpha = rank keeps the new scale 1. DoRA adapters are refused.
    """
    for adapter, _ in adapters:
        for spec in adapter.specs.values():
            refuse_in_lora_file(adapter.path, spec.kind, "--into-adapter")
    dora = [a for a, _ in adapters if any(s.use_dora for s in a.specs.values())]
    if dora:
        raise LoraDBError(
            f"--into-adapter: {dora[0].path} is a DoRA adapter, whose update depends on the base weights and is no "
            "B @ A product, so it cannot be written into a combined LoRA file exactly; merge it with --out instead"
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    specs: dict[str, LoraSpec] = {}
    lost = kept = 0.0
    worst = ("", 0.0)
    components = dict.fromkeys(c for adapter, _ in adapters for c in adapter.specs)
    factors_of = {c: _concatenated_factors([(a, w) for a, w in adapters if c in a.specs], c) for c in components}
    most = {c: _rank_held(factors) for c, factors in factors_of.items()}
    if rank is not None and rank > max(most.values()):
        held = ", ".join(f"{c} {r}" for c, r in most.items())
        raise LoraDBError(
            f"--rank {rank}: the adapters' updates have rank {held} at most (their ranks concatenated, the narrowest "
            f"layer included), so more would only pad the file with zeros; pass --rank {max(most.values())} or less, "
            "or leave --rank out for the exact combination"
        )
    for component, factors in factors_of.items():
        parts = [(a, w) for a, w in adapters if component in a.specs]
        new_rank = sum(a.specs[component].rank for a, _ in parts) if rank is None else min(rank, most[component])
        tensors[component] = {}
        for module, (lora_b, lora_a) in factors.items():
            if rank is not None:
                lora_b, lora_a, module_lost, module_total = best_low_rank(lora_b, lora_a, new_rank)
                lost, kept = lost + module_lost, kept + module_total
                error = math.sqrt(module_lost / module_total) if module_total > 0 else 0.0
                worst = max(worst, (f"{component}.{module}", error), key=lambda pair: pair[1])
            tensors[component][f"{module}.lora_A.weight"] = lora_a.contiguous()
            tensors[component][f"{module}.lora_B.weight"] = lora_b.contiguous()
        targets = dict.fromkeys(t for a, _ in parts for t in a.specs[component].target_modules)
        specs[component] = LoraSpec(new_rank, float(new_rank), tuple(targets))
    return Combined(tensors, specs, math.sqrt(lost / kept) if kept > 0 else 0.0, worst)


def _rank_held(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The highest rank any concatenated B @ A can have: its stacked rank, or a layer's narrower side."""
    return max(min(b.shape[1], b.shape[0], a.shape[1]) for b, a in factors.values())


def _concatenated_factors(parts: Weighted, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> (B, A) with ranks stacked; an adapter without that module contributes zero blocks."""
    pairs = [lora_pairs(adapter, component) for adapter, _ in parts]
    modules = dict.fromkeys(m for p in pairs for m in p)
    factors = {}
    for module in modules:
        shapes = {(p[module][1].shape[0], p[module][0].shape[1]) for p in pairs if module in p}
        if len(shapes) > 1:
            raise LoraDBError(
                f"the adapters do not fit each other: {component}.{module} has shapes "
                f"{' and '.join(f'{o}x{i}' for o, i in sorted(shapes))}; they were trained for different models"
            )
        out_features, in_features = shapes.pop()
        a_blocks, b_blocks = [], []
        for (adapter, weight), p in zip(parts, pairs, strict=True):
            spec = adapter.specs[component]
            if module in p:
                lora_a, lora_b = p[module]
                a_blocks.append(lora_a.float())
                b_blocks.append(lora_b.float() * lora_scale(spec, weight))
            else:
                a_blocks.append(torch.zeros(spec.rank, in_features))
                b_blocks.append(torch.zeros(out_features, spec.rank))
        factors[module] = (torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0))
    return factors


def best_low_rank(
    lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-`rank` factors (B', A') of B @ A, and the squared Frobenius error and norm of B @ A.

    The SVD of B @ A comes from QR of the thin factors, so no out x in matrix is formed; zero rows pad
    B' / A' when B @ A has lower rank than asked.
    """
    q_b, r_b = torch.linalg.qr(lora_b.double())
    q_a, r_a = torch.linalg.qr(lora_a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, s.numel())
    new_b = torch.zeros(lora_b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, lora_a.shape[1], dtype=torch.float64)
    new_b[:, :keep] = (q_b @ u[:, :keep]) * s[:keep]
    new_a[:keep] = vh[:keep] @ q_a.T
    squared = s.pow(2)
    return new_b.float(), new_a.float(), float(squared[keep:].sum()), float(squared.sum())


def combined_tokens(adapters: Weighted) -> dict[str, torch.Tensor]:
    """Every adapter's token embeddings (a token two adapters learned differently is refused)."""
    tokens: dict[str, torch.Tensor] = {}
    for adapter, _ in adapters:
        for token, vector in adapter.tokens.items():
            if token in tokens and not torch.equal(tokens[token], vector):
                raise LoraDBError(
                    f"--into-adapter: {adapter.path} and another adapter both learned the token {printable(token)!r}, "
                    "differently; one file holds one embedding per token"
                )
            tokens[token] = vector
    return tokens


def write_combined(config: MergeConfig) -> MergeResult:
    """`lora-db merge --into-adapter`: the adapters' weighted sum as one adapter file (no model loaded)."""
    path = config.into_adapter
    with output_lock(path, "--into-adapter"):
        return _write_combined(config, path)


def _write_combined(config: MergeConfig, path: Path) -> MergeResult:
    if path.exists() and not config.overwrite:
        raise LoraDBError(f"--into-adapter {path} already exists; choose another file, or pass --overwrite")
    adapters = read_weighted(config)
    combined = combine_adapters(adapters, config.rank)
    bases = sorted({a.metadata.get("base_model", "") for a, _ in adapters} - {""})
    if len(bases) > 1:
        logger.warning("combining adapters trained on different base models: %s", ", ".join(bases))
    metadata = {
        "base_model": bases[0] if len(bases) == 1 else "",
        "lora_db_version": __version__,
        "combined_from": [
            {
                "path": str(a.path),
                "weight": w,
                "instance_prompt": a.metadata.get("instance_prompt", ""),
                "steps": a.metadata.get("steps", ""),
            }
            for a, w in adapters
        ],
        "combination": {
            "method": "concatenation" if config.rank is None else f"svd to rank {config.rank}",
            "relative_error": combined.relative_error,
            "worst_layer": combined.worst_layer[0],
            "worst_layer_relative_error": combined.worst_layer[1],
        },
    }
    save_adapter(path, combined.tensors, combined.specs, metadata, combined_tokens(adapters))
    return MergeResult(
        path,
        sum(len(part) // 2 for part in combined.tensors.values()),
        relative_error=combined.relative_error,
        ranks={c: s.rank for c, s in combined.specs.items()},
    )
