"""The tiny random model: its VAE scaling factor is derived from its own latents, as SD's was."""

from __future__ import annotations

import pytest
import torch

from lora_db.images import load_image, prepare_image, to_tensor
from lora_db.models.random import build_random_pipeline, derive_scaling_factor
from lora_db.synthetic.demo import make_demo_images


@pytest.mark.parametrize("preset", ["tiny"])
def test_scaled_latents_of_the_demo_photos_have_unit_variance(preset, tmp_path, one_thread):
    pipe = build_random_pipeline(preset)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    paths = make_demo_images(tmp_path, count=8, size=size)
    pixels = torch.stack([to_tensor(prepare_image(load_image(p), size)) for p in paths])
    factor = pipe.vae.config.scaling_factor
    assert derive_scaling_factor(pipe.vae, pixels) == pytest.approx(factor, rel=0.02)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
    # Both what training samples and the posterior means are about unit variance, not SD's 0.057 RMS.
    sampled = dist.sample(torch.Generator().manual_seed(1)) * factor
    assert 0.9 < sampled.std().item() < 1.1
    assert 0.85 < (dist.mean * factor).std().item() < 1.1
