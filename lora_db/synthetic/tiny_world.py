"""tiny-world: a small UniDiffuser pretrained here, offline, on a synthetic captioned world.

`--model tiny` has random weights: fine for testing the machinery, useless for judging whether an adapter learns
a subject. tiny-world is a UniDiffuser whose parts have all been trained, on 32 px pictures of robots, cars,
houses and balls in six colours and four settings, captioned "a photo of a red robot on the beach":

1. the world is drawn with PIL (`make_world`), deterministic from its seed;
2. a small AutoencoderKL learns to reconstruct it; its `scaling_factor` is 1 / std of its latents on the world;
3. a small CLIP (text and vision towers with projections) learns to match pictures and captions
   contrastively; its towers become the pipeline's text and image encoders, and the whole CLIP model is also
   saved as `clip/` so `lora-db eval --clip-model` can score prompt fidelity (CLIP-T);
4. the U-ViT (with the caption decoder's `encode` projection) learns UniDiffuser's text-to-image objective
   through lora-db's own `dreambooth_loss`, with 10% unconditional examples so guidance works;
5. a judge for `lora-db eval` (lora_db.synthetic.judge): an image encoder trained without text, self-supervised on
   procedural pictures, that no part of the model ever sees, saved as `judge/`.

The DreamBooth subject is the toy robot of `lora_db.synthetic.demo.make_demo_images` (teal head, red body, yellow star):
the world's robots are one colour and starless, so the model never saw it.

    python -m lora_db.synthetic.tiny_world build lora_db/assets/tiny-world  # the shipped weights, bit for bit
    python -m lora_db.synthetic.tiny_world preview --out grid.png              # prompt per column, seed per row
    python -m lora_db.synthetic.tiny_world judge lora_db/assets/tiny-world    # (re)train only the judge

The result is a plain diffusers UniDiffuser folder; `--model tiny-world` names the copy shipped in the package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_db.images import image_grid, save_png, to_tensor
from lora_db.io import atomic_directory, atomic_write_json
from lora_db.logs import quiet_library_logs
from lora_db.models.loading import TINY_WORLD, load_pipeline
from lora_db.models.objective import dreambooth_loss
from lora_db.models.random import (
    _bytes_to_unicode,
    build_tokenizers,
    derive_scaling_factor,
    untie_caption_lm_head,
    uvit,
)
from lora_db.models.sampling import generate_images
from lora_db.synthetic.judge import JUDGE_FOLDER, build_judge
from lora_db.synthetic.world import CLASSES, COLOURS, IMAGE_SIZE, SETTINGS, make_world

logger = logging.getLogger("lora_db")

# The DreamBooth subject for evaluation and demos: make_demo_images' toy robot, which the world never shows.
SUBJECT_CLASS = "robot"
SUBJECT_PROMPT = "a photo of sks robot"
CLASS_PROMPT = "a photo of a robot"
TEXT_LENGTH = 16  # tokens: each word of the world is one, so the longest caption takes 11 with start and end


# -- the world ------------------------------------------------------------------------------------------------------


# -- the models -----------------------------------------------------------------------------------------------------


@dataclass
class BuildConfig:
    """Sizes and schedules of the build; the defaults are what the shipped weights were built with."""

    seed: int = 0
    # One thread: results depend on the thread count (summation order), and on a busy 2-core machine a second
    # thread made these small kernels up to 40x slower (threads spin waiting for each other).
    threads: int = 1
    world_size: int = 4096
    # Three blocks: 32 px pictures become 8 x 8 x 4 latents (12x fewer numbers; SD's VAE keeps 48x fewer, which
    # a VAE trained for minutes on a CPU reconstructed too poorly for CLIP-I to recognise the subject).
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    clip_width: int = 64
    clip_layers: int = 3
    clip_dim: int = 32  # projection size: the U-ViT's CLIP image embedding
    clip_steps: int = 400
    clip_batch: int = 128
    clip_lr: float = 2e-3
    text_dim: int = 16
    uvit_heads: int = 3
    uvit_head_dim: int = 32
    uvit_layers: int = 7
    uvit_steps: int = 1200
    uvit_batch: int = 64
    uvit_lr: float = 1.5e-3
    uncond_prob: float = 0.1
    timings_s: dict[str, float] = field(default_factory=dict)


def world_words() -> list[str]:
    words = {"a", "an", "photo", "of", *CLASSES, *COLOURS}
    for setting in SETTINGS:
        words.update(setting.split())
    return sorted(words)


def train_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word one token (the most frequent pair first, ties by text).

    The byte-level base vocabulary still encodes any other string ("sks" becomes three byte tokens).
    """

    byte_char = _bytes_to_unicode()
    pieces = [[byte_char[b] for b in word.encode()] for word in words]
    for piece in pieces:
        piece[-1] += "</w>"
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for piece in pieces:
            for pair in itertools.pairwise(piece):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for n, piece in enumerate(pieces):
            merged, i = [], 0
            while i < len(piece):
                if i + 1 < len(piece) and (piece[i], piece[i + 1]) == best:
                    merged.append(piece[i] + piece[i + 1])
                    i += 2
                else:
                    merged.append(piece[i])
                    i += 1
            pieces[n] = merged


