"""The examples of every concept a run trains on (`TrainConfig.concepts()`: a --dataset-config file's, or the one
the single-concept options name): photos repeated and weighted as their concept says, and class images generated
for each concept with prior preservation.

Each photo counts `repeats` times per epoch (the data order shuffles the repeated list; cached latents are
encoded once per file) and its loss is multiplied by its concept's `weight`; so are its concept's class images'.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from lora_db.config.dataset import Concept
from lora_db.config.train import TrainConfig
from lora_db.locks import output_lock
from lora_db.training.class_images import describe as describe_class_images
from lora_db.training.class_images import generate_class_images, plan_class_images
from lora_db.training.data import ImageRecord, scan_images

logger = logging.getLogger("lora_db")


def option_of(config: TrainConfig, number: int, key: str) -> str:
    """How an error names a concept's folder: the single-concept flag, or the file, the concept and the key."""
    if config.dataset_config is None:
        return {"folder": "--instance-dir", "class_dir": "--class-dir"}[key]
    return f"--dataset-config {config.dataset_config}: concept {number} {key}"


def instance_records(config: TrainConfig) -> list[ImageRecord]:
    """Every concept's photos with their prompts, each `repeats` times, weighted by its concept."""
    records = []
    for number, concept in enumerate(config.concepts(), start=1):
        found = scan_images(
            concept.folder,
            concept.instance_prompt,
            option=option_of(config, number, "folder"),
            resolution=config.resolution,
            skip_bad_images=config.skip_bad_images,
        )
        records += [replace(record, weight=concept.weight) for record in found] * concept.repeats
    return records


def class_records(config: TrainConfig, pipe, accelerator) -> list[ImageRecord]:
    """The class examples of every concept with prior preservation, weighted by its concept."""
    records = []
    for number, concept in enumerate(config.concepts(), start=1):
        if concept.class_prompt is not None:
            found = setup_class_images(config, concept, option_of(config, number, "class_dir"), pipe, accelerator)
            records += [replace(record, weight=concept.weight) for record in found]
    return records


def setup_class_images(config: TrainConfig, concept: Concept, option: str, pipe, accelerator) -> list[ImageRecord]:
    """A concept's class examples: its folder's images made for its class prompt and this model (or the user's own
    photos), and generated ones for what is missing (main process)."""
    folder, prompt = concept.class_dir, concept.class_prompt

    def plan():
        return plan_class_images(folder, prompt, config.model, config.num_class_images)

    planned = plan()
    if accelerator.is_main_process:
        for line in describe_class_images(planned):
            logger.info("%s", line)
        if planned.missing:
            from tqdm.auto import tqdm

            # Runs sharing a class folder take turns: the manifest and the images are written by one at a time.
            with output_lock(folder, option, wait=True):
                planned = plan()
                with tqdm(total=planned.missing, desc="class images", unit="img", disable=not planned.missing) as bar:
                    generate_class_images(
                        pipe,
                        planned,
                        seed=config.seed,
                        num_inference_steps=config.class_generation_steps,
                        batch_size=config.class_generation_batch_size,
                        autocast=accelerator.autocast,
                        on_batch=bar.update,
                    )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # the main process generated them: read the folder as it is now
        planned = plan()
    return scan_images(
        folder,
        prompt,
        option=option,
        resolution=config.resolution,
        skip_bad_images=config.skip_bad_images,
        paths=planned.paths(),
    )


def concepts_record(config: TrainConfig) -> list[dict[str, object]] | None:
    """The concepts as the run record, config.json and the model card show them (None for the shorthand)."""
    return None if config.dataset_config is None else [concept.to_dict() for concept in config.concepts()]
