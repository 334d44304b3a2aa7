"""Instance and class images: finding, validating, decoding, augmenting and batching them.

Every image is decoded once by `scan_images` before any model is loaded, so a bad photo fails in seconds
with a message that names it instead of crashing a training run minutes later.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import LoraDBError
from .io import atomic_write

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASS_MANIFEST = "lora-db-class-images.json"  # lora-db's record of the class images it generated (class_images.py)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 4.0

logger = logging.getLogger("lora_db")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    prompt: str


# ---------------------------------------------------------------------------------------------------------
# Finding images


def find_images(folder: str | Path, option: str = "--instance-dir", *, allow_empty: bool = False) -> list[Path]:
    """Sorted image files directly inside `folder`; `allow_empty` suits a class folder not generated yet."""
    folder = Path(folder)
    if not folder.exists():
        if allow_empty:
            return []
        raise LoraDBError(f"{option} {folder}: folder not found; pass a folder of jpg/png/webp/bmp photos")
    if not folder.is_dir():
        raise LoraDBError(f"{option} {folder}: is a file, not a folder; pass the folder that holds the photos")
    try:
        children = sorted(folder.iterdir())
        paths = [path for path in children if _is_image_file(path)]
        ignored = [path.name for path in children if _is_ignored_file(path)]
    except OSError as err:
        raise LoraDBError(f"{option} {folder}: cannot list the folder ({err.strerror or err})") from err
    if ignored:
        logger.warning(
            "%s %s: ignoring %d file(s) that are not jpg/jpeg/png/webp/bmp: %s%s",
            option,
            folder,
            len(ignored),
            ", ".join(ignored[:5]),
            ", ..." if len(ignored) > 5 else "",
        )
    if not paths and not allow_empty:
        raise LoraDBError(
            f"{option} {folder}: no jpg/jpeg/png/webp/bmp images in it; add photos or pass another folder"
        )
    return paths


def _is_image_file(path: Path) -> bool:
    # Dotfiles are skipped: macOS leaves "._photo.jpg" metadata files on copied drives that are not images.
    # A broken or looping link is kept, so that loading it reports it instead of it vanishing from the data.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and (path.is_file() or _is_broken_link(path))
    )


def _is_ignored_file(path: Path) -> bool:
    """A file the user may have meant as a photo (a .heic, a .gif) but that lora-db does not read."""
    if path.name.startswith(".") or path.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt") or path.name == CLASS_MANIFEST:
        return False
    return path.is_file() or _is_broken_link(path)


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()  # exists() is False for a dangling and for a looping link


# ---------------------------------------------------------------------------------------------------------
# Decoding one image


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode `path` as an upright 8-bit RGB image, or raise a LoraDBError that names the file."""
    path = Path(path)
    _check_file(path)
    try:
        return _decode(path, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        reason = str(err).rstrip(".")
        raise LoraDBError(f"{path}: {reason}; downscale it below {max_pixels} pixels") from err
    except UnidentifiedImageError as err:
        raise LoraDBError(f"{path}: not an image Pillow can read; delete it or re-save it as PNG/JPEG") from err
    except PermissionError as err:
        raise LoraDBError(f"{path}: permission denied; make the file readable") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise LoraDBError(
            f"{path}: truncated or corrupt image ({err}); re-export or re-download it, or delete it"
        ) from err


def _decode(path: Path, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # The size check below replaces Pillow's header warning with a message that names width and height.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image, warnings.catch_warnings():
        # Some formats (ICO, later GIF frames) only learn their real size while decoding.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _check_pixels(path, image.size, max_pixels)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def _check_file(path: Path) -> None:
    if _is_broken_link(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise LoraDBError(
            f"{path}: symbolic link to {target}, which does not exist or loops back; fix the link or delete it"
        )
    if not path.is_file():
        raise LoraDBError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise LoraDBError(f"{path}: empty file (0 bytes); delete it or copy the photo again")


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise LoraDBError(
            f"{path} is {width} x {height} pixels, above the limit of {max_pixels}; "
            "downscale it (a few megapixels is plenty for training)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_bit_depth_to_8bit(image).convert("RGB")
    if image.has_transparency_data:
        return _on_white(image.convert("RGBA"))
    # Pillow already undoes Adobe's inverted CMYK when decoding JPEG, so a plain convert gets colours right.
    return image.convert("RGB")


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips these modes at 255, turning an ordinary 16-bit photo white.
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.max() <= 1.0:
        values = values * 65535.0  # float images are usually normalised to [0, 1]
    eight_bit = np.round(np.clip(values, 0.0, 65535.0) / 257.0).astype(np.uint8)
    return Image.fromarray(eight_bit)


def _on_white(image: Image.Image) -> Image.Image:
    # Transparent pixels often hold black or garbage colour; white matches how the photo looks in a viewer.
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Scanning a folder


def scan_images(
    folder: str | Path,
    default_prompt: str,
    *,
    option: str = "--instance-dir",
    resolution: int | None = None,
    skip_bad_images: bool = False,
    allow_empty: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    paths: list[Path] | None = None,
) -> list[ImageRecord]:
    """Decode every image in `folder` (or only `paths` of it) up front; each prompt is the caption beside it or
    `default_prompt`."""
    if paths is None:
        paths = find_images(folder, option, allow_empty=allow_empty)
    records = []
    for path in paths:
        image = _load_checked(path, max_pixels, skip_bad_images)
        if image is not None and resolution is not None:
            image = _check_resized(path, image, resolution, max_pixels, skip_bad_images)
        if image is not None:
            _warn_about_shape(path, image.size, resolution)
            records.append(ImageRecord(path, _read_caption(path, default_prompt)))
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


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The size `prepare_image` resizes to before cropping: the shorter side becomes `resolution`."""
    width, height = size
    scale = resolution / min(width, height)
    # max() keeps rounding from leaving the shorter side one pixel short of the crop.
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def check_resized_size(path, size: tuple[int, int], resolution: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """An extreme side (400000 x 1) passes the pixel limit but would be upscaled into gigabytes: refuse it too."""
    width, height = resized_size(size, resolution)
    if width * height > max_pixels:
        raise LoraDBError(
            f"{path} is {size[0]} x {size[1]} pixels: resized to {resolution} px on its short side it would be "
            f"{width} x {height}, above the limit of {max_pixels} pixels; crop it closer to square"
        )


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


def _read_caption(image_path: Path, default_prompt: str) -> str:
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


def prepare_image(
    image: Image.Image,
    resolution: int,
    *,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Resize the shorter side to `resolution`, crop a square, optionally mirror it."""
    if (random_crop or random_flip) and rng is None:
        raise ValueError("random_crop and random_flip need an rng so augmentation stays reproducible")
    image = _resize_shorter_side(image, resolution)
    image = _crop_square(image, resolution, rng if random_crop else None)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    check_resized_size(getattr(image, "filename", None) or "an image", image.size, resolution)
    # Pillow's resize widens the filter when shrinking, so it is antialiased.
    return image.resize(resized_size(image.size, resolution), Image.Resampling.BICUBIC)


def _crop_square(image: Image.Image, resolution: int, rng: random.Random | None) -> Image.Image:
    spare_x, spare_y = image.width - resolution, image.height - resolution
    if rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0


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

_WALL_FLOOR_COLOURS = (
    ((214, 228, 240), (170, 140, 110)),
    ((240, 226, 200), (120, 150, 120)),
    ((225, 215, 235), (150, 150, 160)),
    ((200, 230, 215), (190, 170, 140)),
    ((245, 240, 230), (110, 120, 140)),
    ((235, 210, 205), (160, 130, 100)),
)
_SUPERSAMPLE = 4


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


def make_demo_images(folder: str | Path, count: int = 5, size: int = 256, seed: int = 0) -> list[Path]:
    """Write `count` offline photos of one toy robot in varied poses and rooms: subject_00.png, ..."""
    rng = random.Random(seed)
    toy = _draw_toy(size * _SUPERSAMPLE)
    paths = []
    for number in range(count):
        image = _demo_scene(toy, size, rng)
        path = Path(folder) / f"subject_{number:02d}.png"
        paths.append(atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG")))
    return paths


def _demo_scene(toy: Image.Image, size: int, rng: random.Random) -> Image.Image:
    wall, floor = rng.choice(_WALL_FLOOR_COLOURS)
    horizon = round(size * rng.uniform(0.6, 0.72))
    scene = _background(size, wall, floor, horizon)
    toy_size = round(size * 0.62 * rng.uniform(0.82, 1.05))
    posed = toy.rotate(rng.uniform(-12.0, 12.0), resample=Image.Resampling.BICUBIC)
    posed = posed.resize((toy_size, toy_size), Image.Resampling.LANCZOS)
    left = round((size - toy_size) / 2 + size * rng.uniform(-0.12, 0.12))
    top = round(horizon - toy_size * 0.85 + size * rng.uniform(-0.04, 0.04))
    _draw_shadow(scene, left + toy_size // 2, top + round(toy_size * 0.93), toy_size)
    scene.alpha_composite(posed, (left, top))
    return scene.convert("RGB")


def _background(size: int, wall: tuple, floor: tuple, horizon: int) -> Image.Image:
    # A soft vertical shade on the wall keeps backgrounds from being flat fills the model could ignore.
    shade = Image.linear_gradient("L").resize((size, size))
    scene = Image.composite(Image.new("RGBA", (size, size), wall), Image.new("RGBA", (size, size), "white"), shade)
    ImageDraw.Draw(scene).rectangle((0, horizon, size, size), fill=floor)
    return scene


def _draw_shadow(scene: Image.Image, centre_x: int, centre_y: int, toy_size: int) -> None:
    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    rx, ry = toy_size * 0.32, toy_size * 0.06
    ImageDraw.Draw(shadow).ellipse((centre_x - rx, centre_y - ry, centre_x + rx, centre_y + ry), (0, 0, 0, 90))
    scene.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(max(1.0, toy_size / 40))))


ROBOT_OUTLINE = (40, 40, 50, 255)


def draw_robot(side: int, *, head: tuple, body: tuple, antenna: tuple, star: tuple | None = None) -> Image.Image:
    """The toy robot of the demo photos and of tiny-world's world, on a transparent square: antenna, arms (head
    colour), legs, body, head, eyes, mouth, and a star on its body when `star` is a colour."""
    robot = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(robot)

    def box(x0, y0, x1, y1):
        return (x0 * side, y0 * side, x1 * side, y1 * side)

    outline, line = ROBOT_OUTLINE, max(1, side // 90)
    draw.line(box(0.5, 0.13, 0.5, 0.24), fill=outline, width=line * 2)
    draw.ellipse(box(0.455, 0.07, 0.545, 0.16), fill=antenna, outline=outline, width=line)
    for x0 in (0.13, 0.77):
        draw.rounded_rectangle(box(x0, 0.54, x0 + 0.1, 0.76), side * 0.04, head, outline, line)
    for x0 in (0.3, 0.55):
        draw.rectangle(box(x0, 0.84, x0 + 0.15, 0.92), fill=outline)
    draw.rounded_rectangle(box(0.22, 0.5, 0.78, 0.87), side * 0.06, body, outline, line)
    draw.rounded_rectangle(box(0.27, 0.22, 0.73, 0.5), side * 0.06, head, outline, line)
    for cx in (0.4, 0.6):
        draw.ellipse(box(cx - 0.055, 0.3, cx + 0.055, 0.41), fill="white", outline=outline, width=line)
        draw.ellipse(box(cx - 0.022, 0.335, cx + 0.022, 0.38), fill=outline)
    draw.rounded_rectangle(box(0.42, 0.43, 0.58, 0.46), side * 0.01, outline)
    if star is not None:
        draw.polygon(_star(0.5 * side, 0.685 * side, 0.11 * side), fill=star, outline=outline)
    return robot


def _draw_toy(side: int) -> Image.Image:
    """A teal-headed, red-bodied robot with a yellow star: distinctive enough to recognise across photos."""
    teal, red, yellow = (31, 163, 163, 255), (232, 67, 46, 255), (255, 212, 0, 255)
    return draw_robot(side, head=teal, body=red, antenna=yellow, star=yellow)


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points
