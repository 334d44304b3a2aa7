"""UniDiffuser pipelines built offline from constructor values, with random but deterministic weights.

`build_random_pipeline("tiny")` is what tests, CI and the demo train on: every component is real diffusers /
transformers code, only small. `"unidiffuser-v1"` is the real-size architecture (public constructor values of
thu-ml/unidiffuser-v1) for memory and speed benchmarks without downloading anything. Same preset, same seed:
the same weights on every build, on any machine.

    from lora_db.models.random import build_random_pipeline
    pipe = build_random_pipeline("tiny")
    image = pipe(prompt="a photo of sks dog", num_inference_steps=2).images[0]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

PRESETS = ("tiny", "small", "unidiffuser-v1")


@dataclass(frozen=True)
class _Sizes:
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_image_size: int
    vision_patch: int
    clip_img_dim: int
    decoder_hidden: int
    decoder_layers: int
    decoder_heads: int
    text_dim: int
    uvit_heads: int
    uvit_head_dim: int
    uvit_layers: int
    sample_size: int
    # GPT-2's 50257 tokens + UniDiffuser's EOS in the real caption decoder; 0 means the byte tokenizer's 257.
    decoder_vocab: int = 0
    # 1 / std of the VAE's sampled latents of the demo photos (`derive_scaling_factor`), so that the noise
    # schedule sees unit-variance data as on the real model; unidiffuser-v1 keeps SD's own 0.18215.
    scaling_factor: float = 0.18215


_SIZES = {
    # 64 px images, 8x8 latents: a training step takes milliseconds on a laptop CPU.
    "tiny": _Sizes(
        vae_channels=(8, 16, 16, 16),
        vae_layers_per_block=1,
        vae_groups=8,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_vocab=514,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=4,
        vision_image_size=32,
        vision_patch=8,
        clip_img_dim=16,
        decoder_hidden=32,
        decoder_layers=2,
        decoder_heads=4,
        text_dim=8,
        uvit_heads=2,
        uvit_head_dim=16,
        uvit_layers=5,
        sample_size=8,
        scaling_factor=3.0702,
    ),
    # 256 px, 32x32 latents, a U-ViT of about 31M parameters: seconds per step on a 2-core CPU.
    "small": _Sizes(
        vae_channels=(32, 64, 64, 64),
        vae_layers_per_block=1,
        vae_groups=32,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_vocab=514,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        vision_image_size=224,
        vision_patch=32,
        clip_img_dim=128,
        decoder_hidden=128,
        decoder_layers=2,
        decoder_heads=4,
        text_dim=32,
        uvit_heads=8,
        uvit_head_dim=64,
        uvit_layers=9,
        sample_size=32,
        scaling_factor=3.4046,
    ),
    # thu-ml/unidiffuser-v1: SD VAE, CLIP ViT-L/14 text, CLIP ViT-B/32 vision, GPT-2 decoder, 952M-parameter U-ViT.
    "unidiffuser-v1": _Sizes(
        vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_groups=32,
        text_hidden=768,
        text_layers=12,
        text_heads=12,
        text_vocab=49408,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        vision_image_size=224,
        vision_patch=32,
        clip_img_dim=512,
        decoder_hidden=768,
        decoder_layers=12,
        decoder_heads=12,
        text_dim=64,
        uvit_heads=24,
        uvit_head_dim=64,
        uvit_layers=30,
        sample_size=64,
        decoder_vocab=50258,
    ),
}


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE tokenizers (GPT-2, CLIP) use for raw bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tokenizers():
    """Byte-level CLIP and GPT-2 tokenizers: every string encodes, with no vocabulary download."""
    from transformers import CLIPTokenizer, GPT2Tokenizer

    chars = _bytes_to_unicode()
    clip_vocab = {c: i for i, c in enumerate(chars)}
    clip_vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    clip_vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    gpt_vocab = {c: i for i, c in enumerate(chars)} | {"<|endoftext|>": 256}
    # model_max_length must be 77 or the pipeline's prompt tensors overflow the position embeddings.
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    text_tokenizer = GPT2Tokenizer(vocab=gpt_vocab, merges=[])
    return clip_tokenizer, text_tokenizer


def _seeded(seed: int, device: str | None, build):
    with torch.random.fork_rng(devices=[]), torch.device(device) if device else contextlib.nullcontext():
        torch.manual_seed(seed)
        return build()


# A trained VAE's posterior is narrow (its std is small next to the spread of its means); a random one's is about
# 1 everywhere, so every sampled latent would be mostly posterior noise. Std 0.1 makes the random VAE behave
# like a trained one here: sampled latents and their means agree, and one scaling factor fits both.
POSTERIOR_STD = 0.1


def _narrow_posterior(vae) -> None:
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] = 2 * math.log(POSTERIOR_STD)


@torch.no_grad()
def derive_scaling_factor(vae, pixels: torch.Tensor, seed: int = 0) -> float:
    """1 / std of the VAE's sampled latents of `pixels` ((N, 3, H, W) in [-1, 1]): how SD's 0.18215 was derived."""
    latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(seed))
    return 1.0 / latents.float().std().item()


def uvit(
    *,
    text_dim: int,
    clip_img_dim: int,
    num_text_tokens: int,
    heads: int,
    head_dim: int,
    layers: int,
    sample_size: int,
    patch_size: int = 2,
):
    """A U-ViT with thu-ml/unidiffuser-v1's block layout (its public constructor values), sized by the arguments."""
    from diffusers import UniDiffuserModel

    return UniDiffuserModel(
        text_dim=text_dim,
        clip_img_dim=clip_img_dim,
        num_text_tokens=num_text_tokens,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        dropout=0.0,
        norm_num_groups=32,
        attention_bias=False,
        sample_size=sample_size,
        patch_size=patch_size,
        activation_fn="gelu",
        num_embeds_ada_norm=1000,
        norm_type="layer_norm",
        block_type="unidiffuser",
        pre_layer_norm=False,
        use_timestep_embedding=False,
        norm_elementwise_affine=True,
        use_patch_pos_embed=False,
        ff_final_dropout=True,
        use_data_type_embedding=True,
    )


