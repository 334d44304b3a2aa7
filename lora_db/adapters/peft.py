"""Adapters as peft folders: `lora-db export ADAPTER --format peft DIR`, and reading such folders back.

    lora-db export robot/adapter.safetensors --format peft robot-peft
    # robot-peft/unet/{adapter_config.json, adapter_model.safetensors}, robot-peft/text_encoder/... (if trained)

    from peft import PeftModel
    unet = PeftModel.from_pretrained(pipe.unet, "robot-peft/unet")   # or inject_adapter_in_model +
    # set_peft_model_state_dict with LoraConfig.from_pretrained("robot-peft/unet")

Each component folder is what peft's `save_pretrained` writes: `adapter_config.json` from peft's own LoraConfig and
`adapter_model.safetensors` with peft's key names (`base_model.model.<module>.lora_A.weight`, DoRA's
`...lora_magnitude_vector`); lora-db's metadata (base model, prompt, steps) rides in the safetensors header.
`--adapter DIR` (sample, merge, info) reads such a folder, or a single peft LoRA folder for the U-ViT or the text
encoder, back; peft options lora-db cannot apply exactly (per-layer rank patterns, trained biases, regex targets,
extra saved modules) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lora_db.adapters.kinds import PEFT_TYPES
from lora_db.adapters.spec import (
    COMPONENTS,
    PEFT_KEYS,
    PEFT_LYCORIS_KEYS,
    AdapterFile,
    LoraSpec,
    checked_adapter,
    parse_spec,
    read_bool,
)
from lora_db.adapters.tokens import TOKENS_FILE, TOKENS_PREFIX
from lora_db.errors import LoraDBError
from lora_db.io import WRITTEN_RECORD, atomic_directory, check_output_folder
from lora_db.logs import printable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "lora_db.metadata"
TEXT_ENCODER_HINTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_peft_folders(adapter: AdapterFile, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write one peft folder per component of the adapter; returns the component folders."""
    from safetensors.torch import save_file

    out = Path(out)
    check_output_folder(out, overwrite, WRITTEN_RECORD, option="OUT")
    metadata = {k: v for k, v in adapter.metadata.items() if k != "lora_db.components"}
    with atomic_directory(out, replace=overwrite, record=True) as tmp:
        for component, spec in adapter.specs.items():
            folder = tmp / component
            config = spec.peft_config()
            config.base_model_name_or_path = _base_model(adapter, component)
            config.save_pretrained(str(folder))
            tensors = {PEFT_PREFIX + key: t.contiguous() for key, t in adapter.tensors[component].items()}
            header = {"format": "pt", "lora_db.component": component, METADATA_KEY: json.dumps(metadata)}
            save_file(tensors, str(folder / WEIGHTS_FILE), metadata=header)
        if adapter.tokens:  # pivotal tuning: {token: vector}, diffusers' textual-inversion layout
            save_file({t: v.contiguous() for t, v in adapter.tokens.items()}, str(tmp / TOKENS_FILE))
    return [out / component for component in adapter.specs]


def _base_model(adapter: AdapterFile, component: str) -> str | None:
    base = adapter.metadata.get("base_model", "")
    return f"{base} ({component})" if base else None


def read_peft_folder(path: Path) -> AdapterFile:
    """An exported folder (a subfolder per component) or one peft LoRA folder, as a lora-db adapter."""
    folders = {c: path / c for c in COMPONENTS if (path / c / CONFIG_FILE).is_file()}
    if not folders and (path / CONFIG_FILE).is_file():
        folders = {_guess_component(path): path}
    if not folders:
        raise LoraDBError(
            f"{path}: a folder adapter must be a peft folder ({CONFIG_FILE} + {WEIGHTS_FILE}) or hold one per "
            f"component ({', '.join(f'{c}/' for c in COMPONENTS)}), as `lora-db export --format peft` writes"
        )
    specs, flat, metadata = {}, {}, {}
    for component, folder in folders.items():
        specs[component] = _read_config(folder / CONFIG_FILE)
        tensors, header = _read_weights(folder)
        flat.update({f"{component}.{key}": t for key, t in tensors.items()})
        metadata.update(_lora_db_metadata(folder / WEIGHTS_FILE, header))
    metadata["format"] = "peft folder"
    if (path / TOKENS_FILE).is_file():
        flat.update({TOKENS_PREFIX + t: v for t, v in _read_safetensors(path / TOKENS_FILE).items()})
    return checked_adapter(path, flat, specs, metadata)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraDBError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None


def _lora_db_metadata(path: Path, header: dict[str, str]) -> dict[str, str]:
    """lora-db's metadata riding in an exported file's header: a JSON table, its values kept as text."""
    try:
        found = json.loads(header.get(METADATA_KEY, "{}"))
    except ValueError as err:
        raise LoraDBError(f"{path}: its {METADATA_KEY} header is not JSON ({err})") from None
    if not isinstance(found, dict):
        raise LoraDBError(f"{path}: its {METADATA_KEY} header is not a table of metadata")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in found.items()}


def _read_json_table(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoraDBError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise LoraDBError(f"{path}: not a peft config (a JSON table of settings)")
    return raw


def _guess_component(folder: Path) -> str:
    targets = _read_json_table(folder / CONFIG_FILE).get("target_modules") or []
    names = targets if isinstance(targets, list) else []
    return "text_encoder" if names and all(str(t).split(".")[-1] in TEXT_ENCODER_HINTS for t in names) else "unet"


def _read_config(path: Path) -> LoraSpec:
    raw = _read_json_table(path)
    kind = PEFT_TYPES.get(raw.get("peft_type", "LORA"))
    if kind is None:
        raise LoraDBError(
            f"{path}: a {printable(raw.get('peft_type'))} adapter; lora-db applies LoRA (and DoRA), LoKr and LoHa only"
        )
    unsupported = {
        "rank_pattern": "per-layer ranks",
        "alpha_pattern": "per-layer alphas",
        "modules_to_save": "fully trained extra modules",
        "layers_to_transform": "a subset of layers",
    }
    for key, what in unsupported.items():
        if raw.get(key):
            raise LoraDBError(f"{path}: {key} ({what}) cannot be applied exactly by lora-db")
    if raw.get("bias", "none") != "none" or (
        raw.get("lora_bias") is not None and read_bool(raw["lora_bias"], f"{path}: lora_bias")
    ):
        raise LoraDBError(f"{path}: trained biases cannot be applied exactly by lora-db")
    if raw.get("fan_in_fan_out") is not None and read_bool(raw["fan_in_fan_out"], f"{path}: fan_in_fan_out"):
        raise LoraDBError(f"{path}: fan_in_fan_out (Conv1D layers) does not occur in UniDiffuser")
    spec = parse_spec(raw, str(path), PEFT_KEYS if kind == "lora" else PEFT_LYCORIS_KEYS, kind=kind)
    return replace(spec, target_modules=tuple(sorted(spec.target_modules)))


def _read_weights(folder: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.bin")]
        hint = f" ({pickled[0]} is a pickle, which lora-db does not load)" if pickled else ""
        raise LoraDBError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k.removeprefix(PEFT_PREFIX): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraDBError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    return tensors, header
