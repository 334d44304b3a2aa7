"""tiny-world's CLIP: contrastive training of both towers on the world's pictures and captions (`train_clip`).

Pictures that share a caption are all positives of it. Optional linear heads on both embeddings also classify every
attribute a caption can say (`world.attributes`: shape, colour, pattern, its colour, place;
`BuildConfig.clip_aux_weight`). Contrastive training on these captions alone barely learns the shape, since most
captions tell each other apart by colour, pattern and place; heads for the shape and colour alone taught the text
tower those two and squeezed the place out of it (captions that differ only in place: hidden-state cosine 0.84 ->
0.96), so every attribute has its head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_db.synthetic.vae import cosine_lr, optimizer_step, set_lr
from lora_db.synthetic.world import attributes


def train_clip(
    clip, clip_pixels: torch.Tensor, tokens: torch.Tensor, captions: list[str], config, progress, labels=None
) -> list[float]:
    """Contrastive image-caption training; pictures that share a caption are all positives of it.

    With `config.clip_aux_weight` > 0 and `labels` (`world.scene_labels`), linear heads on both embeddings also
    classify every attribute of the scene: on the pictures that show it, and on the captions that say it.
    Contrastive training alone barely sees shapes (a linear probe finds the shape in 12 % of held-out pictures,
    chance 10 %). The heads are dropped afterwards."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    heads = torch.nn.ModuleDict()
    if config.clip_aux_weight and labels is not None:
        width = clip.config.projection_dim
        heads = torch.nn.ModuleDict(
            {
                f"{side}_{name}": torch.nn.Linear(width, len(values))
                for side in ("image", "text")
                for name, values in attributes().items()
            }
        )
    optimizer = torch.optim.AdamW([*clip.parameters(), *heads.parameters()], lr=config.clip_lr, weight_decay=0.1)
    caption_ids = torch.tensor(_caption_ids(captions))
    losses = []
    clip.train()
    for step in (bar := progress(config.clip_steps)):
        set_lr(optimizer, cosine_lr(step, config.clip_steps, config.clip_lr, warmup=50))
        index = torch.randint(0, len(clip_pixels), (config.clip_batch,), generator=generator)
        image_embeds = clip.visual_projection(clip.vision_model(pixel_values=clip_pixels[index]).pooler_output)
        text_embeds = clip.text_projection(clip.text_model(input_ids=tokens[index]).pooler_output)
        image, text = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (caption_ids[index][:, None] == caption_ids[index][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        if heads:
            aux = 0.0
            for name in attributes():
                truth = labels[name][index]
                for side, embeds in (("image", image_embeds), ("text", text_embeds)):
                    known = labels[f"{'shows' if side == 'image' else 'says'}_{name}"][index]
                    if known.any():
                        aux = aux + F.cross_entropy(heads[f"{side}_{name}"](embeds[known]), truth[known])
            loss = loss + config.clip_aux_weight * aux
        optimizer_step(optimizer, loss, losses, bar)
    clip.eval()
    return losses


def _caption_ids(captions: list[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(c, len(ids)) for c in captions]