def untie_caption_lm_head(text_decoder) -> None:
    """GPT-2 ties lm_head to wte; safetensors refuses shared storage on save, so keep them as separate copies."""
    lm_head = text_decoder.transformer.lm_head
    lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone())
    text_decoder.transformer.config.tie_word_embeddings = False
    text_decoder.transformer.config.bos_token_id = text_decoder.transformer.config.eos_token_id = 256


def build_random_pipeline(preset: str = "tiny", seed: int = 0, device: str | None = None):
    """A complete `UniDiffuserPipeline` of the given size with seeded random weights (fp32, on the CPU).

    `device="meta"` builds every module without allocating or initialising weights: the real-size architecture
    in a second, for `lora_db.training.estimate`, which only needs shapes and dtypes.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UniDiffuserPipeline,
        UniDiffuserTextDecoder,
    )
    from transformers import (
        CLIPImageProcessorPil,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    if preset not in _SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    s = _SIZES[preset]
    clip_tokenizer, text_tokenizer = build_tokenizers()
    vae = _seeded(
        seed,
        device,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels),
            block_out_channels=s.vae_channels,
            layers_per_block=s.vae_layers_per_block,
            norm_num_groups=s.vae_groups,
            sample_size=s.sample_size * 8,
            scaling_factor=s.scaling_factor,
        ),
    )
    if preset != "unidiffuser-v1" and device != "meta":
        _narrow_posterior(vae)
    text_encoder = _seeded(
        seed + 1,
        device,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=s.text_vocab,
                hidden_size=s.text_hidden,
                intermediate_size=4 * s.text_hidden,
                num_hidden_layers=s.text_layers,
                num_attention_heads=s.text_heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )
        ),
    )
    image_encoder = _seeded(
        seed + 2,
        device,
        lambda: CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=s.vision_hidden,
                intermediate_size=4 * s.vision_hidden,
                num_hidden_layers=s.vision_layers,
                num_attention_heads=s.vision_heads,
                image_size=s.vision_image_size,
                patch_size=s.vision_patch,
                projection_dim=s.clip_img_dim,
                hidden_act="quick_gelu",
            )
        ),
    )
    clip_image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": s.vision_image_size},
        crop_size={"height": s.vision_image_size, "width": s.vision_image_size},
    )
    text_decoder = _seeded(
        seed + 3,
        device,
        lambda: UniDiffuserTextDecoder(
            prefix_length=77,
            prefix_inner_dim=s.text_hidden,
            prefix_hidden_dim=s.text_dim,
            vocab_size=s.decoder_vocab or len(text_tokenizer),
            n_positions=256 if preset == "tiny" else 1024,
            n_embd=s.decoder_hidden,
            n_layer=s.decoder_layers,
            n_head=s.decoder_heads,
            n_inner=4 * s.decoder_hidden,
            activation_function="gelu",
        ),
    )
    untie_caption_lm_head(text_decoder)
    unet = _seeded(
        seed + 4,
        device,
        lambda: uvit(
            text_dim=s.text_dim,
            clip_img_dim=s.clip_img_dim,
            num_text_tokens=77,
            heads=s.uvit_heads,
            head_dim=s.uvit_head_dim,
            layers=s.uvit_layers,
            sample_size=s.sample_size,
        ),
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        solver_order=3,
    )
    pipe = UniDiffuserPipeline(
        vae=vae,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        clip_image_processor=clip_image_processor,
        clip_tokenizer=clip_tokenizer,
        text_decoder=text_decoder,
        text_tokenizer=text_tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    for module in (vae, text_encoder, image_encoder, text_decoder, unet):
        module.eval()
    return pipe


def unet_config(preset: str) -> dict:
    """The U-ViT config of a preset, without building anything (for option checks)."""
    s = _SIZES[preset]
    return {
        "sample_size": s.sample_size,
        "patch_size": 2,
        "text_dim": s.text_dim,
        "clip_img_dim": s.clip_img_dim,
        "num_layers": s.uvit_layers,
        "num_attention_heads": s.uvit_heads,
        "attention_head_dim": s.uvit_head_dim,
    }
