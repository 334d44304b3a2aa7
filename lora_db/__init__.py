"""lora-db: memory-optimized LoRA DreamBooth for the UniDiffuser text-to-image model.

The Python API is what the `lora-db` commands call, one function per command:

    from lora_db import TrainConfig, train, SampleConfig, sample, make_demo_images
    make_demo_images("photos")
    result = train(TrainConfig(model="tiny", instance_dir="photos", instance_prompt="a photo of sks robot",
                               output_dir="run", max_train_steps=30, learning_rate=5e-3))
    sample(SampleConfig(model="tiny", adapters=[str(result.adapter_path)], prompts=["a photo of sks robot"],
                        out="samples"))
    pipe = load_pipeline("tiny", adapters=[result.adapter_path])     # a diffusers pipeline, adapters hot-swappable

The packages, each above the ones listed after it (an import-linter contract in pyproject.toml keeps it so):

    cli/          the `lora-db` command line: typer commands generated from the config dataclasses
    ui/           `lora-db ui`: the workflow in a local web page, over `lora-db` subprocesses
    training/     a DreamBooth run: set-up, the loop, examples, data, class images, checkpoints, resume,
                  stopping, trackers, model card, hub, and the memory estimate (a traced dry run of the same set-up)
    evaluation/   `lora-db eval`: samples per adapter and checkpoint, scored against the photos; the plot
    adapters/     the adapter file, LoRA injection and its math, variants (DoRA, rsLoRA, LoRA+), merge,
                  hot-swap and `lora-db sample`, peft import and export
    synthetic/    offline worlds: tiny-world (a small pretrained UniDiffuser), its world, the demo robot
    models/       loading UniDiffuser (hub, folder, random builds), its text-to-image objective, sampling,
                  quantization and memory options
    config/       every command's options as dataclasses (no torch), their checks and TOML files
    images.py, layout.py, io.py, locks.py, logs.py, errors.py: photos in and pictures out, a run folder's
                  file names, atomic writes, output locks, library log levels, the error type

A training run flows: cli.train builds a TrainConfig -> training.loop.train -> training.setup (checks, accelerate,
models.loading, models.quantize, class images, adapters.format.inject_lora, optimizer) -> training.examples (cached
latents and prompts) -> the loop (models.objective.dreambooth_loss, checkpoints, validation through
models.sampling, evaluation.metrics.TrainingEval for --eval-steps) -> adapters.format.save_adapter, model card.

Names are imported lazily, so `import lora_db` and the CLI's --help do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lora_db.version import __version__

_API = {
    "LoraDBError": "lora_db.errors",
    "TrainConfig": "lora_db.config.train",
    "SampleConfig": "lora_db.config.commands",
    "MergeConfig": "lora_db.config.commands",
    "EvalConfig": "lora_db.config.evaluate",
    "train": "lora_db.training.loop",
    "TrainResult": "lora_db.training.loop",
    "estimate_memory": "lora_db.training.estimate",
    "sample": "lora_db.adapters.sample",
    "load_pipeline": "lora_db.adapters.hotswap",
    "merge": "lora_db.adapters.merge",
    "write_combined": "lora_db.adapters.merge",
    "read_adapter": "lora_db.adapters.format",
    "describe_adapter": "lora_db.adapters.format",
    "export_peft": "lora_db.adapters.format",
    "evaluate": "lora_db.evaluation.evaluate",
    "make_demo_images": "lora_db.synthetic.demo",
}

__all__ = [
    "EvalConfig",
    "LoraDBError",
    "MergeConfig",
    "SampleConfig",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "describe_adapter",
    "estimate_memory",
    "evaluate",
    "export_peft",
    "load_pipeline",
    "make_demo_images",
    "merge",
    "read_adapter",
    "sample",
    "train",
    "write_combined",
]

if TYPE_CHECKING:
    from lora_db.adapters.format import describe_adapter, export_peft, read_adapter
    from lora_db.adapters.hotswap import load_pipeline
    from lora_db.adapters.merge import merge, write_combined
    from lora_db.adapters.sample import sample
    from lora_db.config.commands import MergeConfig, SampleConfig
    from lora_db.config.evaluate import EvalConfig
    from lora_db.config.train import TrainConfig
    from lora_db.errors import LoraDBError
    from lora_db.evaluation.evaluate import evaluate
    from lora_db.synthetic.demo import make_demo_images
    from lora_db.training.estimate import estimate_memory
    from lora_db.training.loop import TrainResult, train


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lora_db' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
