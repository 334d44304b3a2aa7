"""Training examples as the loop consumes them: images and prompts, encoded once or per step.

`ExampleSource` serves a micro-batch's VAE latents and CLIP image embeddings, from a cache (`--cache-latents`,
encoded once before training) or by encoding augmented images each step; `PromptEncoder` turns prompts into the
U-ViT's text input, through the CLIP text encoder (and its LoRA, with `--train-text-encoder`) and the caption
decoder's `encode` projection."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from lora_db.config.train import TrainConfig
from lora_db.training.data import DreamBoothDataset, ImageRecord, collate
from lora_db.training.latent_cache import LatentCache


class ExampleSource:
    """Training examples for the loop: from images each step, or from encodings cached once."""

    def __init__(
        self,
        dataset: DreamBoothDataset,
        pipe,
        dtype: torch.dtype,
        device: torch.device,
        cache: bool,
        disk: LatentCache | None = None,
    ):
        self.dataset, self.pipe, self.dtype, self.device = dataset, pipe, dtype, device
        self.cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.files: list[Path] | None = None  # --cache-latents-dir: each example's encodings on disk
        if cache:
            encoded = {}  # a file its concept repeats is encoded once
            for i, record in enumerate(dataset.records):
                if record.path not in encoded:
                    encoded[record.path] = self._encode_item(dataset[i])
            self.cache = [encoded[record.path] for record in dataset.records]
        if disk is not None:
            files = {}
            for i, record in enumerate(dataset.records):
                if record.path not in files:
                    files[record.path] = disk.ensure(record.path, lambda i=i: self._encode_item(dataset[i]))
            self.files = [files[record.path] for record in dataset.records]
        weights = {record.weight for record in dataset.records}
        # One concept weight for every example (the usual case): the loop scales by it, nothing indexed per step.
        self.uniform_weight: float | None = weights.pop() if len(weights) == 1 else None

    def weights(self, pairs: list[tuple[int, int]]) -> torch.Tensor | float:
        """The loss weight of each example of a micro-batch (its concept's); one number when all weigh alike."""
        if self.uniform_weight is not None:
            return self.uniform_weight
        return torch.tensor([self.dataset.records[index].weight for _, index in pairs], device=self.device)

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def _encode_item(self, item: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = item["pixel_values"][None].to(self.device, self.dtype)
        latent_dist = self.pipe.vae.encode(pixels).latent_dist
        clip = self._clip_embeds(item["clip_pixel_values"][None])
        return latent_dist.mean[0], latent_dist.std[0], clip[0]

    def _clip_embeds(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        return self.pipe.image_encoder(pixel_values=clip_pixels.to(self.device, self.dtype)).image_embeds[:, None]

    @torch.no_grad()
    def batch(
        self, pairs: list[tuple[int, int]], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Scaled VAE latents (sampled from the posterior), CLIP image embeddings (both fp32) and prompts."""
        prompts = [self.dataset.records[index].prompt for _, index in pairs]
        if self.cache is not None and len(pairs) == 1:
            mean, std, clip = (part[None] for part in self.cache[pairs[0][1]])  # views: nothing to stack
        elif self.cache is not None:
            mean, std, clip = (torch.stack(parts) for parts in zip(*(self.cache[i] for _, i in pairs), strict=True))
        elif self.files is not None:
            items = [LatentCache.load(self.files[i], self.device) for _, i in pairs]
            mean, std, clip = (torch.stack(parts) for parts in zip(*items, strict=True))
        else:
            items = []
            for epoch, index in pairs:
                self.dataset.set_epoch(epoch)
                items.append(self.dataset[index])
            batch = collate(items)
            latent_dist = self.pipe.vae.encode(batch["pixel_values"].to(self.device, self.dtype)).latent_dist
            mean, std = latent_dist.mean, latent_dist.std
            clip = self._clip_embeds(batch["clip_pixel_values"])
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        latents = (mean.float() + std.float() * noise) * self.pipe.vae.config.scaling_factor
        return latents, clip.float(), prompts


def example_source(
    config: TrainConfig,
    records: list[ImageRecord],
    pipe,
    dtype: torch.dtype,
    device: torch.device,
    disk: LatentCache | None = None,
) -> ExampleSource:
    dataset = DreamBoothDataset(
        records,
        config.resolution,
        pipe.clip_image_processor,
        random_crop=config.random_crop,
        random_flip=config.random_flip,
        seed=config.seed,
    )
    return ExampleSource(dataset, pipe, dtype, device, cache=config.cache_latents, disk=disk)


class PromptEncoder:
    """Prompt -> CLIP text encoder -> text_decoder.encode -> U-ViT text input, with gradients when trained.

    `text_encoder` is the module to call: when it is trained across processes, the wrapper accelerate returned,
    since DDP only all-reduces the gradients of calls that go through it.
    """

    def __init__(self, pipe, device: torch.device, trainable: bool, text_encoder: nn.Module | None = None):
        self.pipe, self.device, self.trainable = pipe, device, trainable
        self.text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.pipe.clip_tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.pipe.clip_tokenizer.model_max_length,
            return_tensors="pt",
        )
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return self.pipe.text_decoder.encode(hidden)

    def precompute(self, prompts: set[str]) -> None:
        with torch.no_grad():
            for prompt in sorted(prompts):
                self.cache[prompt] = self._encode([prompt])[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trainable or any(p not in self.cache for p in prompts):
            with contextlib.nullcontext() if self.trainable else torch.no_grad():
                return self._encode(prompts)
        return torch.stack([self.cache[p] for p in prompts])
