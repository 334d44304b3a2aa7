"""`lora-db caption FOLDER`: a caption beside every photo, written by UniDiffuser's own image-to-text mode.

    lora-db caption photos/ --prefix "a photo of sks" --model thu-ml/unidiffuser-v1
    lora-db caption photos/ --adapter run/           # with the adapter being trained applied

Other trainers run a separate captioner (BLIP, a tagger); UniDiffuser is one. Each photo NAME.png gets NAME.txt
(what `lora-db train` reads as that photo's prompt): the prefix, ", ", then the caption. An existing caption is kept
unless --overwrite; each file is written whole or not at all, so an interrupted run leaves only complete captions
and a second run finishes the rest.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet, default_device
from lora_db.config.commands import CaptionConfig
from lora_db.errors import LoraDBError
from lora_db.images import find_images, load_image
from lora_db.io import atomic_write_text
from lora_db.locks import output_lock
from lora_db.logs import printable
from lora_db.models.loading import load_pipeline
from lora_db.models.memory import check_mixed_precision, weight_dtype
from lora_db.models.sampling import generate_captions

logger = logging.getLogger("lora_db")


@dataclass
class CaptionResult:
    written: dict[Path, str] = field(default_factory=dict)  # caption file -> its text
    kept: list[Path] = field(default_factory=list)  # captions that existed (no --overwrite)
    seconds: float = 0.0


def caption_text(caption: str, prefix: str | None) -> str | None:
    """The caption file's text: the prefix, ", ", the caption; None when the caption holds no readable word (control
    characters and undecodable bytes are what an untrained caption decoder writes)."""
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in caption) or "\ufffd" in caption:
        return None
    caption = " ".join(caption.split())
    if not any(word.isalpha() for word in caption.split()):
        return None
    return f"{prefix.strip()}, {caption}" if prefix else caption


def caption(config: CaptionConfig) -> CaptionResult:
    """Caption every photo of `config.folder` that has no caption yet (all of them with --overwrite)."""
    photos = find_images(config.folder, "FOLDER")
    adapter = read_adapter(config.adapter) if config.adapter is not None else None
    device = default_device()
    check_mixed_precision(config.mixed_precision, device)
    result = CaptionResult()
    todo = []
    for photo in photos:
        target = photo.with_suffix(".txt")
        if target.exists() and not config.overwrite:
            result.kept.append(target)
        else:
            todo.append(photo)
    if not todo:
        return result
    with output_lock(config.folder, "FOLDER"):
        pipe = load_pipeline(config.model, torch_dtype=weight_dtype(config.mixed_precision))
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if adapter is not None:
            adapters = AdapterSet(pipe)
            adapters.activate({adapters.load(adapter): 1.0})
        from tqdm.auto import tqdm

        started = time.perf_counter()
        for photo in tqdm(todo, desc="caption", unit="photo"):
            (text,) = generate_captions(
                pipe,
                load_image(photo),
                1,
                seed=config.seed,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
            )
            target, written = photo.with_suffix(".txt"), caption_text(text, config.prefix)
            if written is None:
                raise LoraDBError(
                    f"{config.model} wrote no readable caption for {photo} ({printable(text[:40])!r}...): its "
                    "image-to-text mode or caption decoder is untrained (tiny-world's is); caption with "
                    f"thu-ml/unidiffuser-v1. {len(result.written)} caption(s) were written before it"
                )
            result.written[target] = written
            atomic_write_text(target, written + "\n")
        result.seconds = time.perf_counter() - started
    return result
