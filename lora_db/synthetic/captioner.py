"""tiny-world's image-to-text direction: what `lora-db caption` runs on tiny-world.

UniDiffuser captions an image by denoising a text latent with the image clean (`timestep_img=0`): the U-ViT's
`text_out` head predicts the text latent's noise, the pipeline's DPM-Solver walks it to a clean latent, and the
caption decoder (a GPT-2 reading `decode_prefix(latent)`) writes it out. The U-ViT shares every weight between the
two directions, so the build trains them together, as UniDiffuser was trained:

- `caption_loss`: the i2t objective, mirror of `dreambooth_loss` (the image clean, the text latent noised at a
  uniform timestep, MSE on its noise); a share of examples replaces the image by noise at `timestep_img=T`, the
  unconditional branch that guidance uses.
- `train_caption_decoder`: the GPT-2 (and `decode_prefix`) learns to write a caption from its clean text latent,
  with a little noise on the latent so that what sampling leaves behind still reads. `encode_prefix`, which the
  text-to-image direction uses, stays as the U-ViT stage left it.

The latent a caption decoder learns from is the whole caption's ("a photo of a red star with white dots in a room";
`world.full_caption`), so the model learns to say everything it sees, not the shortened prompts of the world.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_db.models.objective import add_noise, min_snr_weights
from lora_db.synthetic.vae import cosine_lr, optimizer_step, set_lr

# the longest whole caption ("a photo of an orange triangle with a magenta letter on the beach") is 64 bytes; with
# its end token it fits the 67 tokens the pipeline's beam search writes
CAPTION_TOKENS = 66


def caption_loss(
    unet,
    latents: torch.Tensor,
    clip_embeds: torch.Tensor,
    text_latents: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
    uncond_prob: float = 0.1,
    snr_gamma: float | None = 5.0,
) -> torch.Tensor:
    """Per-example loss of UniDiffuser's i2t objective: MSE of `text_out` against the text latent's noise."""
    batch = latents.shape[0]
    num_steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_steps, (batch,), generator=generator)
    noise = torch.randn(text_latents.shape, generator=generator)
    noisy_text = add_noise(noise_scheduler, text_latents, noise, timesteps)
    timestep_img = torch.zeros(batch, dtype=torch.long)
    if uncond_prob > 0:
        drop = torch.rand(batch, generator=generator) < uncond_prob
        image_noise = torch.randn(latents.shape, generator=generator)
        clip_noise = torch.randn(clip_embeds.shape, generator=generator)
        latents = torch.where(drop[:, None, None, None], image_noise, latents)
        clip_embeds = torch.where(drop[:, None, None], clip_noise, clip_embeds)
        timestep_img = torch.where(drop, num_steps, timestep_img)
    _, _, text_out = unet(
        latents, clip_embeds, noisy_text, timestep_img=timestep_img, timestep_text=timesteps, data_type=1
    )
    per_example = (text_out.float() - noise).pow(2).flatten(1).mean(1)
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_example


def caption_tokens(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Byte-level token ids of each caption, then the end token, padded with the end token to `length`."""
    eos = tokenizer.eos_token_id
    rows = []
    for caption in captions:
        ids = [*tokenizer(caption, add_special_tokens=False).input_ids[: length - 1], eos]
        rows.append(ids + [eos] * (length - len(ids)))
    return torch.tensor(rows)


def decoder_loss(text_decoder, text_latents: torch.Tensor, tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Next-token cross-entropy of the caption after its prefix; padding after the first end token is ignored."""
    prefix = text_decoder.decode_prefix(text_latents)
    embeds = torch.cat([prefix, text_decoder.transformer.transformer.wte(tokens)], dim=1)
    logits = text_decoder.transformer(inputs_embeds=embeds).logits
    # the prefix's last position predicts the first token, each token the next
    predicted = logits[:, prefix.shape[1] - 1 : -1]
    after_end = torch.cumsum((tokens == eos).long(), dim=1) - (tokens == eos).long() > 0
    targets = tokens.masked_fill(after_end, -100)
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_caption_decoder(
    text_decoder,
    text_latents: torch.Tensor,
    tokens: torch.Tensor,
    eos: int,
    *,
    steps: int,
    batch: int,
    lr: float,
    latent_noise: float,
    generator: torch.Generator,
    progress,
    lr_at,
) -> list[float]:
    """Teach the GPT-2 and `decode_prefix` to write each caption from its text latent (plus Gaussian noise of std
    `latent_noise` times the latents' std, what an imperfect denoising leaves). `encode_prefix` stays frozen."""
    # encode_prefix takes no part in the loss (the latents come encoded): it is left out of the optimizer
    trained = [p for name, p in text_decoder.named_parameters() if not name.startswith("encode_prefix.")]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    scale = latent_noise * text_latents.std().item()
    losses = []
    text_decoder.train()
    for step in (bar := progress(steps)):
        set_lr(optimizer, lr_at(step))
        index = torch.randint(0, len(tokens), (batch,), generator=generator)
        latents = text_latents[index] + scale * torch.randn(text_latents[index].shape, generator=generator)
        optimizer_step(optimizer, decoder_loss(text_decoder, latents, tokens[index], eos), losses, bar, clip=trained)
    text_decoder.eval()
    return losses


def train_captions(text_decoder, tokenizer, full_hidden: torch.Tensor, full_captions: list[str], config, progress):
    """The build's caption stage: the decoder learns to write each whole caption of the world from its text latent
    (`config` is the tiny-world BuildConfig: caption_steps, caption_batch, caption_lr, caption_latent_noise)."""
    with torch.no_grad():
        text_latents = text_decoder.encode(full_hidden)
    tokens = caption_tokens(tokenizer, full_captions, CAPTION_TOKENS)
    return train_caption_decoder(
        text_decoder, text_latents, tokens, tokenizer.eos_token_id,
        steps=config.caption_steps, batch=config.caption_batch, lr=config.caption_lr,
        latent_noise=config.caption_latent_noise, generator=torch.Generator().manual_seed(config.seed + 5),
        progress=progress, lr_at=lambda step: cosine_lr(step, config.caption_steps, config.caption_lr, warmup=50),
    )  # fmt: skip
