"""The numbers `lora-db eval` and `lora-db train --eval-steps` report: embedders and similarity measures.

Subject fidelity compares generated samples with the real photos three ways: CLIP-I (the pipeline's own CLIP image
encoder), DINO (a separate ViT: the judge) and pixel (no model at all); prompt fidelity (CLIP-T) compares a prompt
with each sample through a matched CLIP pair; prior similarity compares a row's class-prompt samples with the base
model's at the same seeds; diversity is the mean pairwise distance within one row's samples. A prompt is a subject
prompt when it names the subject's identifier, a control prompt otherwise. `TrainingEval` scores the model being
trained on a few seeds."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.images import prepare_image, to_tensor
from lora_db.models.loading import tiny_world_dir
from lora_db.models.sampling import generate_images


class ImageEmbedder:
    """Unit-length image embeddings from the pipeline's CLIP image encoder."""

    def __init__(self, pipe):
        self.encoder, self.processor = pipe.image_encoder, pipe.clip_image_processor

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device, dtype = self.encoder.device, self.encoder.dtype
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, dtype)
        return F.normalize(self.encoder(pixel_values=pixels).image_embeds.float(), dim=-1).cpu()


class ClipPair:
    """A matched CLIP text and image model (transformers `CLIPModel`) for CLIP-T."""

    def __init__(self, name: str):
        from transformers import AutoProcessor, CLIPModel

        path = _named_model(name)
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise _cannot_load("--clip-model", name, err) from None

    @torch.no_grad()
    def similarity(self, text: str, images: Sequence[Image.Image]) -> list[float]:
        inputs = self.processor(text=[text], images=list(images), return_tensors="pt", padding="max_length")
        text_out = self.model.text_model(input_ids=inputs["input_ids"]).pooler_output
        image_out = self.model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        text_embed = F.normalize(self.model.text_projection(text_out), dim=-1)
        image_embed = F.normalize(self.model.visual_projection(image_out), dim=-1)
        return (image_embed @ text_embed.T)[:, 0].tolist()


class DinoEmbedder:
    """CLS embeddings of a transformers ViT (the paper's DINO ViT-S/16, or a model's own judge), unit length.

    `option` names where the model came from in an error: "--dino", or "the model's judge"."""

    def __init__(self, name: str, option: str = "--dino"):
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(name, use_safetensors=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise _cannot_load(option, name, err) from None

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)


def _named_model(name: str) -> str:
    if name == "tiny-world":
        return str(tiny_world_dir() / "clip")
    return name


def _cannot_load(option: str, name: str, err: Exception) -> LoraDBError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if Path(name).expanduser().exists():
        return LoraDBError(f"{option} {name}: cannot load it ({first}); it is not a complete transformers model folder")
    return LoraDBError(
        f"{option} {name}: cannot load it ({first}); offline, download it elsewhere "
        f"(`hf download {name} --local-dir DIR`) and pass {option} DIR"
    )


def mean_cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (a_i, b_j) of unit vectors."""
    return (a @ b.T).mean().item()


def mean_pairwise_distance(a: torch.Tensor) -> float:
    """Mean 1 - cosine over the distinct pairs within one set of unit vectors."""
    n = a.shape[0]
    if n < 2:
        return float("nan")
    similarity = a @ a.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return 1.0 - (off_diagonal / (n * (n - 1))).item()


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of a_i with b_i (the same seed with and without an adapter)."""
    return (a * b).sum(-1).mean().item()


# -- the model-free column ------------------------------------------------------------------------------------------


PIXEL_SIZE = 16  # the side both images are box-downsampled to: layout and colour count, texture and noise do not


def pixel_thumbnails(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3 * 16 * 16): each image as RGB in [-1, 1], box-downsampled (each pixel the mean of its block)."""
    return torch.stack([F.adaptive_avg_pool2d(to_tensor(image), PIXEL_SIZE) for image in images]).flatten(1)


def pixel_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) matrix of 1 - RMS difference / 2 between thumbnails: 1 identical, 0 black against white."""
    rms = torch.cdist(a.double(), b.double()) / math.sqrt(a.shape[1])
    return (1.0 - rms / 2.0).float()


def nearest_pixel_similarity(
    samples: torch.Tensor, photos: torch.Tensor, left_out: torch.Tensor | None = None
) -> float:
    """Mean over samples of the pixel similarity to the NEAREST photo, skipping the pairs marked in `left_out`.

    Nearest, not the mean over photos: the subject moves between photos (left, right, near, far), so a sample
    that is exactly one of the photos would otherwise score low for not also being every other one."""
    similarity = pixel_similarity(samples, photos)
    if left_out is not None:
        similarity = similarity.masked_fill(left_out, -math.inf)
    return similarity.max(dim=1).values.mean().item()


# -- prompts --------------------------------------------------------------------------------------------------------


def _mentions(prompt: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE) is not None


def clip_t_text(prompt: str, identifiers: Sequence[str]) -> str:
    """The prompt CLIP-T reads: each identifier ("sks") replaced by "a", since no CLIP knows it."""
    for word in identifiers:
        prompt = re.sub(rf"\b{re.escape(word)}\b", "a", prompt, flags=re.IGNORECASE)
    return prompt


def identifier_of(instance_prompt: str, class_prompt: str) -> str | None:
    """The one word of the instance prompt that the class prompt lacks: "sks" for "a photo of sks robot" against
    "a photo of a robot"; None when there is not exactly one (or either prompt is empty)."""
    if not instance_prompt.strip() or not class_prompt.strip():
        return None
    class_words = {word.lower() for word in re.findall(r"\w+", class_prompt)}
    missing = list(dict.fromkeys(w for w in re.findall(r"\w+", instance_prompt) if w.lower() not in class_words))
    return missing[0] if len(missing) == 1 else None


