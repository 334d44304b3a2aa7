"""Text-to-image sampling shared by class-image generation, validation during training and `lora-db sample`.

Images are saved as PNG with their prompt, seed and settings in PNG text chunks, written atomically.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, PngImagePlugin

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


def image_grid(
    images: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
) -> Image.Image:
    """A labelled grid: one row per list of images, labels on the left and on top."""
    cell_w = max(im.width for row in images for im in row if im is not None)
    cell_h = max(im.height for row in images for im in row if im is not None)
    label_w = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    label_h = 16 if column_labels else 0
    columns = max(len(row) for row in images)
    grid = Image.new("RGB", (label_w + columns * cell_w, label_h + len(images) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 2, 2), label[: max(1, cell_w // 6)], fill="black")
    for r, row in enumerate(images):
        if r < len(row_labels):
            draw.text((4, label_h + r * cell_h + cell_h // 2 - 5), row_labels[r], fill="black")
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im, (label_w + c * cell_w, label_h + r * cell_h))
    return grid
