"""Where the adapter rows stand: the reference rows beside them and the best checkpoint.

Per subject prompt, `lora-db eval` reports beside the model rows:

- photos: the real photos among themselves, leave-one-out (photo i against the photos j != i);
- ceiling: the photos after a round trip through the pipeline's VAE (encode, take the mean, decode, at the model's
  resolution), scored like samples, leave-one-out. What the decoder can draw of the subject: an adapter above it
  is copying its training photos, one far below it has not learned the subject;
- describe (`--describe`): the base model sampling a plain description of the subject at the same seeds, scored
  like a row. An adapter that does not beat words has learned nothing a prompt could not say.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.evaluation.metrics import SUBJECT_METRICS, SubjectScorer, _mean
from lora_db.images import to_tensor


@torch.no_grad()
def vae_round_trip(pipe, photos: Sequence[Image.Image]) -> list[Image.Image]:
    """Each photo encoded by the pipeline's VAE (the posterior's mean) and decoded back, one at a time."""
    vae = pipe.vae
    images = []
    for photo in photos:
        pixels = to_tensor(photo)[None].to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        array = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(array))
    return images


def standing_rows(scorer: SubjectScorer, ceiling: Sequence[Image.Image], described: dict, score) -> dict:
    """Per subject prompt: photos and ceiling (leave-one-out), and the describe row when the prompt has one.

    `described` maps each subject prompt to (its description or None, the base model's samples of it); `score`
    scores samples of a prompt as a row's are scored."""
    photos, through_vae = scorer.photos_among_themselves(), scorer.score_leave_one_out(ceiling)
    return {
        prompt: {
            "photos": photos,
            "ceiling": through_vae,
            "describe": {"description": text, **score(images, prompt)} if text else None,
        }
        for prompt, (text, images) in described.items()
    }


def pair_descriptions(subject_prompts: Sequence[str], descriptions: Sequence[str]) -> dict[str, str | None]:
    """Each subject prompt's --describe: none at all, one for every subject prompt, or one each in their order."""
    if not descriptions:
        return dict.fromkeys(subject_prompts)
    if len(descriptions) == 1:
        return dict.fromkeys(subject_prompts, descriptions[0])
    if len(descriptions) != len(subject_prompts):
        raise LoraDBError(
            f"--describe given {len(descriptions)} times for {len(subject_prompts)} subject prompt(s) "
            f"({'; '.join(subject_prompts)}): give one for all of them, or one per subject prompt in their order"
        )
    return dict(zip(subject_prompts, descriptions, strict=True))


def subject_fidelity(row: dict, subject_prompts: Sequence[str]) -> dict[str, float | None]:
    """A row's subject metrics averaged over the subject prompts only: control prompts never enter."""
    scores = [row["prompts"][prompt] for prompt in subject_prompts]
    return {
        name: None if any(s[name] is None for s in scores) else _mean([s[name] for s in scores])
        for name in SUBJECT_METRICS
    }


def best_checkpoint(rows: Sequence[dict], subject_prompts: Sequence[str], metric: str) -> dict | None:
    """The row with a training step whose subject prompts score highest on `metric` (the judge's, else CLIP-I);
    the earliest on a tie; None without such rows."""
    stepped = sorted((row for row in rows if row["step"] is not None), key=lambda row: row["step"])
    if not stepped:
        return None
    scored = [(subject_fidelity(row, subject_prompts)[metric], row) for row in stepped]
    score, best = max(scored, key=lambda pair: pair[0])  # max keeps the first of equal scores
    return {"label": best["label"], "step": best["step"], "metric": metric, "score": score}
