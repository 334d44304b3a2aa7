"""Instance and class images: finding, validating, decoding, augmenting and batching them.

Every image is decoded once by `scan_images` before any model is loaded, so a bad photo fails in seconds
with a message that names it instead of crashing a training run minutes later.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_ASPECT_RATIO,
    check_resized_size,
    find_images,
    load_image,
    prepare_image,
    to_tensor,
)

logger = logging.getLogger("lora_db")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    prompt: str
    weight: float = 1.0  # its concept's share of the loss (--dataset-config)


# ---------------------------------------------------------------------------------------------------------
# Finding images


# ---------------------------------------------------------------------------------------------------------
# Decoding one image


# ---------------------------------------------------------------------------------------------------------
# Scanning a folder


def scan_images(
    folder: str | Path,
    default_prompt: str | None,
    *,
    option: str = "--instance-dir",
    resolution: int | None = None,
    skip_bad_images: bool = False,
    allow_empty: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    paths: list[Path] | None = None,
) -> list[ImageRecord]:
    """Decode every image in `folder` (or only `paths` of it) up front; each prompt is the caption beside it or
    `default_prompt` (None: every image needs its caption)."""
    if paths is None:
        paths = find_images(folder, option, allow_empty=allow_empty)
    records = []
    for path in paths:
        image = _load_checked(path, max_pixels, skip_bad_images)
        if image is not None and resolution is not None:
            image = _check_resized(path, image, resolution, max_pixels, skip_bad_images)
        if image is not None:
            _warn_about_shape(path, image.size, resolution)
            prompt = _read_caption(path, default_prompt)
            if prompt is None:
                raise LoraDBError(
                    f"{path} has no caption ({path.with_suffix('.txt').name}) and its concept no instance_prompt; "
                    "write the caption, or give the concept an instance_prompt"
                )
            records.append(ImageRecord(path, prompt))
    if paths and not records:
        raise LoraDBError(f"{option} {folder}: none of its {len(paths)} images could be read; fix or replace them")
    return records


def _load_checked(path: Path, max_pixels: int, skip_bad_images: bool) -> Image.Image | None:
    try:
        return load_image(path, max_pixels)
    except LoraDBError as err:
        if not skip_bad_images:
            raise LoraDBError(f"{err} (or pass --skip-bad-images to train without it)") from err
        logger.warning("skipping bad image (--skip-bad-images): %s", err)
        return None


def _check_resized(
    path: Path, image: Image.Image, resolution: int, max_pixels: int, skip_bad_images: bool
) -> Image.Image | None:
    try:
        check_resized_size(path, image.size, resolution, max_pixels)
    except LoraDBError as err:
        if not skip_bad_images:
            raise LoraDBError(f"{err} (or pass --skip-bad-images to train without it)") from err
        logger.warning("skipping bad image (--skip-bad-images): %s", err)
        return None
    return image


def _warn_about_shape(path: Path, size: tuple[int, int], resolution: int | None) -> None:
    width, height = size
    if resolution is not None and min(width, height) < resolution:
        logger.warning(
            "%s is %d x %d pixels, smaller than --resolution %d: it will be upscaled and may look soft",
            path,
            width,
            height,
            resolution,
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        logger.warning(
            "%s has an aspect ratio above %g:1: the square centre crop keeps only part of it",
            path,
            MAX_ASPECT_RATIO,
        )


def _read_caption(image_path: Path, default_prompt: str | None) -> str | None:
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return default_prompt
    try:
        # utf-8-sig drops the byte-order mark that Windows Notepad writes.
        caption = caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise LoraDBError(f"{caption_path}: caption is not UTF-8 text; re-save it as UTF-8") from err
    except OSError as err:
        raise LoraDBError(f"{caption_path}: cannot read caption ({err.strerror or err})") from err
    return caption or default_prompt


def check_caption_lengths(
    tokenizer, records: list[ImageRecord], prompts: dict[str, str | None], *, strict: bool = False
) -> None:
    """Warn (or with `strict`, stop) for every caption or prompt the text encoder would cut at its token limit.

    The subject token often comes last ("..., a photo of sks dog"), so a cut caption silently trains without it.
    """
    limit = tokenizer.model_max_length
    sources = {}
    for record in records:
        caption = record.path.with_suffix(".txt")
        sources.setdefault(record.prompt, str(caption) if caption.is_file() else "--instance-prompt/--class-prompt")
    for option, prompt in prompts.items():
        if prompt:
            sources.setdefault(prompt, option)  # a prompt that is also a caption keeps the caption's source
    problems = []
    for number, (prompt, source) in enumerate(sources.items()):
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if number == 0:
            logger.info("first caption: %d of %d tokens (%s)", len(ids), limit, source)
        if len(ids) > limit:
            lost = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
            lost = lost if len(lost) <= 40 else "..." + lost[-40:]
            problems.append(
                f"{source}: the caption is {len(ids)} tokens and the text encoder reads {limit}, "
                f"so {lost!r} at its end is cut off; shorten it"
            )
    if problems and strict:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoraDBError(f"{problems[0]}{more} (--strict)")
    for problem in problems:
        logger.warning("%s (--strict stops on this)", problem)


# ---------------------------------------------------------------------------------------------------------
# Augmentation and tensors


# ---------------------------------------------------------------------------------------------------------
# Dataset


def _augmentation_seed(seed: int, epoch: int, index: int) -> int:
    # Python's hash() is salted per process, so DataLoader workers and resumed runs would disagree.
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Square crops for the VAE plus the same crop prepared for the CLIP image encoder."""

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        clip_image_processor,
        *,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.records = list(records)
        self.resolution = resolution
        self.clip_image_processor = clip_image_processor
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index) -> dict:
        record = self.records[index]
        rng = random.Random(_augmentation_seed(self.seed, self.epoch, index))
        image = prepare_image(
            load_image(record.path, self.max_pixels),
            self.resolution,
            random_crop=self.random_crop,
            random_flip=self.random_flip,
            rng=rng,
        )
        clip_pixel_values = self.clip_image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {
            "pixel_values": to_tensor(image),
            "clip_pixel_values": clip_pixel_values,
            "prompt": record.prompt,
            "index": index,
        }


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "clip_pixel_values": torch.stack([example["clip_pixel_values"] for example in examples]),
        "prompts": [example["prompt"] for example in examples],
        "indices": [example["index"] for example in examples],
    }


# ---------------------------------------------------------------------------------------------------------
# Synthetic demo subject


def batch_indices(
    num_items: int, batch_size: int, micro_step: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[tuple[int, int]]:
    """(epoch, item) pairs of one process's micro-batch: a pure function of the step, so resume needs no state."""
    start = (micro_step * world_size + rank) * batch_size
    pairs = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_items)
        pairs.append((epoch, int(_epoch_permutation(num_items, seed, epoch)[offset])))
    return pairs


@functools.lru_cache(maxsize=64)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
