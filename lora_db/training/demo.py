"""`lora-db demo`: tiny-world learns a subject it never saw, and one grid shows the photos, before and after.

    lora-db demo            # demo/photos, demo/run (a training run), demo/before-after.png, demo/demo.json

tiny-world is a small UniDiffuser pretrained offline and shipped with lora-db; its held-out subjects
(lora_db.synthetic.subjects) are shapes and patterns its training never drew. The demo writes five photos of one,
trains a LoRA on "a photo of sks toy" through the same `train` as `lora-db train`, with tiny-world's recommended
setting (rank 8 on attention and MLP, 1200 steps at lr 2e-3; guidance 3, as benchmarks/quality.py), then samples
the prompt with the base model and with the adapter at the same seeds. Each row of the grid says its model-free
pixel score against the photos (lora_db.evaluation.metrics; 1 is identical), which demo.json and the command's
output repeat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_db.adapters.hotswap import load_pipeline
from lora_db.adapters.sample import GRID_MIN_CELL
from lora_db.config.commands import DemoConfig
from lora_db.config.train import TINY_WORLD_RECOMMENDED, TrainConfig
from lora_db.errors import LoraDBError
from lora_db.evaluation.metrics import nearest_pixel_similarity, pixel_thumbnails
from lora_db.images import image_grid, save_png
from lora_db.io import atomic_directory, atomic_write_json
from lora_db.locks import output_lock
from lora_db.models.loading import TINY_WORLD
from lora_db.models.sampling import generate_images
from lora_db.synthetic.subjects import SUBJECTS, subject_photos, write_subject_photos
from lora_db.training.loop import train

logger = logging.getLogger("lora_db")

GUIDANCE_SCALE = 3.0  # benchmarks/quality.py's: tiny-world draws its subjects steadier at low guidance
INFERENCE_STEPS = 20
GRID_FILE = "before-after.png"
MARKER = "demo.json"


@dataclass
class DemoResult:
    grid: Path
    adapter: Path
    before: float  # pixel score of the base model's samples against the photos
    after: float  # the same for the adapter's samples
    seconds: float


def run_demo(config: DemoConfig) -> DemoResult:
    """Photos, training, samples before and after, the grid: FOLDER/photos, FOLDER/run, FOLDER/before-after.png."""
    threads = torch.get_num_threads()
    # tiny-world's tensors are too small to share: on a 2-core machine with another job, two threads took 2.5 min
    # where one took 1 (benchmarks/quality.py runs with one thread too).
    torch.set_num_threads(1)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> DemoResult:
    started = time.perf_counter()
    subject = SUBJECTS[config.subject]
    folder = config.folder
    with output_lock(folder, "FOLDER"):
        _check_folder(folder, config.overwrite)
        record = {
            "subject": subject.name,
            "prompt": subject.instance_prompt,
            "steps": config.steps,
            "seed": config.seed,
        }
        atomic_write_json(folder / MARKER, record)  # first: an interrupted demo is still one that --overwrite may redo
        logger.info("demo: tiny-world learns %s, which it never saw, from 5 photos", subject.description)
        photos = subject_photos(subject.name, seed=config.seed)
        with atomic_directory(folder / "photos", replace=True, record=True) as tmp:
            write_subject_photos(subject.name, tmp, seed=config.seed)
        run = train(
            TrainConfig(
                model=TINY_WORLD,
                instance_dir=folder / "photos",
                instance_prompt=subject.instance_prompt,
                output_dir=folder / "run",
                rank=TINY_WORLD_RECOMMENDED["rank"],
                target_modules=TINY_WORLD_RECOMMENDED["target_modules"],
                learning_rate=TINY_WORLD_RECOMMENDED["learning_rate"],
                max_train_steps=config.steps,
                seed=config.seed,
                report_to="none",
                overwrite=True,  # train replaces only the files it wrote there
            )
        )
        before, after = _before_and_after(run.adapter_path, subject.instance_prompt, config)
        scores = [
            nearest_pixel_similarity(pixel_thumbnails(images), pixel_thumbnails(photos)) for images in (before, after)
        ]
        rows = [f"the {len(photos)} photos", f"before training (pixel {scores[0]:.3f})"]
        rows.append(f"after {config.steps} steps (pixel {scores[1]:.3f})")
        grid = image_grid([photos, before, after], rows, min_cell_size=GRID_MIN_CELL, title=subject.instance_prompt)
        save_png(grid, folder / GRID_FILE, {"prompt": subject.instance_prompt, "rows": ", ".join(rows)})
        seconds = time.perf_counter() - started
        result = DemoResult(folder / GRID_FILE, run.adapter_path, scores[0], scores[1], seconds)
        atomic_write_json(
            folder / MARKER,
            record | {"pixel_before": result.before, "pixel_after": result.after, "seconds": round(seconds, 1)},
        )
    return result


def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise LoraDBError(f"FOLDER {folder} is a file; name a folder for the demo")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise LoraDBError(
            f"FOLDER {folder} already exists; pass --overwrite to run the demo again there (its photos, run and grid "
            "are replaced), or name another folder"
        )
    if not (folder / MARKER).is_file():
        raise LoraDBError(f"FOLDER {folder} holds files lora-db did not write (no {MARKER}); name another folder")


def _before_and_after(adapter: Path, prompt: str, config: DemoConfig) -> tuple[list, list]:
    """The prompt's samples by the base model, then by the adapter, at the same seeds (one loaded pipeline)."""
    from tqdm.auto import tqdm

    pipe = load_pipeline(TINY_WORLD, adapters=[adapter])
    pipe.set_progress_bar_config(disable=True)
    (name,) = pipe.lora_adapters.names
    samples = []
    with tqdm(total=2 * config.num_images, desc="sample", unit="img") as bar:
        for weights in ({}, {name: 1.0}):
            pipe.lora_adapters.activate(weights)
            images = generate_images(
                pipe,
                prompt,
                config.num_images,
                seed=config.seed,
                num_inference_steps=INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE,
                on_batch=bar.update,
            )
            samples.append(images)
    return samples[0], samples[1]
