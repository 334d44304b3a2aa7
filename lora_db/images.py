"""TODO"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from lora_db.errors import LoraDBError
from lora_db.io import atomic_write

logger = logging.getLogger("lora_db")


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


CLASS_MANIFEST = "lora-db-class-images.json"  # lora-db's record of the class images it generated (class_images.py)


DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


MAX_ASPECT_RATIO = 4.0


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


def png_bytes(image: Image.Image, text: Mapping[str, object] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, text: Mapping[str, object] | None = None) -> Path:
    data = png_bytes(image, text)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (what `save_png` recorded); empty for other formats or an unreadable file."""
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", None) or {})
    except (OSError, ValueError, Image.DecompressionBombError):
        return {}


LABEL_FONT_SIZE = 13


LABEL_PAD = 4


ROW_LABEL_WIDTH = 180  # pixels; longer row labels wrap


LABEL_MAX_LINES = 3


def image_grid(
    images: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    *,
    min_cell_size: int = 0,
    title: str = "",
) -> Image.Image:
    """A labelled grid: one row per list of images, labels on the left and (wrapped to the cell width) on top,
    and `title` (a prompt, say) wrapped across the top when given.

    Cells narrower than `min_cell_size` are enlarged by a whole factor with nearest-neighbour resampling, so a
    64-pixel sample keeps its exact pixels and still leaves room for a readable label.
    """
    cells = [im for row in images for im in row if im is not None]
    factor = max(1, math.ceil(min_cell_size / min(im.width for im in cells)))
    cell_w = factor * max(im.width for im in cells)
    cell_h = factor * max(im.height for im in cells)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    top = [_wrap(label, cell_w - 2 * LABEL_PAD, font, measure) for label in column_labels]
    left = [_wrap(label, ROW_LABEL_WIDTH, font, measure) for label in row_labels]
    line_h = LABEL_FONT_SIZE + 4
    label_h = max((len(lines) for lines in top), default=0) * line_h + 2 * LABEL_PAD if top else 0
    label_w = max((measure(line, font=font) for lines in left for line in lines), default=0)
    label_w = math.ceil(label_w) + 2 * LABEL_PAD if left else 0
    columns = max(len(row) for row in images)
    grid = Image.new("RGB", (label_w + columns * cell_w, label_h + len(images) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(top):
        draw.multiline_text(
            (label_w + c * cell_w + LABEL_PAD, LABEL_PAD), "\n".join(lines), fill="black", font=font, spacing=4
        )
    for r, row in enumerate(images):
        if r < len(left):
            y = label_h + r * cell_h + (cell_h - len(left[r]) * line_h) // 2
            draw.multiline_text((LABEL_PAD, y), "\n".join(left[r]), fill="black", font=font, spacing=4)
        for c, im in enumerate(row):
            if im is not None:
                im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
                grid.paste(im, (label_w + c * cell_w, label_h + r * cell_h))
    return _titled(grid, title, measure) if title else grid


TITLE_FONT_SIZE = 15


def _titled(image: Image.Image, title: str, measure) -> Image.Image:
    """`image` below a band holding `title`, wrapped to the image's width."""
    font = ImageFont.load_default(size=TITLE_FONT_SIZE)
    lines = _wrap(title, image.width - 2 * LABEL_PAD, font, measure)
    band = len(lines) * (TITLE_FONT_SIZE + 4) + 2 * LABEL_PAD
    titled = Image.new("RGB", (image.width, band + image.height), "white")
    ImageDraw.Draw(titled).multiline_text((LABEL_PAD, LABEL_PAD), "\n".join(lines), fill="black", font=font, spacing=4)
    titled.paste(image, (0, band))
    return titled


def _wrap(text: str, width: float, font, measure) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than that is broken; at most LABEL_MAX_LINES lines."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += " " + word
            continue
        while len(word) > 1 and measure(word, font=font) > width:
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > LABEL_MAX_LINES:
        lines = lines[:LABEL_MAX_LINES]
        lines[-1] = lines[-1][:-3] + "..."  # the default font has no glyph for an ellipsis character
    return lines or [""]
