"""tiny-world's judge: a small image encoder that no part of the diffusion model ever sees.

`lora-db eval` scored subject fidelity with the pipeline's own CLIP image encoder, whose embedding of each photo
is part of what the U-ViT learns to denoise: circular, and it only knew type, colour and setting (issue 17).
This encoder is trained here, without text and with another objective: SimCLR's NT-Xent, where two augmented
views of one procedural.py picture must agree and differ from every other picture in the batch. It plays the
part of DINO (ViT-S/16) in the DreamBooth paper's metric: cosine similarity of embeddings, generated vs real.

Views of one picture differ the way photos of one subject differ: the same objects on another background
(procedural.picture_pair), a random resized crop (position and scale), a small rotation, a horizontal flip and a
little brightness/contrast/saturation jitter. Hue is never jittered: colour is part of a subject's identity.

A model-free score sits beside it (`pixel_similarity`): cosine of 16 x 16 box-blurred pictures, to check that
the judge adds something over "same colours in the same places".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lora_db.synthetic import procedural
from lora_db.synthetic.subjects import SUBJECTS, subject_tensor


@dataclass
class JudgeConfig:
    seed: int = 0
    width: int = 32  # channels of the first stage; doubled at each of the next stages
    embed_dim: int = 128
    steps: int = 600
    batch: int = 64  # pictures per step, two views each
    pool: int = 4096  # pictures drawn once (each with its second background) and re-augmented every step
    lr: float = 2e-3
    temperature: float = 0.2
    eval_every: int = 100


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(),
    )  # fmt: skip


class Judge(nn.Module):
    """Conv net: 64 px -> 32 -> 16 -> 8 -> 4, global average pool, linear to `embed_dim`; L2-normalised.

    GroupNorm rather than BatchNorm: a score must not depend on what else is in the batch. `head` is SimCLR's
    projection MLP, used only by the loss; judging uses `forward`, the representation before it (SimCLR found the
    pre-head representation the better one for downstream use).
    """

    def __init__(self, width: int = 32, embed_dim: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2)
        )
        self.embed = nn.Linear(4 * w, embed_dim)
        self.head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, 64))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) in [-1, 1] -> (N, embed_dim), unit length."""
        return F.normalize(self.embed(self.features(pixels).mean(dim=(2, 3))), dim=-1)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 35-100 %, aspect 3/4-4/3), rotation +-15 degrees, flip, mild colour jitter.

    One affine grid per picture through `grid_sample`; borders are filled by reflection so that a crop never
    introduces a black frame that would be an easy cue.
    """
    n = len(pixels)

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    area, aspect = uniform(0.35, 1.0), torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    sx, sy = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    tx, ty = uniform(-1, 1) * (1 - sx), uniform(-1, 1) * (1 - sy)
    angle = uniform(-15, 15) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([sx * cos * flip, -sy * sin, tx], 1), torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour jitter in [0, 1]: brightness and contrast +-20 %, saturation +-25 %; hue untouched
    x = (out + 1) / 2
    x = x * uniform(0.8, 1.2)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2)[:, None, None, None] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * uniform(0.75, 1.25)[:, None, None, None] + grey
    return x.clamp(0, 1) * 2 - 1


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner out of the 2N - 1 other views."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


def pair_pool(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` pictures and the same objects on other backgrounds, as two uint8 (N, 3, 64, 64) tensors."""
    firsts, seconds = [], []
    for index in range(count):
        first, second = procedural.picture_pair(seed, index)
        firsts.append(procedural.to_tensor(first))
        seconds.append(procedural.to_tensor(second))
    return _to_uint8(firsts), _to_uint8(seconds)


def _to_uint8(pixels: list[torch.Tensor]) -> torch.Tensor:
    return ((torch.stack(pixels) + 1) * 127.5).round().to(torch.uint8)


def train_judge(config: JudgeConfig, log=print, evaluate=None) -> Judge:
    """SimCLR on procedural pairs: view 1 from the picture, view 2 from the picture or its other background."""
    torch.manual_seed(config.seed)
    judge = Judge(config.width, config.embed_dim)
    firsts, seconds = pair_pool(config.seed + 2000, config.pool)
    generator = torch.Generator().manual_seed(config.seed + 3)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=0.05)
    spent = 0.0
    for step in range(config.steps):
        started = time.perf_counter()
        warm = min(1.0, (step + 1) / 50)
        lr = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, config.pool, (config.batch,), generator=generator)
        other = torch.rand(config.batch, generator=generator) < 0.5  # half the pairs change background
        view_a = procedural.uint8_to_unit(firsts[index])
        view_b = procedural.uint8_to_unit(torch.where(other[:, None, None, None], seconds[index], firsts[index]))
        a = judge.head(judge.embed(judge.features(augment(view_a, generator)).mean(dim=(2, 3))))
        b = judge.head(judge.embed(judge.features(augment(view_b, generator)).mean(dim=(2, 3))))
        loss = nt_xent(a, b, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        spent += time.perf_counter() - started
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            point = {"step": step + 1, "train_s": round(spent, 1), "loss": round(loss.item(), 4)}
            if evaluate is not None:
                judge.eval()
                point.update(evaluate(judge))
                judge.train()
            log(json.dumps(point))
    return judge.eval()


# -- scores and their validation on the subject set -----------------------------------------------------------------


def pixel_similarity(a: torch.Tensor, b: torch.Tensor, size: int = 16, centred: bool = False) -> torch.Tensor:
    """Model-free: cosine between pictures box-blurred down to size x size, on the [-1, 1] scale. (N, M).

    `centred` subtracts each picture's mean first (a Pearson correlation), so a shared overall tone counts less.
    """

    def flat(x):
        x = F.adaptive_avg_pool2d(x, size).flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True) if centred else x, dim=-1)

    return flat(a) @ flat(b).T


