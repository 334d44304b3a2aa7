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

import contextlib

import torch
from torch import nn

from .config import TrainConfig
from .data import DreamBoothDataset, ImageRecord, collate


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


class ExampleSource:
    """Training examples for the loop: from images each step, or from encodings cached once."""

    def __init__(self, dataset: DreamBoothDataset, pipe, dtype: torch.dtype, device: torch.device, cache: bool):
        self.dataset, self.pipe, self.dtype, self.device = dataset, pipe, dtype, device
        self.cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if cache:
            self.cache = [self._encode_item(self.dataset[i]) for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def _encode_item(self, item: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = item["pixel_values"][None].to(self.device, self.dtype)
        latent_dist = self.pipe.vae.encode(pixels).latent_dist
        clip = self._clip_embeds(item["clip_pixel_values"][None])
        return latent_dist.mean[0], latent_dist.std[0], clip[0]

    def _clip_embeds(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        return self.pipe.image_encoder(pixel_values=clip_pixels.to(self.device, self.dtype)).image_embeds[:, None]

    @torch.no_grad()
    def batch(
        self, pairs: list[tuple[int, int]], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Scaled VAE latents (sampled from the posterior), CLIP image embeddings (both fp32) and prompts."""
        prompts = [self.dataset.records[index].prompt for _, index in pairs]
        if self.cache is not None:
            mean, std, clip = (torch.stack(parts) for parts in zip(*(self.cache[i] for _, i in pairs), strict=True))
        else:
            items = []
            for epoch, index in pairs:
                self.dataset.set_epoch(epoch)
                items.append(self.dataset[index])
            batch = collate(items)
            latent_dist = self.pipe.vae.encode(batch["pixel_values"].to(self.device, self.dtype)).latent_dist
            mean, std = latent_dist.mean, latent_dist.std
            clip = self._clip_embeds(batch["clip_pixel_values"])
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        latents = (mean.float() + std.float() * noise) * self.pipe.vae.config.scaling_factor
        return latents, clip.float(), prompts


def example_source(
    config: TrainConfig, records: list[ImageRecord], pipe, dtype: torch.dtype, device: torch.device
) -> ExampleSource:
    dataset = DreamBoothDataset(
        records,
        config.resolution,
        pipe.clip_image_processor,
        random_crop=config.random_crop,
        random_flip=config.random_flip,
        seed=config.seed,
    )
    return ExampleSource(dataset, pipe, dtype, device, cache=config.cache_latents)


class PromptEncoder:
    """Prompt -> CLIP text encoder -> text_decoder.encode -> U-ViT text input, with gradients when trained.

    `text_encoder` is the module to call: when it is trained across processes, the wrapper accelerate returned,
    since DDP only all-reduces the gradients of calls that go through it.
    """

    def __init__(self, pipe, device: torch.device, trainable: bool, text_encoder: nn.Module | None = None):
        self.pipe, self.device, self.trainable = pipe, device, trainable
        self.text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.pipe.clip_tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.pipe.clip_tokenizer.model_max_length,
            return_tensors="pt",
        )
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return self.pipe.text_decoder.encode(hidden)

    def precompute(self, prompts: set[str]) -> None:
        with torch.no_grad():
            for prompt in sorted(prompts):
                self.cache[prompt] = self._encode([prompt])[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trainable or any(p not in self.cache for p in prompts):
            with contextlib.nullcontext() if self.trainable else torch.no_grad():
                return self._encode(prompts)
        return torch.stack([self.cache[p] for p in prompts])
