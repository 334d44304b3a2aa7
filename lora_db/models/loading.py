"""Loading UniDiffuser: a hub id, a local diffusers folder, or a random pipeline built offline.

`tiny` is the small deterministic random model machinery tests use; `tiny-world` is a small UniDiffuser
pretrained offline on a synthetic world (shipped in the package, see lora_db.synthetic.tiny_world); `random:small` and
`random:unidiffuser-v1` are larger random builds for benchmarks (the second has the real architecture of
thu-ml/unidiffuser-v1).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lora_db.errors import LoraDBError
from lora_db.logs import quiet_loaded_libraries
from lora_db.models.random import PRESETS, build_random_pipeline, unet_config

logger = logging.getLogger("lora_db")

RANDOM_PREFIX = "random:"


TINY_WORLD = "tiny-world"


TINY_WORLD_DIR = Path(__file__).parents[1] / "assets" / TINY_WORLD  # shipped in the package


def tiny_world_dir() -> Path:
    """The shipped tiny-world folder; a clear error if this copy of lora-db lacks it."""
    if not (TINY_WORLD_DIR / "model_index.json").is_file():
        raise LoraDBError(
            f"--model {TINY_WORLD}: its weights are missing from {TINY_WORLD_DIR}; build them with "
            f"`python -m lora_db.synthetic.tiny_world build {TINY_WORLD_DIR}`"
        )
    return TINY_WORLD_DIR


def random_preset(model: str) -> str | None:
    """The random-build preset a model name stands for, or None for a real model."""
    if model == "tiny":
        return "tiny"
    if model.startswith(RANDOM_PREFIX):
        preset = model.removeprefix(RANDOM_PREFIX)
        if preset not in PRESETS:
            raise LoraDBError(f"--model {model}: unknown random build; choose random:" + " or random:".join(PRESETS))
        return preset
    return None


def is_built_in(model: str) -> bool:
    """Whether `model` names one of lora-db's own models (built in code, or shipped), no folder or hub repository."""
    return model in ("tiny", TINY_WORLD) or (model.startswith(RANDOM_PREFIX) and model[len(RANDOM_PREFIX) :] in PRESETS)


def _unreachable(model: str, err: Exception) -> LoraDBError:
    return LoraDBError(
        f"--model {model}: cannot load it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
        f"if the hub is out of reach, download it elsewhere (`hf download {model} --local-dir DIR`) "
        "and pass --model DIR"
    )


HUB_PROBE_TIMEOUT_S = 5.0


def hub_load_options(model: str) -> dict[str, Any]:
    """How to load a hub model: from the network, or from the local cache when the hub is out of reach.

    One short connection attempt decides, so an offline machine gets one line at once instead of a minute of
    retries ending in a misleading "config.json not found".
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    fix = f"download it where the network works (`hf download {model} --local-dir DIR`) and pass --model DIR"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise LoraDBError(f"--model {model}: HF_HUB_OFFLINE is set and it is not in the local cache; {fix}")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        if cached:
            logger.warning("the hub (%s) is out of reach: loading %s from the local cache", constants.ENDPOINT, model)
            return {"local_files_only": True}
        reason = err.strerror or type(err).__name__
        raise LoraDBError(
            f"--model {model}: the network is out of reach ({constants.ENDPOINT}: {reason}) and no copy is cached "
            f"here; {fix}"
        ) from None
    return {}


def _is_hub_id(model: str) -> bool:
    return random_preset(model) is None and not Path(model).expanduser().exists()


def load_options(model: str) -> dict[str, Any]:
    """Keyword arguments for diffusers' / transformers' loaders: a local folder needs none, a hub id may need
    the local cache (`hub_load_options`). `model` is already resolved by `local_model`."""
    return hub_load_options(model) if _is_hub_id(model) else {}


def _check_local_folder(model: str) -> None:
    path = Path(model)
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists() or model.count("/") != 1
    if looks_local and not path.is_dir():
        raise LoraDBError(f"--model {model}: folder not found; pass a diffusers UniDiffuser folder or a hub id")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise LoraDBError(f"--model {model}: no model_index.json there; it is not a diffusers pipeline folder")


def local_model(model: str) -> str:
    """`tiny-world` names the pretrained tiny UniDiffuser shipped in the package; other names are kept."""
    if model == "tiny-world":
        return str(tiny_world_dir())
    return model


def load_unet_config(model: str) -> dict[str, Any]:
    """The U-ViT's config without loading any weights (to check options before the model loads)."""
    model = local_model(model)
    preset = random_preset(model)
    if preset is not None:
        return unet_config(preset)
    _check_local_folder(model)
    from diffusers import AutoencoderKL, UniDiffuserModel

    options = load_options(model)
    try:
        config = dict(UniDiffuserModel.load_config(model, subfolder="unet", **options))
        vae_blocks = len(AutoencoderKL.load_config(model, subfolder="vae", **options)["block_out_channels"])
    except (OSError, ValueError, KeyError) as err:
        raise _unreachable(model, err) from None
    # The pipeline's own rule: each VAE block after the first halves the size (8 for SD's VAE, 4 for tiny-world's).
    return config | {VAE_SCALE_FACTOR: 2 ** (vae_blocks - 1)}


VAE_SCALE_FACTOR = "lora_db.vae_scale_factor"


def native_resolution(unet_config: dict[str, Any]) -> int:
    return int(unet_config["sample_size"]) * int(unet_config.get(VAE_SCALE_FACTOR, 8))


def check_resolution(resolution: int, unet_config: dict[str, Any], model: str) -> None:
    native = native_resolution(unet_config)
    if resolution != native:
        raise LoraDBError(
            f"--resolution {resolution}: {model} has fixed position embeddings for {native}x{native} images; "
            f"use --resolution {native} (or leave it out)"
        )


def load_pipeline(model: str, torch_dtype=None):
    """A `UniDiffuserPipeline` from a hub id, a local folder or a random build name; clear error if unreachable."""
    import torch

    model = local_model(model)
    preset = random_preset(model)
    if preset is not None:
        pipe = build_random_pipeline(preset)
        return pipe.to(torch_dtype) if torch_dtype not in (None, torch.float32) else pipe
    _check_local_folder(model)
    from diffusers import UniDiffuserPipeline

    quiet_loaded_libraries()
    options = load_options(model)
    try:
        # Only safetensors weights are read: a folder with pickle weights alone is refused by diffusers.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers passes huggingface_hub a deprecated argument
            return UniDiffuserPipeline.from_pretrained(model, torch_dtype=torch_dtype, use_safetensors=True, **options)
    except (OSError, ValueError) as err:
        raise _unreachable(model, err) from None
