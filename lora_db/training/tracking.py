"""Experiment trackers through accelerate: metrics each step, the resolved options as hyperparameters at the start,
validation images as images.

    lora-db train ... --report-to tensorboard     # OUTPUT_DIR/logs/lora-db/events.out.tfevents.* (the default)
    lora-db train ... --report-to wandb           # WANDB_MODE=offline keeps the run in OUTPUT_DIR/logs/wandb
    lora-db train ... --report-to none
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")

PROJECT = "lora-db"
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_tracker(report_to: str | None) -> str | None:
    """The accelerate tracker to use: the one asked for (installed), or by default tensorboard if installed."""
    if report_to is None:
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    if report_to == "none":
        return None
    if importlib.util.find_spec(report_to) is None:
        raise LoraDBError(
            f"--report-to {report_to}: {report_to} is not installed; `pip install 'lora-db[{EXTRAS[report_to]}]'` "
            "or pass --report-to none"
        )
    if report_to == "wandb":
        check_wandb_login()
    return report_to


def check_wandb_login() -> None:
    """wandb online needs an API key (environment or ~/.netrc, where `wandb login` puts it); offline does not."""
    if os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        found = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise LoraDBError(
            "--report-to wandb: no W&B API key; run `wandb login` or set WANDB_API_KEY "
            "(or WANDB_MODE=offline to keep the run in OUTPUT_DIR/logs/wandb)"
        )


def tracker_init_kwargs(tracker: str | None, output_dir: Path) -> dict[str, dict]:
    if tracker == "wandb":
        logs = output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return {"wandb": {"dir": str(logs), "name": output_dir.name}}
    return {}


def hyperparameters(config: TrainConfig) -> dict[str, str | int | float | bool]:
    """The resolved configuration as the scalars trackers accept (lists joined, None as empty text)."""
    values = {}
    for name, value in config.to_dict().items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        values[name] = "" if value is None else value
    return values


def log_validation_images(accelerator, images: Sequence, step: int, prompt: str, seed: int) -> None:
    """Each tracker gets the validation images in its own image type (tensorboard: NHWC uint8; wandb: Image)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.log_images({"validation": batch}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            captions = [f"{prompt} (seed {seed + i})" for i in range(len(images))]
            tracker.log(
                {"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions, strict=True)]}, step=step
            )


def tracked(accelerator, call, *args, **kwargs) -> None:
    """Run a tracker call; tracker output is secondary to metrics.jsonl, so a failure to write it (a full disk,
    a folder turned read-only) warns once and stops the trackers instead of the training run."""
    if not accelerator.trackers and call != accelerator.init_trackers:  # stopped, or none asked for
        return
    try:
        call(*args, **kwargs)
    except OSError as err:
        logger.warning("tracker output stopped (%s); metrics.jsonl keeps recording every step", err)
        accelerator.trackers.clear()