def is_subject_prompt(prompt: str, identifiers: Sequence[str]) -> bool:
    """A prompt that names the subject (contains an identifier); with no identifier known, every prompt does."""
    return not identifiers or any(_mentions(prompt, word) for word in identifiers)


# -- scoring against the photos -------------------------------------------------------------------------------------


@dataclass
class Features:
    """What the subject metrics compare, for one set of images: CLIP, judge (DINO) embeddings and thumbnails."""

    clip: torch.Tensor
    dino: torch.Tensor | None
    pixel: torch.Tensor


SUBJECT_METRICS = ("clip_i", "dino", "pixel")


class SubjectScorer:
    """Scores images against the subject's photos: CLIP-I, DINO (the judge, when there is one), pixel, diversity."""

    def __init__(self, photos: Sequence[Image.Image], embed: ImageEmbedder, judge: DinoEmbedder | None = None):
        self.embed, self.judge = embed, judge
        self.photos = self.features(photos)

    def features(self, images: Sequence[Image.Image]) -> Features:
        images = list(images)
        return Features(self.embed(images), self.judge(images) if self.judge else None, pixel_thumbnails(images))

    def score(self, images: Sequence[Image.Image]) -> dict[str, float | None]:
        """Samples against every photo (pixel: against the nearest photo)."""
        return compare(self.features(images), self.photos)

    def score_leave_one_out(self, images: Sequence[Image.Image]) -> dict[str, float | None]:
        """Image i (made from photo i) against the photos j != i; None for every metric with a single photo."""
        return compare(self.features(images), self.photos, leave_one_out=True)

    def photos_among_themselves(self) -> dict[str, float | None]:
        return compare(self.photos, self.photos, leave_one_out=True)


def compare(items: Features, photos: Features, leave_one_out: bool = False) -> dict[str, float | None]:
    """Mean cosine similarity (CLIP-I, DINO) and nearest-photo pixel similarity of items against photos, and the
    items' own diversity. `leave_one_out` pairs item i with photo i and leaves that pair out."""
    n, m = items.pixel.shape[0], photos.pixel.shape[0]
    keep = ~torch.eye(n, m, dtype=torch.bool) if leave_one_out else torch.ones(n, m, dtype=torch.bool)
    if not keep.any(dim=1).all():
        return {name: None for name in (*SUBJECT_METRICS, "diversity")}

    def mean(similarity: torch.Tensor) -> float:
        return similarity[keep].mean().item()

    return {
        "clip_i": mean(items.clip @ photos.clip.T),
        "dino": mean(items.dino @ photos.dino.T) if items.dino is not None else None,
        "pixel": nearest_pixel_similarity(items.pixel, photos.pixel, ~keep),
        "diversity": mean_pairwise_distance(items.clip),
    }


def score_prompt(
    images: Sequence[Image.Image],
    prompt: str,
    scorer: SubjectScorer,
    clip_pair: ClipPair | None,
    identifiers: Sequence[str],
) -> dict[str, float | None]:
    """One row's samples of one prompt: the subject metrics against the photos, and CLIP-T against the prompt."""
    clip_t = _mean(clip_pair.similarity(clip_t_text(prompt, identifiers), images)) if clip_pair else None
    return scorer.score(images) | {"clip_t": clip_t}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _square(photos: Sequence[Image.Image], size: int) -> list[Image.Image]:

    return [prepare_image(photo, size) for photo in photos]


class TrainingEval:
    """`lora-db train --eval-steps K`: the same metrics on a few seeds, on the model being trained.

    The instance prompt is the subject prompt: its scores are the headline keys (`eval/clip_i`, `eval/dino` with the
    model's judge, `eval/pixel`, `eval/diversity`); the validation prompt, if any, reports under `eval/validation/`,
    never averaged into them. Built before the first step (and before a resume restores weights), so its
    class-prompt samples are the base model's: prior similarity then compares each later step with the untrained
    model at the same seeds.
    """

    def __init__(
        self,
        pipe,
        photos: Sequence[Image.Image],
        instance_prompt: str,
        class_prompt: str | None,
        *,
        validation_prompt: str | None = None,
        judge: DinoEmbedder | None = None,
        **gen,
    ):
        self.pipe, self.class_prompt, self.gen = pipe, class_prompt, gen
        self.prompts = {"eval": instance_prompt} | ({"eval/validation": validation_prompt} if validation_prompt else {})
        self.embed = ImageEmbedder(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.scorer = SubjectScorer(_square(photos, size), self.embed, judge)
        self.base_class = self._embed_samples(class_prompt) if class_prompt else None

    def _embed_samples(self, prompt: str) -> torch.Tensor:

        return self.embed(generate_images(self.pipe, prompt, **self.gen))

    def __call__(self, step: int) -> dict[str, float]:
        record: dict[str, float] = {"step": step}
        for prefix, prompt in self.prompts.items():
            scores = self.scorer.score(generate_images(self.pipe, prompt, **self.gen))
            record |= {f"{prefix}/{name}": value for name, value in scores.items() if value is not None}
        if self.base_class is not None:
            class_embeds = self._embed_samples(self.class_prompt)
            record["eval/prior_similarity"] = paired_similarity(class_embeds, self.base_class)
            record["eval/class_diversity"] = mean_pairwise_distance(class_embeds)
        return record
