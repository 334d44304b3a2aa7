"""tiny-world's image-to-text training (lora_db.synthetic.captioner): the i2t objective and the caption decoder."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # the fixture builds tiny-world's untrained parts (8 s); the decoder trains 300 steps


@pytest.fixture(scope="module")
def parts(one_thread):
    from lora_db.synthetic.tiny_world import BuildConfig, build_components

    parts, _ = build_components(BuildConfig(uvit_layers=2))
    return parts


def test_caption_tokens_end_with_the_end_token_and_the_loss_ignores_the_padding(parts):
    from lora_db.synthetic.captioner import caption_tokens, decoder_loss

    tokenizer = parts["text_tokenizer"]
    eos = tokenizer.eos_token_id
    tokens = caption_tokens(tokenizer, ["a photo of a red star", "a toy"], 24)
    assert tokens.shape == (2, 24)
    assert tokenizer.decode(tokens[1, :5]) == "a toy" and (tokens[1, 5:] == eos).all()
    decoder = parts["text_decoder"].eval()
    latents = torch.randn(2, decoder.prefix_length, decoder.prefix_hidden_dim)
    # what follows the first end token does not change the loss
    padded = tokens.clone()
    padded[1, 6:] = 7
    assert torch.allclose(decoder_loss(decoder, latents, tokens, eos), decoder_loss(decoder, latents, padded, eos))


def test_the_caption_decoder_learns_to_write_each_caption_from_its_latent(parts):
    """Four captions, four latents: after training, beam search (what the pipeline runs) writes each one back."""
    import copy

    from tqdm.auto import tqdm

    from lora_db.synthetic.captioner import caption_tokens, train_caption_decoder

    decoder = copy.deepcopy(parts["text_decoder"])
    tokenizer = parts["text_tokenizer"]
    captions = ["a photo of a red star", "a photo of a blue ring on snow", "a green toy", "a photo of a bar at night"]
    latents = torch.randn(
        4, decoder.prefix_length, decoder.prefix_hidden_dim, generator=torch.Generator().manual_seed(0)
    )
    tokens = caption_tokens(tokenizer, captions, 40)

    def write(decoder) -> list[str]:
        texts = []
        for latent in latents:
            ids, lengths = decoder.generate_captions(latent[None], tokenizer.eos_token_id, device="cpu")
            texts.append(tokenizer.decode(ids[0][: int(lengths[0])], skip_special_tokens=True))
        return texts

    assert write(decoder) != captions
    losses = train_caption_decoder(
        decoder, latents, tokens, tokenizer.eos_token_id, steps=300, batch=8, lr=3e-3, latent_noise=0.05,
        generator=torch.Generator().manual_seed(1), progress=lambda n: tqdm(range(n), disable=True),
        lr_at=lambda step: 3e-3,
    )  # fmt: skip
    assert losses[-1] < 0.1 * losses[0]
    assert write(decoder) == captions


def test_the_image_to_text_loss_noises_the_text_keeps_the_image_clean_and_drops_it_for_guidance(parts):
    from diffusers import DDPMScheduler

    from lora_db.synthetic.captioner import caption_loss

    unet = parts["unet"]
    calls = []

    def recording(latents, clip_embeds, text, timestep_img, timestep_text, data_type):
        calls.append((latents, clip_embeds, text, timestep_img, timestep_text))
        return unet(latents, clip_embeds, text, timestep_img=timestep_img, timestep_text=timestep_text,
                    data_type=data_type)  # fmt: skip

    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    batch = 64
    latents = torch.randn(batch, 4, 16, 16)
    clip = torch.randn(batch, 1, unet.config.clip_img_dim)
    text = torch.randn(batch, 20, unet.config.text_dim)
    loss = caption_loss(recording, latents, clip, text, scheduler, torch.Generator().manual_seed(0), uncond_prob=0.25)
    assert loss.shape == (batch,) and torch.isfinite(loss).all()
    seen, seen_clip, noisy_text, timestep_img, timestep_text = calls[0]
    kept = timestep_img == 0
    dropped = timestep_img == scheduler.config.num_train_timesteps
    assert (kept | dropped).all() and 0 < dropped.sum() < batch
    assert torch.equal(seen[kept], latents[kept]) and torch.equal(seen_clip[kept], clip[kept])
    assert not torch.equal(seen[dropped], latents[dropped])  # the unconditional branch sees noise, not the image
    assert (timestep_text > 0).any() and not torch.equal(noisy_text, text)
    loss.mean().backward()
    assert unet.text_out.weight.grad is not None and unet.text_out.weight.grad.abs().sum() > 0
