"""The training objective against diffusers' own UniDiffuser pipeline: the same noise prediction, the same noising."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lora_db.models.objective import add_noise, dreambooth_loss
from lora_db.models.random import build_random_pipeline
from lora_db.training.examples import PromptEncoder

PROMPTS = ["a photo of sks robot", "a red cube on grass"]


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny")


def example(pipe, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    latents = torch.randn((len(PROMPTS), pipe.num_channels_latents, size, size), generator=generator)
    clip = torch.randn((len(PROMPTS), 1, pipe.image_encoder_projection_dim), generator=generator)
    return latents, clip


def pipeline_error(pipe, latents, clip, prompt_embeds, timesteps, generator, guidance_scale=1.0):
    """The pipeline's text-to-image noise prediction on the noised example and its squared error, per example.

    `generator` must stand where dreambooth_loss's generator stands after drawing the timesteps.
    """
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(latents.shape, generator=generator)
    clip_noise = torch.randn(clip.shape, generator=generator)
    noisy = pipe._combine(
        scheduler.add_noise(latents, noise, timesteps), scheduler.add_noise(clip, clip_noise, timesteps)
    )
    if guidance_scale > 1:
        torch.rand(latents.shape[0], generator=generator)  # dreambooth_loss's per-example drop draw
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prediction = pipe._get_noise_pred(
        "text2img",
        noisy,
        timesteps,
        prompt_embeds,
        None,
        None,
        scheduler.config.num_train_timesteps,
        1,
        guidance_scale,
        generator,
        "cpu",
        height,
        width,
    )
    vae_out, clip_out = pipe._split(prediction, height, width)
    return vae_out, clip_out, noise, clip_noise


def test_prompt_encoder_is_the_pipelines_own_text_path(pipe):
    with torch.no_grad():
        ours = PromptEncoder(pipe, torch.device("cpu"), trainable=False)(PROMPTS)
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        theirs = pipe.text_decoder.encode(theirs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_loss_is_the_pipelines_t2i_noise_prediction_error(pipe):
    latents, clip = example(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        prompt_embeds = PromptEncoder(pipe, torch.device("cpu"), trainable=False)(PROMPTS)
        loss = dreambooth_loss(
            pipe.unet, latents, clip, prompt_embeds, scheduler, torch.Generator().manual_seed(3), timesteps=timesteps
        )
        vae_out, clip_out, noise, clip_noise = pipeline_error(
            pipe, latents, clip, prompt_embeds, timesteps, torch.Generator().manual_seed(3)
        )
    expected = torch.cat([(vae_out - noise).pow(2).flatten(1), (clip_out - clip_noise).pow(2).flatten(1)], 1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_unconditional_branch_is_the_pipelines_guidance_pass(pipe):
    """uncond_prob=1 trains what guidance subtracts: text replaced by noise at timestep_text = T."""
    latents, clip = example(pipe, seed=1)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timesteps = torch.tensor([250, 999])
    with torch.no_grad():
        prompt_embeds = PromptEncoder(pipe, torch.device("cpu"), trainable=False)(PROMPTS)
        loss = dreambooth_loss(
            pipe.unet,
            latents,
            clip,
            prompt_embeds,
            scheduler,
            torch.Generator().manual_seed(5),
            uncond_prob=1.0,
            timesteps=timesteps,
        )
        # With guidance g the pipeline returns g * cond + (1 - g) * uncond; g = 2 gives uncond = 2 * cond - result.
        cond_vae, cond_clip, _, _ = pipeline_error(
            pipe, latents, clip, prompt_embeds, timesteps, torch.Generator().manual_seed(5)
        )
        vae_out, clip_out, noise, clip_noise = pipeline_error(
            pipe, latents, clip, prompt_embeds, timesteps, torch.Generator().manual_seed(5), guidance_scale=2.0
        )
    uncond_vae, uncond_clip = 2 * cond_vae - vae_out, 2 * cond_clip - clip_out
    expected = torch.cat(
        [(uncond_vae - noise).pow(2).flatten(1), (uncond_clip - clip_noise).pow(2).flatten(1)], 1
    ).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    conditional = torch.cat([(cond_vae - noise).pow(2).flatten(1), (cond_clip - clip_noise).pow(2).flatten(1)], 1)
    assert not torch.allclose(loss, conditional.mean(1), rtol=1e-3), "the text must really be replaced"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noising_is_exact_in_low_precision_at_every_small_timestep(pipe, dtype):
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sample = torch.randn(64, 4, 8, 8).to(dtype)
    noise = torch.randn(64, 4, 8, 8)
    timesteps = torch.arange(64) % 8  # t = 0..7, where a low-precision schedule is furthest off
    alphas = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    reference = alphas.sqrt() * sample.double() + (1 - alphas).sqrt() * noise.double()
    ours = add_noise(scheduler, sample, noise, timesteps)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    # What diffusers' add_noise computes on the low-precision sample itself (the trap add_noise avoids).
    naive = scheduler.add_noise(sample, noise.to(dtype), timesteps).double()
    assert (naive - reference).abs().max() > 1e-3


def test_the_unet_sees_fp32_noised_inputs_under_bf16(pipe):
    latents, clip = example(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    seen = {}
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            prompt_embeds = PromptEncoder(pipe, torch.device("cpu"), trainable=False)(PROMPTS)
            timesteps = torch.tensor([0, 1])
            dreambooth_loss(
                pipe.unet,
                latents.bfloat16(),
                clip.bfloat16(),
                prompt_embeds,
                scheduler,
                torch.Generator().manual_seed(0),
                timesteps=timesteps,
            )
    finally:
        hook.remove()
    noisy_latents = seen["args"][0]
    assert noisy_latents.dtype == torch.float32
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * latents.bfloat16().float() + (1 - alphas).sqrt() * noise
    torch.testing.assert_close(noisy_latents, expected)
    assert not torch.equal(noisy_latents, latents.bfloat16().float()), "t = 0 and 1 still add noise"
