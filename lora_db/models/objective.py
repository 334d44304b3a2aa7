"""UniDiffuser's text-to-image objective: how a DreamBooth example becomes a loss.

    source = example_source(config, records, pipe, dtype, device)       # photos -> latents, CLIP embeddings
    latents, clip_embeds, texts = source.batch(pairs, generator)
    prompt_embeds = PromptEncoder(pipe, device, trainable=False)(texts)  # CLIP text -> text_decoder.encode
    per_example = dreambooth_loss(unet, latents, clip_embeds, prompt_embeds, noise_scheduler, generator)

The VAE latent and the CLIP image embedding are noised at one timestep, the text stays clean (`timestep_text=0`,
`data_type=1`), and both image outputs regress their noise: exactly the noise prediction the pipeline makes when
sampling text-to-image. Guidance is not part of the loss; `uncond_prob` trains the unconditional branch that
guidance uses (text replaced by Gaussian noise at `timestep_text=T`). Noise, noising and targets are fp32 whatever
the weights' dtype: only the model runs in low precision.

Two options of diffusers' trainers, applied to this joint target:
- min-SNR weighting (`snr_gamma`): the VAE latent and the CLIP embedding share one timestep, hence one SNR, so each
  example's joint MSE is weighted by min(SNR, gamma) / SNR (epsilon prediction), as diffusers weights its one image.
- noise offset (`noise_offset`): one Gaussian per image and latent channel, times the offset, is added to the VAE
  latent's noise only, because the offset teaches the mean brightness of an image, which only the spatial latent
  has; the CLIP embedding is one vector with no spatial mean, so its noise stays plain.
"""

from __future__ import annotations

import torch
from torch import nn


def add_noise(noise_scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward diffusion q(x_t | x_0) in fp32.

    diffusers' `add_noise` casts its schedule to the sample's dtype before the square roots: in bf16, t=0 and t=1
    would add no noise at all and t <= 6 would be off by more than 10%.
    """
    return noise_scheduler.add_noise(sample.float(), noise.float(), timesteps)


def dreambooth_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    clip_embeds: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
    uncond_prob: float = 0.0,
    timesteps: torch.Tensor | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-example loss of UniDiffuser's t2i objective (MSE over the joint VAE + CLIP image noise).

    `timesteps` (one per example) defaults to uniform draws from the noise scheduler's training range.
    """
    batch = latents.shape[0]
    device = latents.device
    num_steps = noise_scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = torch.randint(0, num_steps, (batch,), generator=generator, device=device)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    clip_noise = torch.randn(clip_embeds.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset > 0:
        channel_shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
        noise = noise + noise_offset * channel_shift
    noisy_latents = add_noise(noise_scheduler, latents, noise, timesteps)
    noisy_clip = add_noise(noise_scheduler, clip_embeds, clip_noise, timesteps)
    timestep_text = torch.zeros(batch, dtype=torch.long, device=device)
    if uncond_prob > 0:
        drop = torch.rand(batch, generator=generator, device=device) < uncond_prob
        text_noise = torch.randn(prompt_embeds.shape, generator=generator, device=device, dtype=torch.float32)
        prompt_embeds = torch.where(drop[:, None, None], text_noise, prompt_embeds.float())
        timestep_text = torch.where(drop, num_steps, timestep_text)
    vae_out, clip_out, _ = unet(
        noisy_latents,
        noisy_clip,
        prompt_embeds,
        timestep_img=timesteps,
        timestep_text=timestep_text,
        data_type=1,
    )
    vae_err = (vae_out.float() - noise).pow(2).flatten(1)
    clip_err = (clip_out.float() - clip_noise).pow(2).flatten(1)
    per_example = torch.cat([vae_err, clip_err], dim=1).mean(1)
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_example


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per example (Hang et al. 2023, epsilon prediction), SNR from diffusers' `compute_snr`."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr
