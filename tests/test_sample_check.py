"""A validation sample that is all one value or holds NaN/infinity is a warning naming the step (black samples
passed unnoticed before); the conversion to PIL is diffusers' own, so every other sample is unchanged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lora_db.models.sampling import SAMPLE_PROBLEM, sample_problem, to_pil


def test_sample_problem_names_non_finite_and_flat_samples():
    rng = np.random.default_rng(0)
    assert sample_problem(rng.random((8, 8, 3), dtype=np.float32)) is None
    nan = rng.random((8, 8, 3), dtype=np.float32)
    nan[3, 4, 1] = np.nan
    assert "NaN or infinite" in sample_problem(nan)
    assert "one value everywhere (0 of 255)" in sample_problem(np.zeros((8, 8, 3), dtype=np.float32))
    assert "(128 of 255)" in sample_problem(np.full((8, 8, 3), 0.5, dtype=np.float32))
    # Differences below one 8-bit step are no picture either.
    assert sample_problem(np.full((8, 8, 3), 0.5, dtype=np.float32) + 1e-4 * rng.random((8, 8, 3))) is not None


def test_to_pil_is_diffusers_conversion_and_notes_the_problem():
    from diffusers.image_processor import VaeImageProcessor

    array = np.random.default_rng(1).random((2, 16, 16, 3), dtype=np.float32)
    ours = [to_pil(a) for a in array]
    theirs = VaeImageProcessor.numpy_to_pil(array)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs, strict=True))
    assert all(SAMPLE_PROBLEM not in image.info for image in ours)
    black = to_pil(np.full((16, 16, 3), np.nan, dtype=np.float32))
    assert np.asarray(black).max() == 0 and "NaN" in black.info[SAMPLE_PROBLEM]


@pytest.mark.parametrize(
    ("fill", "expected"),
    [
        (float("nan"), "holds NaN or infinite values"),
        (-1.0, "is one value everywhere (0 of 255)"),  # black after the pipeline's (x / 2 + 0.5)
        (None, None),
    ],
)
def test_a_broken_validation_sample_is_a_warning_naming_the_step(tiny_config, monkeypatch, caplog, fill, expected):
    from diffusers import AutoencoderKL

    from lora_db.training.loop import train

    decode = AutoencoderKL.decode

    def decode_broken(self, latents, *args, **kwargs):
        out = decode(self, latents, *args, **kwargs)
        if fill is not None and not torch.is_grad_enabled() and latents.shape[0] == 1:  # validation, not a step
            out[0].fill_(fill)
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", decode_broken)
    config = tiny_config(
        max_train_steps=2,
        validation_prompt="a photo of sks robot",
        validation_steps=2,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    with caplog.at_level(logging.WARNING, logger="lora_db"):
        result = train(config)
    warnings = [r.getMessage() for r in caplog.records if "validation at step" in r.getMessage()]
    if expected is None:
        assert warnings == []
    else:
        assert warnings == [
            f"validation at step 2: sample 0 (seed 0) {expected}; the weights have diverged or the sampling settings "
            "are off (the PNG is saved as it came out)"
        ]
    assert (result.validation_dir / "step-000002-0.png").is_file()