def build_clip_tokenizer():
    """A CLIP tokenizer whose vocabulary holds the world's words whole, on top of the 256 bytes."""
    from transformers import CLIPTokenizer

    base, _ = build_tokenizers()
    vocab = dict(base.get_vocab())
    merges = train_merges(world_words())
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


def build_components(config: BuildConfig):
    """Untrained modules of a tiny-world pipeline (seeded), plus the CLIP model whose towers it shares."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UniDiffuserTextDecoder
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(config.seed)
    _, text_tokenizer = build_tokenizers()
    clip_tokenizer = build_clip_tokenizer()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    width = config.clip_width
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(clip_tokenizer),
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": config.clip_layers,
                "num_attention_heads": 4,
                "max_position_embeddings": TEXT_LENGTH,
                "hidden_act": "quick_gelu",
                "bos_token_id": 512,
                "eos_token_id": 513,
                "pad_token_id": 513,
            },
            vision_config={
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": config.clip_layers,
                "num_attention_heads": 4,
                "image_size": IMAGE_SIZE,
                "patch_size": 4,
                "hidden_act": "quick_gelu",
            },
            projection_dim=config.clip_dim,
        )
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    text_decoder = UniDiffuserTextDecoder(
        prefix_length=TEXT_LENGTH,
        prefix_inner_dim=width,
        prefix_hidden_dim=config.text_dim,
        vocab_size=len(text_tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=128,
        activation_function="gelu",
    )
    untie_caption_lm_head(text_decoder)
    unet = uvit(
        text_dim=config.text_dim,
        clip_img_dim=config.clip_dim,
        num_text_tokens=TEXT_LENGTH,
        heads=config.uvit_heads,
        head_dim=config.uvit_head_dim,
        layers=config.uvit_layers,
        sample_size=IMAGE_SIZE // 4,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=3
    )
    parts = {
        "vae": vae,
        "clip_tokenizer": clip_tokenizer,
        "text_tokenizer": text_tokenizer,
        "clip_image_processor": processor,
        "text_decoder": text_decoder,
        "unet": unet,
        "scheduler": scheduler,
    }
    return parts, clip


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _steps(name: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=name, unit="step")


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optimizer_step(optimizer, loss: torch.Tensor, losses: list[float], bar, clip=None) -> None:
    """Backward, optional gradient clipping to norm 1, step; the running loss on the progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{statistics_mean(losses[-20:]):.4f}")


