"""tiny-world: a small UniDiffuser pretrained here, offline, on a synthetic captioned world.

`--model tiny` has random weights: fine for testing the machinery, useless for judging whether an adapter learns
a subject. tiny-world is a UniDiffuser whose parts have all been trained, on 64 px pictures of toys of ten
shapes in sixteen colours, plain or patterned, in five settings or on a plain colour, captioned compositionally
("a photo of a magenta star with white dots on yellow"; lora_db.synthetic.world):

1. the world is drawn with PIL (`make_world`), deterministic from its seed;
2. a small AutoencoderKL (16 x 16 x 4 latents) learns to reconstruct a broad procedural distribution and the
   world (lora_db.synthetic.vae), so it can draw subjects neither shows; its `scaling_factor` is 1 / std of its
   latents on the world; the build prints its round-trip error on the DreamBooth subject set, which it never saw;
3. a small CLIP (text and vision towers with projections) learns to match pictures and captions
   contrastively, with linear heads that also name the object's shape and colour from both embeddings
   (lora_db.synthetic.contrastive); its towers become the pipeline's text and image encoders, and the whole CLIP
   model is also saved as `clip/` so `lora-db eval --clip-model` can score prompt fidelity (CLIP-T);
4. the U-ViT (with the caption decoder's `encode` projection) learns UniDiffuser's text-to-image objective
   through lora-db's own `dreambooth_loss`, with 10% unconditional examples so guidance works, and beside each
   batch its image-to-text objective (lora_db.synthetic.captioner); then the caption decoder learns to write the
   world's captions from their text latents, which `lora-db caption` reads;
5. a judge for `lora-db eval` (lora_db.synthetic.judge): an image encoder trained without text, self-supervised on
   procedural pictures, that no part of the model ever sees, saved as `judge/`. The judge, then CLIP, train in
   a second process beside the world's drawing and the VAE (lora_db.synthetic.second_core), one thread each.

DreamBooth subjects come from lora_db.synthetic.subjects (hearts, crescents, arrows, ... and the demo robot):
shapes the world never shows, all "a photo of sks toy".

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

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
from lora_db.synthetic import procedural
from lora_db.synthetic.captioner import caption_loss, train_captions
from lora_db.synthetic.contrastive import train_clip
from lora_db.synthetic.judge import JUDGE_FOLDER, JudgeConfig, build_judge
from lora_db.synthetic.second_core import SecondCore
from lora_db.synthetic.vae import (
    VaeSchedule,
    cosine_lr,
    held_out_report,
    optimizer_step,
    set_lr,
    statistics_mean,
    train_vae,
)
from lora_db.synthetic.world import (
    CLASS_WORD,
    IMAGE_SIZE,
    full_caption,
    make_scenes,
    scene_labels,
    vocabulary,
)

logger = logging.getLogger("lora_db")

# DreamBooth on tiny-world: any subject is a "toy", the world's word for every object it shows.
SUBJECT_CLASS = CLASS_WORD
SUBJECT_PROMPT = f"a photo of sks {CLASS_WORD}"
CLASS_PROMPT = f"a photo of a {CLASS_WORD}"
# tokens: each word of the world is one, so the longest caption ("a photo of an orange hexagon with white stripes
# in a room") takes 15 with start and end; 20 leaves room for an identifier of several byte tokens.
TEXT_LENGTH = 20


# -- the world ------------------------------------------------------------------------------------------------------


# -- the models -----------------------------------------------------------------------------------------------------


@dataclass
class BuildConfig:
    """Sizes and schedules of the build; the defaults are what the shipped weights were built with."""

    seed: int = 0
    # One thread: results depend on the thread count (summation order), and on a busy 2-core machine a second
    # thread made these small kernels up to 40x slower (threads spin waiting for each other).
    threads: int = 1
    world_size: int = 32768  # CLIP's shape and colour heads generalise from 32,768 pictures (probe 90 %; 8,192: 65 %)
    # Three blocks: 64 px pictures become 16 x 16 x 4 latents (12x fewer numbers; SD's VAE keeps 48x fewer, which
    # a VAE trained for minutes on a CPU reconstructs too poorly to draw a subject's shape).
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 2600
    vae_small_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_pool: int = 12000  # procedural pictures drawn once for the VAE
    clip_width: int = 64
    clip_layers: int = 3
    clip_patch: int = 8
    clip_dim: int = 32  # projection size: the U-ViT's CLIP image embedding
    clip_steps: int = 4800
    clip_batch: int = 128
    clip_lr: float = 2e-3
    # Shape and colour heads beside the contrastive loss (train_clip): contrastive training alone leaves CLIP
    # shape-blind (a linear probe on its image embeddings finds the shape 12 % of the time, chance 10 %), and then
    # no caption can name a shape. 0 turns them off.
    clip_aux_weight: float = 1.0
    text_dim: int = 16
    uvit_heads: int = 4
    uvit_head_dim: int = 32
    uvit_layers: int = 9
    uvit_patch: int = 2  # latent pixels per token side: 16 x 16 latents make 8 x 8 tokens
    # with image-to-text examples in each batch, 3000 steps drew 3 of 14 prompted places (4500 steps: 13 of 14)
    uvit_steps: int = 4500
    uvit_batch: int = 32
    uvit_lr: float = 1e-3
    uvit_threads: int = 2  # the U-ViT runs alone: both cores
    uvit_broad_fraction: float = 0.25
    uvit_broad_pool: int = 4096
    judge_steps: int = JudgeConfig.steps
    judge_pool: int = JudgeConfig.pool
    # Image-to-text (lora_db.synthetic.captioner): examples beside each U-ViT batch, then the caption decoder's steps
    # (0 and 0 build a model without `lora-db caption`).
    uvit_caption_batch: int = 8
    caption_steps: int = 3000
    caption_batch: int = 64
    caption_lr: float = 2e-3
    # The decoder reads latents the U-ViT sampled, which miss the clean ones by about their own spread: trained with
    # noise of 1.2 latent stds it names colour and shape in 31-34 of 50 held-out pictures, with 0.1 in 14-28.
    caption_latent_noise: float = 1.2
    uncond_prob: float = 0.1
    timings_s: dict[str, float] = field(default_factory=dict)


def world_words() -> list[str]:
    return vocabulary()


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
                "patch_size": config.clip_patch,
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
        patch_size=config.uvit_patch,
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


def _steps(name: str, total: int):
    return _bar(name, range(total))


def _bar(name: str, steps, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(steps, desc=name, unit="step", position=position)


def train_clip_apart(world, config: BuildConfig):
    """CLIP's training in the build's second process (`SecondCore`): `world` is the pictures (N x H x W x 3 uint8,
    as rendered) and their scenes. It starts from `build_components`' seeded CLIP, as the build's own. Returns the
    weights as numpy arrays, the losses and the seconds it took."""
    from PIL import Image

    pictures, scenes = world
    started = time.perf_counter()
    parts, clip = build_components(config)
    images = [Image.fromarray(picture) for picture in pictures]
    pixels = parts["clip_image_processor"](images=images, return_tensors="pt")["pixel_values"]
    captions = [scene.caption for scene in scenes]
    tokens = clip_tokens(parts["clip_tokenizer"], captions)
    bar = _bar("clip", range(config.clip_steps), position=1)
    losses = train_clip(clip, pixels, tokens, captions, config, lambda _: bar, scene_labels(scenes))
    state = {name: tensor.detach().numpy().copy() for name, tensor in clip.state_dict().items()}
    return state, losses, time.perf_counter() - started


def _positions(unique: list[str], texts: list[str]) -> list[int]:
    """Where each text sits in `unique`."""
    position = {text: i for i, text in enumerate(unique)}
    return [position[text] for text in texts]


def clip_tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


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


def train_uvit(parts, world, broad, config: BuildConfig) -> list[float]:
    """UniDiffuser's t2i objective (lora_db's dreambooth_loss) on the whole U-ViT and the prompt projection.

    `world` is (latent means, latent stds, CLIP image embeddings, caption hidden states, caption index per picture);
    `broad` is (latent means, CLIP image embeddings) of procedural pictures, trained unconditionally (text dropped)
    in a `uvit_broad_fraction` of each batch: a prior over any shape and colour for a LoRA to bend, beside the
    world's words. Min-SNR weighting (gamma 5, Hang et al. 2023) speeds up convergence several times.
    """
    from diffusers import DDPMScheduler

    unet, text_decoder = parts["unet"], parts["text_decoder"]
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    generator = torch.Generator().manual_seed(config.seed + 3)
    trained = [*unet.parameters(), *text_decoder.encode_prefix.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=config.uvit_lr, weight_decay=0.01)
    mean, std, clip_embeds, hidden, prompt_index, full_hidden, full_index = world
    broad_mean, broad_clip = broad
    scale = parts["vae"].config.scaling_factor
    n_broad = round(config.uvit_batch * config.uvit_broad_fraction)
    n_world = config.uvit_batch - n_broad
    n_caption = config.uvit_caption_batch
    losses = []
    unet.train()
    for step in (bar := _steps("u-vit", config.uvit_steps)):
        set_lr(optimizer, cosine_lr(step, config.uvit_steps, config.uvit_lr, warmup=100))
        index = torch.randint(0, len(mean), (n_world,), generator=generator)
        noise = torch.randn(mean[index].shape, generator=generator)
        batch_latents = (mean[index] + std[index] * noise) * scale
        prompt_embeds = text_decoder.encode(hidden[prompt_index[index]])
        per_example = [
            dreambooth_loss(
                unet, batch_latents, clip_embeds[index], prompt_embeds, noise_scheduler, generator,
                config.uncond_prob, snr_gamma=5.0,
            )
        ]  # fmt: skip
        if n_broad:
            picks = torch.randint(0, len(broad_mean), (n_broad,), generator=generator)
            per_example.append(
                dreambooth_loss(
                    unet, broad_mean[picks] * scale, broad_clip[picks], prompt_embeds[:n_broad], noise_scheduler,
                    generator, uncond_prob=1.0, snr_gamma=5.0,
                )
            )  # fmt: skip
        if n_caption:  # image-to-text: the same world pictures, clean, with their whole captions' latents noised
            picks = torch.randint(0, len(mean), (n_caption,), generator=generator)
            noise = torch.randn(mean[picks].shape, generator=generator)
            with torch.no_grad():
                text_latents = text_decoder.encode(full_hidden[full_index[picks]])
            per_example.append(
                caption_loss(
                    unet, (mean[picks] + std[picks] * noise) * scale, clip_embeds[picks], text_latents,
                    noise_scheduler, generator, uncond_prob=config.uncond_prob,
                )
            )  # fmt: skip
        loss = torch.cat(per_example).mean()
        optimizer_step(optimizer, loss, losses, bar, clip=trained)
    unet.eval()
    return losses


def build(out: str | Path, config: BuildConfig | None = None) -> dict:
    """Draw the world, train VAE, CLIP and U-ViT (and the judge beside them), save a diffusers folder to `out`."""
    from diffusers import UniDiffuserPipeline

    config = config or BuildConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out = Path(out)
    with atomic_directory(out, replace=True) as tmp:
        judge_config = JudgeConfig(seed=config.seed, steps=config.judge_steps, pool=config.judge_pool)
        # the judge, then CLIP, in a second process beside the VAE
        second = SecondCore(tmp / JUDGE_FOLDER, judge_config, config.threads, train_clip_apart, (config,))
        try:
            world = make_scenes(config.world_size, config.seed)
            images = [image for image, _ in world]
            second.send((np.stack([np.asarray(image) for image in images]), [scene for _, scene in world]))
            captions = [scene.caption for _, scene in world]
            full_captions = [full_caption(scene) for _, scene in world]
            pixels = torch.stack([to_tensor(image) for image in images])
            parts, clip = build_components(config)
            config.timings_s["world"] = time.perf_counter() - started

            mark = time.perf_counter()
            vae = parts["vae"]
            schedule = VaeSchedule(
                seed=config.seed,
                steps=config.vae_steps,
                small_steps=config.vae_small_steps,
                batch=config.vae_batch,
                lr=config.vae_lr,
                pool=config.vae_pool,
            )
            world_uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8)
            vae_losses = train_vae(vae, world_uint8, schedule, progress=lambda steps: _bar("vae", steps))
            vae.register_to_config(scaling_factor=derive_scaling_factor(vae, pixels[:512], seed=config.seed))
            vae_held_out = held_out_report(vae)
            logger.info(
                "VAE round trip on the DreamBooth subject set (never trained on): RMS %.3f mean, %.3f max "
                "on the [-1, 1] scale",
                vae_held_out["mean"],
                vae_held_out["max"],
            )
            with torch.no_grad():
                dists = [vae.encode(b).latent_dist for b in pixels.split(256)]
            latents = (torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]))
            config.timings_s["vae"] = time.perf_counter() - mark

            mark = time.perf_counter()
            judge_report, (clip_state, clip_losses, config.timings_s["clip"]) = second.join()
            clip.load_state_dict({name: torch.from_numpy(array) for name, array in clip_state.items()})
            config.timings_s["second_core_wait"] = time.perf_counter() - mark  # the second core is free from here
            clip_pixels = parts["clip_image_processor"](images=images, return_tensors="pt")["pixel_values"]
            text_encoder, image_encoder = pipeline_encoders(clip, clip_pixels)
            with torch.no_grad():
                clip_embeds = torch.cat([image_encoder(pixel_values=b).image_embeds for b in clip_pixels.split(256)])
                unique = sorted(set(captions))
                hidden = text_encoder(clip_tokens(parts["clip_tokenizer"], unique))[0]
                unique_full = sorted(set(full_captions))
                full_hidden = text_encoder(clip_tokens(parts["clip_tokenizer"], unique_full))[0]
            prompt_index = torch.tensor(_positions(unique, captions))
            full_index = torch.tensor(_positions(unique_full, full_captions))

            mark = time.perf_counter()
            torch.set_num_threads(config.uvit_threads)
            broad_pixels = procedural.uint8_to_unit(procedural.pool_uint8(config.seed + 11, config.uvit_broad_pool))
            with torch.no_grad():
                broad_mean = torch.cat([vae.encode(b).latent_dist.mean for b in broad_pixels.split(256)])
                broad_clip_pixels = parts["clip_image_processor"](
                    images=[procedural.to_image(p) for p in broad_pixels], return_tensors="pt"
                )["pixel_values"]
                broad_clip = torch.cat(
                    [image_encoder(pixel_values=b).image_embeds for b in broad_clip_pixels.split(256)]
                )
            world_data = (*latents, clip_embeds[:, None], hidden, prompt_index, full_hidden, full_index)
            uvit_losses = train_uvit(parts, world_data, (broad_mean, broad_clip[:, None]), config)
            config.timings_s["uvit"] = time.perf_counter() - mark
            mark = time.perf_counter()
            caption_losses = train_captions(
                parts["text_decoder"], parts["text_tokenizer"], full_hidden, unique_full, config,
                progress=lambda steps: _steps("captions", steps),
            )  # fmt: skip
            config.timings_s["captions"] = time.perf_counter() - mark
            config.timings_s["total"] = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
            second.stop()

        pipe = UniDiffuserPipeline(text_encoder=text_encoder, image_encoder=image_encoder, **parts)
        report = {
            "config": asdict(config),
            "scaling_factor": vae.config.scaling_factor,
            "vae_held_out_rms": vae_held_out,
            "final_losses": {
                "vae": statistics_mean(vae_losses[-50:]),
                "clip": statistics_mean(clip_losses[-50:]),
                "uvit": statistics_mean(uvit_losses[-50:]),
                **({"captions": statistics_mean(caption_losses[-50:])} if caption_losses else {}),
            },
            "torch": torch.__version__,
            "judge": judge_report,
        }
        pipe.save_pretrained(tmp, safe_serialization=True)
        clip.save_pretrained(tmp / "clip", safe_serialization=True)
        parts["clip_tokenizer"].save_pretrained(tmp / "clip")
        parts["clip_image_processor"].save_pretrained(tmp / "clip")
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
    "a photo of a red star in a room",
    "a photo of a blue disc with white stripes on the beach",
    "a photo of a yellow triangle on grass",
    "a photo of a purple ring at night",
    "a photo of a green square with pink dots on snow",
    "a photo of a magenta cross on yellow",
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
    names = ("vae_steps", "vae_small_steps", "vae_pool", "clip_steps", "uvit_steps", "uvit_broad_pool", "judge_steps",
             "judge_pool", "world_size", "threads", "uvit_threads", "seed", "uvit_caption_batch",
             "caption_steps")  # fmt: skip
    for name in names:
        build_parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(BuildConfig, name))
    build_parser.add_argument("--clip-aux-weight", type=float, default=BuildConfig.clip_aux_weight)
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
        print(json.dumps({k: report[k] for k in ("scaling_factor", "final_losses", "vae_held_out_rms")}, indent=1))
        print(f"built {args.out} in {report['config']['timings_s']['total']:.0f} s")
    elif args.command == "judge":
        report = add_judge(args.out)
        print(json.dumps({k: report[k] for k in ("train_s", "judge_held_out", "pixel_held_out")}, indent=1))
    else:
        print(f"wrote {preview(args.out, args.model)}")


if __name__ == "__main__":
    main()