@torch.no_grad()
def judge_similarity(judge: Judge, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return judge(a) @ judge(b).T


def separation(similarity: torch.Tensor, owners: list[str]) -> dict:
    """How well a similarity matrix over subject photos separates subjects.

    same: mean over subjects of the mean similarity between two different photos of the subject;
    other: mean similarity between photos of different subjects; margin = same - other;
    separated: fraction of subjects whose nearest other subject (highest mean cross-similarity) stays below the
    subject's own same-subject mean; top1: leave-one-out nearest-photo retrieval accuracy.
    """
    names = sorted(set(owners), key=owners.index)
    groups = {name: torch.tensor([i for i, o in enumerate(owners) if o == name]) for name in names}
    eye = torch.eye(len(owners), dtype=torch.bool)
    same_means, closest, separated = {}, {}, 0
    for name, idx in groups.items():
        block = similarity[idx][:, idx]
        same_means[name] = block[~torch.eye(len(idx), dtype=torch.bool)].mean().item()
        cross = {other: similarity[idx][:, j].mean().item() for other, j in groups.items() if other != name}
        closest[name] = max(cross.items(), key=lambda kv: kv[1])
        separated += closest[name][1] < same_means[name]
    owner_ids = torch.tensor([names.index(o) for o in owners])
    different = owner_ids[:, None] != owner_ids[None, :]
    masked = similarity.masked_fill(eye, float("-inf"))
    top1 = (owner_ids[masked.argmax(dim=1)] == owner_ids).float().mean().item()
    same = sum(same_means.values()) / len(same_means)
    other = similarity[different].mean().item()
    # "nearest instance photo" scores, as eval uses them: best match among a subject's (other) photos
    same_mask = ~different & ~eye
    nearest_same = similarity.masked_fill(~same_mask, float("-inf")).max(dim=1).values.mean().item()
    nearest_other = similarity.masked_fill(~different, float("-inf")).max(dim=1).values.mean().item()
    return {
        "same": round(same, 4),
        "other": round(other, 4),
        "margin": round(same - other, 4),
        "separated": round(separated / len(names), 3),
        "top1": round(top1, 3),
        "nearest_same": round(nearest_same, 4),
        "nearest_other": round(nearest_other, 4),
        "worst": sorted(
            ((n, round(same_means[n] - closest[n][1], 3), closest[n][0]) for n in names), key=lambda t: t[1]
        )[:3],
    }


# -- shipping it beside tiny-world, and loading it for `lora-db eval` -----------------------------------------------

JUDGE_FOLDER = "judge"  # where a model folder keeps its judge
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KIND = "lora-db-judge"


def save_judge(judge: Judge, config: JudgeConfig, folder: Path, report: dict | None = None) -> None:
    """`folder/config.json` (what it is, its sizes, how it was trained) and `folder/model.safetensors`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"kind": KIND, "image_size": procedural.IMAGE_SIZE, **asdict(config), "report": report or {}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / WEIGHTS_FILE))


def is_judge_folder(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / CONFIG_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False


def load_judge(folder: Path) -> Judge:
    """A saved judge, from safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    judge = Judge(meta["width"], meta["embed_dim"])
    judge.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    judge.image_size = meta["image_size"]
    return judge.eval()


class JudgeEmbedder:
    """Unit-length judge embeddings of PIL images (any size: box-resized to the judge's 64 px)."""

    def __init__(self, folder: Path):
        self.model = load_judge(folder)
        self.size = self.model.image_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack(
            [
                procedural.to_tensor(image.convert("RGB").resize((self.size, self.size), Image.Resampling.BOX))
                for image in images
            ]
        )
        return self.model(pixels)


def build_judge(folder: Path, config: JudgeConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the judge, check it on the DreamBooth subject set (which it never saw), and save it to `folder`.

    The report holds how well it tells the subjects apart (`separation`) beside the model-free 16 px score."""
    config = config or JudgeConfig()
    started = time.perf_counter()
    judge = train_judge(config, log=log)
    pixels, owners = subject_tensor()
    held = [i for i, owner in enumerate(owners) if not SUBJECTS[owner].probe]
    held_owners = [owners[i] for i in held]
    report = {
        "train_s": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "judge_held_out": separation(judge_similarity(judge, pixels[held], pixels[held]), held_owners),
        "judge_all": separation(judge_similarity(judge, pixels, pixels), owners),
        "pixel_held_out": separation(pixel_similarity(pixels[held], pixels[held]), held_owners),
    }
    save_judge(judge, config, Path(folder), report)
    return report


def judge_report(folder: Path) -> dict:
    """The build report `build_judge` saved with the judge in `folder`."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())["report"]