def train_vae(vae, pixels: torch.Tensor, config: BuildConfig) -> list[float]:
    """Reconstruction (L1 + MSE) plus a small KL term, as SD's VAE (without its adversarial and LPIPS terms)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses = []
    vae.train()
    for step in (bar := _steps("vae", config.vae_steps)):
        _set_lr(optimizer, _cosine_lr(step, config.vae_steps, config.vae_lr))
        index = torch.randint(0, len(pixels), (config.vae_batch,), generator=generator)
        batch = pixels[index]
        dist = vae.encode(batch).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = (recon - batch).abs().mean() + (recon - batch).pow(2).mean() + config.vae_kl_weight * kl
        _optimizer_step(optimizer, loss, losses, bar)
    vae.eval()
    return losses


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def train_clip(clip, clip_pixels: torch.Tensor, tokens: torch.Tensor, captions: list[str], config) -> list[float]:
    """Contrastive image-caption training; pictures that share a caption are all positives of it."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=config.clip_lr, weight_decay=0.1)
    caption_ids = torch.tensor(_caption_ids(captions))
    losses = []
    clip.train()
    for step in (bar := _steps("clip", config.clip_steps)):
        _set_lr(optimizer, _cosine_lr(step, config.clip_steps, config.clip_lr))
        index = torch.randint(0, len(clip_pixels), (config.clip_batch,), generator=generator)
        image = F.normalize(
            clip.visual_projection(clip.vision_model(pixel_values=clip_pixels[index]).pooler_output), dim=-1
        )
        text = F.normalize(clip.text_projection(clip.text_model(input_ids=tokens[index]).pooler_output), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (caption_ids[index][:, None] == caption_ids[index][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        _optimizer_step(optimizer, loss, losses, bar)
    clip.eval()
    return losses


def _caption_ids(captions: list[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(c, len(ids)) for c in captions]


def pipeline_encoders(clip, clip_pixels: torch.Tensor):
    """The CLIP towers as the pipeline's text encoder and image encoder.

    The image projection is rescaled so that image embeddings have unit variance per element on the world:
    UniDiffuser noises them like the VAE latents. Cosine similarities are unchanged by the scale.
    """
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    image_encoder = CLIPVisionModelWithProjection(clip.config.vision_config)
    image_encoder.config.projection_dim = clip.config.projection_dim
    image_encoder.visual_projection = torch.nn.Linear(
        clip.config.vision_config.hidden_size, clip.config.projection_dim, bias=False
    )
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    image_encoder.load_state_dict(state)
    with torch.no_grad():
        embeds = torch.cat([image_encoder(pixel_values=b).image_embeds for b in clip_pixels.split(256)])
        image_encoder.visual_projection.weight.mul_(1.0 / embeds.std().item())
    return text_encoder.eval(), image_encoder.eval()


def train_uvit(parts, latents, clip_embeds, hidden, prompt_index, config: BuildConfig) -> list[float]:
    """UniDiffuser's t2i objective (lora_db's dreambooth_loss) on the whole U-ViT and the prompt projection."""
    from diffusers import DDPMScheduler

    unet, text_decoder = parts["unet"], parts["text_decoder"]
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    generator = torch.Generator().manual_seed(config.seed + 3)
    trained = [*unet.parameters(), *text_decoder.encode_prefix.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=config.uvit_lr, weight_decay=0.01)
    mean, std = latents
    scale = parts["vae"].config.scaling_factor
    losses = []
    unet.train()
    for step in (bar := _steps("u-vit", config.uvit_steps)):
        _set_lr(optimizer, _cosine_lr(step, config.uvit_steps, config.uvit_lr, warmup=100))
        index = torch.randint(0, len(mean), (config.uvit_batch,), generator=generator)
        noise = torch.randn(mean[index].shape, generator=generator)
        batch_latents = (mean[index] + std[index] * noise) * scale
        prompt_embeds = text_decoder.encode(hidden[prompt_index[index]])
        loss = dreambooth_loss(
            unet, batch_latents, clip_embeds[index], prompt_embeds, noise_scheduler, generator, config.uncond_prob
        ).mean()
        _optimizer_step(optimizer, loss, losses, bar, clip=trained)
    unet.eval()
    return losses


def build(out: str | Path, config: BuildConfig | None = None) -> dict:
    """Draw the world, train VAE, CLIP and U-ViT, and save a diffusers UniDiffuser folder to `out`."""
    from diffusers import UniDiffuserPipeline

    config = config or BuildConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        world = make_world(config.world_size, config.seed)
        images = [image for image, _ in world]
        captions = [caption for _, caption in world]
        pixels = torch.stack([to_tensor(image) for image in images])
        parts, clip = build_components(config)
        config.timings_s["world"] = time.perf_counter() - started

        mark = time.perf_counter()
        vae_losses = train_vae(parts["vae"], pixels, config)
        vae = parts["vae"]
        vae.register_to_config(scaling_factor=derive_scaling_factor(vae, pixels[:512], seed=config.seed))
        with torch.no_grad():
            dists = [vae.encode(b).latent_dist for b in pixels.split(256)]
        latents = (torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]))
        config.timings_s["vae"] = time.perf_counter() - mark

        mark = time.perf_counter()
        clip_pixels = parts["clip_image_processor"](images=images, return_tensors="pt")["pixel_values"]
        tokens = _tokens(parts["clip_tokenizer"], captions)
        clip_losses = train_clip(clip, clip_pixels, tokens, captions, config)
        text_encoder, image_encoder = pipeline_encoders(clip, clip_pixels)
        with torch.no_grad():
            clip_embeds = torch.cat([image_encoder(pixel_values=b).image_embeds for b in clip_pixels.split(256)])
            unique = sorted(set(captions))
            hidden = text_encoder(_tokens(parts["clip_tokenizer"], unique))[0]
        prompt_index = torch.tensor([unique.index(c) for c in captions])
        config.timings_s["clip"] = time.perf_counter() - mark

        mark = time.perf_counter()
        uvit_losses = train_uvit(parts, latents, clip_embeds[:, None], hidden, prompt_index, config)
        config.timings_s["uvit"] = time.perf_counter() - mark
        config.timings_s["total"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)

    pipe = UniDiffuserPipeline(text_encoder=text_encoder, image_encoder=image_encoder, **parts)
    report = {
        "config": asdict(config),
        "scaling_factor": vae.config.scaling_factor,
        "final_losses": {
            "vae": statistics_mean(vae_losses[-50:]),
            "clip": statistics_mean(clip_losses[-50:]),
            "uvit": statistics_mean(uvit_losses[-50:]),
        },
        "torch": torch.__version__,
    }
    with atomic_directory(out, replace=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        clip.save_pretrained(tmp / "clip", safe_serialization=True)
        parts["clip_tokenizer"].save_pretrained(tmp / "clip")
        parts["clip_image_processor"].save_pretrained(tmp / "clip")
        report["judge"] = _with_threads(config.threads, build_judge, tmp / JUDGE_FOLDER, log=logger.info)
        atomic_write_json(tmp / "build.json", report)
    return report


def add_judge(folder: str | Path) -> dict:
    """Train the judge alone into an existing tiny-world folder (replacing `judge/`), written atomically."""
    folder = Path(folder)
    with atomic_directory(folder / JUDGE_FOLDER, replace=True) as tmp:
        report = _with_threads(BuildConfig.threads, build_judge, tmp, log=logger.info)
    return report


def _with_threads(threads: int, fn, *args, **kwargs):
    """Results depend on the thread count (summation order): every trained part runs with the build's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


# -- using it -------------------------------------------------------------------------------------------------------


PREVIEW_PROMPTS = (
    "a photo of a red robot in a room",
    "a photo of a blue car on the beach",
    "a photo of a yellow house on grass",
    "a photo of a purple ball at night",
    "a photo of a green robot on the beach",
    "a photo of an orange car at night",
)


def preview(out: str | Path, model: str | Path | None = None, seeds: int = 4, steps: int = 20) -> Path:
    """A grid of samples: one prompt per column, one seed per row."""

    pipe = load_pipeline(str(model or TINY_WORLD))
    pipe.set_progress_bar_config(disable=True)
    columns = [generate_images(pipe, p, seeds, seed=0, num_inference_steps=steps) for p in PREVIEW_PROMPTS]
    rows = [[column[i] for column in columns] for i in range(seeds)]
    grid = image_grid(rows, [f"seed {i}" for i in range(seeds)], list(PREVIEW_PROMPTS), min_cell_size=128)
    return save_png(grid, out, {"model": str(model or TINY_WORLD), "steps": steps})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_db.synthetic.tiny_world", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="draw the world and pretrain every part into DIR")
    build_parser.add_argument("out", type=Path)
    for name in ("vae_steps", "clip_steps", "uvit_steps", "world_size", "threads", "seed"):
        build_parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(BuildConfig, name))
    judge_parser = commands.add_parser("judge", help="train only the judge into an existing tiny-world DIR")
    judge_parser.add_argument("out", type=Path)
    preview_parser = commands.add_parser("preview", help="grid of samples: prompt per column, seed per row")
    preview_parser.add_argument("--out", type=Path, required=True)
    preview_parser.add_argument("--model", default=TINY_WORLD)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    quiet_library_logs()
    if args.command == "build":
        values = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
        report = build(args.out, BuildConfig(**values))
        print(json.dumps({k: report[k] for k in ("scaling_factor", "final_losses")}, indent=1))
        print(f"built {args.out} in {report['config']['timings_s']['total']:.0f} s")
    elif args.command == "judge":
        report = add_judge(args.out)
        print(json.dumps({k: report[k] for k in ("train_s", "judge_held_out", "pixel_held_out")}, indent=1))
    else:
        print(f"wrote {preview(args.out, args.model)}")


if __name__ == "__main__":
    main()
