"""Text-to-image sampling shared by class-image generation, validation during training and `lora-db sample`,
image-to-text captions for `lora-db sample --mode i2t`, and labelled comparison grids.

Images are saved as PNG with their prompt, seed and settings in PNG text chunks, written atomically.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .io import atomic_write


@torch.no_grad()
def generate_images(
    pipe,
    prompt: str,
    num_images: int,
    *,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 8.0,
    batch_size: int = 4,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """`num_images` t2i samples of one prompt; image i depends only on (seed, i), not on the batch size."""
    pipe.set_text_to_image_mode()
    device = pipe._execution_device
    images: list[Image.Image] = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        # One generator per image keeps each sample reproducible whatever the batching.
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(count)]
        vae_latents, clip_latents = _initial_latents(pipe, generators, device)
        with autocast():
            out = pipe(
                prompt=[prompt] * count,
                vae_latents=vae_latents,
                clip_latents=clip_latents,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
            )
        images.extend(out.images)
        if on_batch is not None:
            on_batch(count)
    pipe.reset_mode()
    return images


def _initial_latents(pipe, generators: Sequence[torch.Generator], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting noise for the VAE latent and the CLIP image embedding, drawn per image on the CPU."""
    size = pipe.unet.config.sample_size
    vae_shape = (pipe.num_channels_latents, size, size)
    clip_shape = (1, pipe.image_encoder_projection_dim)
    vae = torch.stack([torch.randn(vae_shape, generator=g) for g in generators])
    clip = torch.stack([torch.randn(clip_shape, generator=g) for g in generators])
    dtype = pipe.unet.dtype
    return vae.to(device=device, dtype=dtype), clip.to(device=device, dtype=dtype)


@torch.no_grad()
def generate_captions(
    pipe,
    image: Image.Image,
    num_captions: int,
    *,
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 8.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[str]:
    """`num_captions` i2t captions of one image; caption i depends only on (seed, i).

    The image is centre-cropped to the model's native size: the VAE has no other size to encode.
    """
    from .data import prepare_image

    image = prepare_image(image, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    pipe.set_image_to_text_mode()
    captions = []
    for i in range(num_captions):
        with autocast():
            out = pipe(
                image=image,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
            )
        captions.extend(out.text)
    pipe.reset_mode()
    return captions


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
) -> Image.Image:
    """A labelled grid: one row per list of images, labels on the left and (wrapped to the cell width) on top.

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
    return grid


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
