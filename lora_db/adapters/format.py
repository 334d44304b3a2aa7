"""The adapter file: written by `lora-db train`, read (with its peft-folder twin) by sample, merge, eval and info.

An adapter file is one safetensors file holding every trained component's LoRA weights, keys prefixed by
component (`unet.transformer.transformer_in_blocks.0.attn1.to_q.lora_A.weight`, `text_encoder.…`), and in its
metadata what is needed to load it anywhere (`lora_db.components`: rank, alpha and targets per component; base
model, prompt, steps, lora-db version). The scale of every LoRA update is weight x alpha / rank, or
weight x alpha / sqrt(rank) for rsLoRA (`lora_scale`, peft's definition times the user's weight): hot-swap sets it
through peft's own `set_scale`, merge and combination use `lora_scale`, and a test holds the two equal.
A DoRA adapter also stores one magnitude per output feature (`...lora_magnitude_vector`, peft's key).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from lora_db.adapters.layers import update_shapes
from lora_db.adapters.peft import read_peft_folder, write_peft_folders
from lora_db.adapters.spec import FORMAT, AdapterFile, LoraSpec, checked_adapter, parse_spec
from lora_db.adapters.tokens import TOKENS_PREFIX
from lora_db.errors import LoraDBError
from lora_db.io import atomic_write
from lora_db.layout import ADAPTER_FILE
from lora_db.locks import output_lock
from lora_db.logs import printable

logger = logging.getLogger("lora_db")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def save_adapter(
    path: str | Path,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    specs: Mapping[str, LoraSpec],
    metadata: Mapping[str, object] | None = None,
    tokens: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write one self-contained adapter file atomically (fp32 tensors, component-prefixed keys; pivotal tuning's
    token embeddings as `tokens.TOKEN`), checked as every reader checks it: lora-db never writes an adapter it would
    refuse to read (a diverged one, say)."""
    from safetensors.torch import save_file

    flat = {
        f"{component}.{key}": tensor.detach().to("cpu", torch.float32).contiguous()
        for component, part in tensors.items()
        for key, tensor in part.items()
    }
    flat |= {TOKENS_PREFIX + t: v.detach().to("cpu", torch.float32).contiguous() for t, v in (tokens or {}).items()}
    checked_adapter(Path(path), flat, specs, {})
    meta = {"format": FORMAT}
    meta["lora_db.components"] = json.dumps(
        {c: {**asdict(s), "target_modules": list(s.target_modules)} for c, s in specs.items()}, sort_keys=True
    )
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter file: safetensors only, our metadata, shapes that agree with it. A folder is a
    training run (its adapter.safetensors) or a peft folder."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir() and (path / ADAPTER_FILE).is_file():  # a training run's folder: its final adapter
        return read_adapter(path / ADAPTER_FILE)
    if path.is_dir():
        return read_peft_folder(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraDBError(
            f"{path}: {path.suffix} files are pickles, which can run code; only .safetensors "
            "adapters are loaded (convert it with a trusted tool first)"
        )
    if not path.is_file():
        raise LoraDBError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraDBError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    if "lora_db.components" not in metadata:
        raise LoraDBError(f"{path}: no lora-db metadata (rank, alpha, targets); it was not written by lora-db train")
    try:
        raw_specs = json.loads(metadata["lora_db.components"])
    except ValueError as err:
        raise LoraDBError(f"{path}: damaged lora-db metadata, lora_db.components is not JSON ({err})") from None
    if not isinstance(raw_specs, dict):
        raise LoraDBError(f"{path}: damaged lora-db metadata, lora_db.components is not a table of components")
    specs = {c: parse_spec(s, f"{path}: metadata lora_db.components.{printable(c)}") for c, s in raw_specs.items()}
    return checked_adapter(path, flat, specs, metadata)


def describe_adapter(adapter: AdapterFile) -> dict[str, object]:
    """What an adapter is, from its metadata and tensor shapes alone (for `lora-db info`)."""
    meta = adapter.metadata
    components = {}
    for component, spec in adapter.specs.items():
        components[component] = {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "variant": spec.variant,
            "target_modules": list(spec.target_modules),
            "layers": len(update_shapes(adapter, component)),
            "parameters": sum(t.numel() for t in adapter.tensors[component].values()),
        }
    info: dict[str, object] = {
        "file": str(adapter.path),
        "size_bytes": _size(adapter.path),
        "format": meta.get("format", ""),
        "lora_db_version": meta.get("lora_db_version", ""),
        "base_model": meta.get("base_model", ""),
        "instance_prompt": meta.get("instance_prompt", ""),
        "class_prompt": meta.get("class_prompt", ""),
        "steps": meta.get("steps", ""),
        "resolution": meta.get("resolution", ""),
        "quantize_base": meta.get("quantize_base", ""),  # the frozen base's storage in training (QLoRA: nf4)
        "components": components,
        "parameters": adapter.num_parameters(),
        "tokens": sorted(adapter.tokens),  # pivotal tuning: the tokens whose embeddings it holds
    }
    for key in ("combined_from", "combination"):
        if key in meta:
            info[key] = _json_or_text(meta[key])
    return info


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _json_or_text(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def export_peft(adapter_path: str | Path, out: str | Path, overwrite: bool = False) -> list[Path]:
    """`lora-db export`: one peft folder per component (PeftModel.from_pretrained loads each); returns them."""
    adapter = read_adapter(adapter_path)
    with output_lock(out, "OUT"):
        return write_peft_folders(adapter, out, overwrite=overwrite)
