"""Text-to-image sampling shared by class-image generation, validation during training and `lora-db sample`,
image-to-text captions for `lora-db sample --mode i2t`, and labelled comparison grids.

Images are saved as PNG with their prompt, seed and settings in PNG text chunks, written atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lora_db.images import prepare_image


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
                output_type="np",  # made PIL here, after a look at the numbers PIL would hide
            )
        images.extend(to_pil(array) for array in out.images)
        if on_batch is not None:
            on_batch(count)
    pipe.reset_mode()
    return images


SAMPLE_PROBLEM = "lora_db.sample_problem"  # key in a generated image's `info`: what is wrong with it, if anything


def sample_problem(array: np.ndarray) -> str | None:
    """What makes a sample (floats in [0, 1], as the pipeline decodes it) useless, or None: non-finite values
    (they save as black), or one value everywhere (a black, grey or single-colour picture)."""
    if not np.isfinite(array).all():
        return "holds NaN or infinite values"
    levels = np.round(array * 255)
    if levels.min() == levels.max():
        return f"is one value everywhere ({int(levels.min())} of 255)"
    return None


def to_pil(array: np.ndarray) -> Image.Image:
    """diffusers' float-to-PIL conversion (x 255, rounded), with a problem noted in `info[SAMPLE_PROBLEM]`."""
    image = Image.fromarray(np.round(np.nan_to_num(array) * 255).astype(np.uint8))
    problem = sample_problem(array)
    if problem is not None:
        image.info[SAMPLE_PROBLEM] = problem
    return image


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
