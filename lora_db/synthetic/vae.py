"""tiny-world's VAE: a small AutoencoderKL trained to draw what a user may bring, not only the world.

The first tiny-world VAE saw only its world and decoded a star or a checkered cube as a blob (round-trip RMS
0.42-0.55). This one trains mostly on procedural.py's broad distribution (any colour; polygons, stars, discs,
rings, crosses, glyphs; stripes, checks, dots, gradients, noise; several objects; plain, split and textured
backgrounds) with a quarter of each batch from the captioned world, and is measured on the DreamBooth subject
set (subjects.py), whose shapes and patterns neither distribution draws.

Two things make minutes on a CPU go far:
- a curriculum: the first `small_steps` run on 32 px crops-by-downscaling (4x cheaper per picture; the network is
  fully convolutional, so what it learns about colours and edges carries over), the rest on 64 px;
- a near-deterministic posterior from the start (the log-variance bias of `quant_conv` starts at -8, std 0.02):
  a random VAE samples latents that are mostly noise, and the decoder spends its first thousand steps learning to
  ignore them. A small KL term keeps the latents bounded, as in Stable Diffusion's VAE (without its adversarial
  and perceptual terms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_db.synthetic import procedural
from lora_db.synthetic.subjects import subject_tensor


@dataclass
class VaeSchedule:
    seed: int = 0
    steps: int = 2600
    small_steps: int = 1000  # the first steps at 32 px
    batch: int = 16
    lr: float = 5e-4
    kl_weight: float = 1e-6
    world_fraction: float = 0.25  # of each batch, pictures of the captioned world
    pool: int = 12000  # procedural pictures drawn once and sampled from (uint8, 147 MB at 64 px)
    initial_logvar: float = -8.0


def narrow_initial_posterior(vae, logvar: float) -> None:
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:] = logvar


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up to `peak`, then a cosine to zero: the schedule of every part of the tiny-world build."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, loss: torch.Tensor, losses: list[float], bar, clip=None) -> None:
    """One step of a build stage: backward, optional gradient clipping to norm 1, step; the running loss on the
    progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{statistics_mean(losses[-20:]):.4f}")


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def train_vae(
    vae,
    world: torch.Tensor,
    schedule: VaeSchedule,
    progress: Callable = iter,
    on_loss: Callable[[float], None] | None = None,
) -> list[float]:
    """Train `vae` in place on procedural pictures and `world` ((N, 3, 64, 64) uint8); the losses per step.

    Reconstruction is L1 + MSE of the decoded posterior sample, plus `kl_weight` times the KL to N(0, 1).
    """
    generator = torch.Generator().manual_seed(schedule.seed + 1)
    pool = procedural.pool_uint8(schedule.seed + 7, schedule.pool)
    narrow_initial_posterior(vae, schedule.initial_logvar)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=schedule.lr, weight_decay=0.0)
    from_world = round(schedule.batch * schedule.world_fraction)
    losses = []
    vae.train()
    for step in progress(range(schedule.steps)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, schedule.steps, schedule.lr)
        picks = torch.randint(0, len(pool), (schedule.batch - from_world,), generator=generator)
        world_picks = torch.randint(0, len(world), (from_world,), generator=generator)
        batch = procedural.uint8_to_unit(torch.cat([pool[picks], world[world_picks]]))
        if step < schedule.small_steps:
            batch = F.avg_pool2d(batch, 2)
        dist = vae.encode(batch).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = (recon - batch).abs().mean() + (recon - batch).pow(2).mean() + schedule.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_loss is not None:
            on_loss(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def round_trip_rms(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Per-picture RMS error of decode(mean of encode(x)) on the [-1, 1] scale."""
    errors = []
    for batch in pixels.split(32):
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        errors.append((recon - batch).pow(2).mean(dim=(1, 2, 3)).sqrt())
    return torch.cat(errors)


def held_out_report(vae) -> dict:
    """Round-trip RMS on the DreamBooth subject set (never trained on): mean, max and per subject."""
    pixels, owners = subject_tensor()
    rms = round_trip_rms(vae, pixels)
    per_subject: dict[str, list[float]] = {}
    for owner, value in zip(owners, rms.tolist(), strict=True):
        per_subject.setdefault(owner, []).append(value)
    return {
        "mean": round(rms.mean().item(), 4),
        "max": round(rms.max().item(), 4),
        "per_subject": {name: round(sum(v) / len(v), 4) for name, v in per_subject.items()},
    }
