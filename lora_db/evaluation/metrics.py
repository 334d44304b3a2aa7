"""The numbers `lora-db eval` and `lora-db train --eval-steps` report: embedders and similarity measures.

Subject fidelity is the mean cosine similarity between embeddings of generated samples and of the real photos;
prompt fidelity (CLIP-T) compares a prompt with each sample through a matched CLIP pair; prior similarity compares a
row's class-prompt samples with the base model's at the same seeds; diversity is the mean pairwise distance within
one row's samples. `TrainingEval` scores the model being trained on a few seeds."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.images import prepare_image
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
    """CLS embeddings of a transformers ViT (the paper's DINO ViT-S/16), unit length."""

    def __init__(self, name: str):
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(name, use_safetensors=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise _cannot_load("--dino", name, err) from None

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


def clip_t_text(prompt: str, identifier: str | None) -> str:
    if not identifier:
        return prompt
    return re.sub(rf"\b{re.escape(identifier)}\b", "a", prompt)


@dataclass
class Reference:
    """Embeddings of the real photos, and the real-vs-real figures a user compares the rows with."""

    clip: torch.Tensor
    dino: torch.Tensor | None = None

    def summary(self) -> dict[str, float | None]:
        return {
            "clip_i": _self_similarity(self.clip),
            "dino": _self_similarity(self.dino) if self.dino is not None else None,
            "images": self.clip.shape[0],
        }


def _self_similarity(a: torch.Tensor) -> float:
    return 1.0 - mean_pairwise_distance(a)


def score_prompt(
    images: Sequence[Image.Image], prompt: str, reference: Reference, embed, dino=None, clip_pair=None, identifier=None
) -> dict[str, float | None]:
    embeddings = embed(images)
    return {
        "clip_i": mean_cross_similarity(embeddings, reference.clip),
        "dino": mean_cross_similarity(dino(images), reference.dino) if dino is not None else None,
        "clip_t": _mean(clip_pair.similarity(clip_t_text(prompt, identifier), images)) if clip_pair else None,
        "diversity": mean_pairwise_distance(embeddings),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _square(photos: Sequence[Image.Image], size: int) -> list[Image.Image]:

    return [prepare_image(photo, size) for photo in photos]


class TrainingEval:
    """`lora-db train --eval-steps K`: the same metrics on a few seeds, on the model being trained.

    Built before the first step (and before a resume restores weights), so its class-prompt samples are the
    base model's: prior similarity then compares each later step with the untrained model at the same seeds.
    """

    def __init__(self, pipe, photos: Sequence[Image.Image], prompts: Sequence[str], class_prompt: str | None, **gen):
        self.pipe, self.prompts, self.class_prompt, self.gen = pipe, list(prompts), class_prompt, gen
        self.embed = ImageEmbedder(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.reference = Reference(self.embed(_square(photos, size)))
        self.base_class = self._embed_samples(class_prompt) if class_prompt else None

    def _embed_samples(self, prompt: str) -> torch.Tensor:

        return self.embed(generate_images(self.pipe, prompt, **self.gen))

    def __call__(self, step: int) -> dict[str, float]:
        record: dict[str, float] = {"step": step}
        scores = []
        for prompt in self.prompts:
            embeddings = self._embed_samples(prompt)
            scores.append((mean_cross_similarity(embeddings, self.reference.clip), mean_pairwise_distance(embeddings)))
        record["eval/clip_i"] = _mean([clip_i for clip_i, _ in scores])
        record["eval/diversity"] = _mean([diversity for _, diversity in scores])
        if self.base_class is not None:
            class_embeds = self._embed_samples(self.class_prompt)
            record["eval/prior_similarity"] = paired_similarity(class_embeds, self.base_class)
            record["eval/class_diversity"] = mean_pairwise_distance(class_embeds)
        return record
