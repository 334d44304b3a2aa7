"""What a training run writes besides checkpoints: the adapter (or U-ViT folder) with its metadata, validation
images, and the weights rescued elsewhere when a write fails.

`save_outputs` is called once at the end of `lora_db.training.loop.train` (and by `rescue_weights` into a temporary
folder); `run_validation` every --validation-steps."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from lora_db.adapters.format import save_adapter
from lora_db.adapters.layers import lora_state_dict
from lora_db.adapters.tokens import trained_tokens
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.images import image_grid, save_png
from lora_db.io import DiskFullError, WriteError, atomic_directory
from lora_db.layout import ADAPTER_FILE, RAW_ADAPTER_FILE, list_checkpoints
from lora_db.models.memory import eager_calls
from lora_db.models.sampling import SAMPLE_PROBLEM, generate_images
from lora_db.training.checkpoint import trainable_state
from lora_db.training.concepts import concepts_record
from lora_db.training.divergence import check_weights
from lora_db.training.setup import Models, Run, encoders_to_device
from lora_db.training.tracking import log_validation_images, tracked
from lora_db.version import __version__

logger = logging.getLogger("lora_db")


def adapter_metadata(config: TrainConfig, step: int) -> dict[str, object]:
    """What an adapter file records of its run; with several concepts, the first one's prompts and all of them."""
    first, concepts = config.concepts()[0], concepts_record(config)
    return {
        "base_model": config.model,
        "instance_prompt": first.instance_prompt or "",
        "class_prompt": first.class_prompt or "",
        **({"concepts": concepts} if concepts is not None else {}),
        "steps": str(step),
        "resolution": str(config.resolution),
        "quantize_base": config.quantize_base,
        "mixed_precision": config.mixed_precision,  # the weights' dtype when the base was quantized
        "lora_db_version": __version__,
    }


def save_outputs(config: TrainConfig, models: Models, step: int, file_name: str = ADAPTER_FILE) -> Path:
    """The run's result: the adapter file (LoRA; named `file_name`) or a diffusers U-ViT folder (full fine-tuning)."""
    check_weights(config, models, step)
    if config.method == "full":
        with atomic_directory(config.output_dir / "unet", replace=True) as tmp:
            models.unet.save_pretrained(tmp, safe_serialization=True)
        return config.output_dir / "unet"
    tensors = {
        component: lora_state_dict(module) for component, module in models.trained.items() if component in models.specs
    }
    metadata = adapter_metadata(config, step)
    if config.use_ema:
        metadata["weights"] = "trained" if file_name == RAW_ADAPTER_FILE else f"EMA (decay {config.ema_decay:g})"
    return save_adapter(config.output_dir / file_name, tensors, models.specs, metadata, trained_tokens(models.pipe))


def run_validation(config: TrainConfig, models: Models, accelerator, step: int) -> Path:
    folder = config.output_dir / "validation"
    for module in models.trained.values():
        module.eval()
    # What t2i sampling calls; the image encoder and GPT-2 it does not.
    encoders_to_device(config, models.pipe, ("vae", "text_encoder"), accelerator.device)
    with eager_calls():  # --compile compiled the training step, not sampling
        images = generate_images(
            models.pipe,
            config.validation_prompt,
            config.num_validation_images,
            seed=config.seed,
            num_inference_steps=config.validation_inference_steps,
            guidance_scale=config.validation_guidance_scale,
            autocast=accelerator.autocast,
        )
    for i, image in enumerate(images):
        problem = image.info.get(SAMPLE_PROBLEM)
        if problem is not None:
            logger.warning(
                "validation at step %d: sample %d (seed %d) %s; the weights have diverged or the sampling settings "
                "are off (the PNG is saved as it came out)",
                step,
                i,
                config.seed + i,
                problem,
            )
        save_png(
            image,
            folder / f"step-{step:06d}-{i}.png",
            {"prompt": config.validation_prompt, "seed": config.seed + i, "step": step},
        )
    save_png(image_grid([images]), folder / f"step-{step:06d}.png", {"prompt": config.validation_prompt})
    tracked(accelerator, log_validation_images, accelerator, images, step, config.validation_prompt, config.seed)
    for module in models.trained.values():
        module.train()
    return folder


def rescue_weights(config: TrainConfig, models: Models, step: int, err: WriteError) -> WriteError:
    """A write failed (a full disk, a folder made read-only or immutable): save the trained weights where they can
    be written; say where they and the last checkpoint are."""
    checkpoints = list_checkpoints(config.output_dir)
    last = f"; the last checkpoint is {checkpoints[-1]}" if checkpoints else ""
    fix = "once there is room" if isinstance(err, DiskFullError) else "once it is writable again"
    try:
        folder = Path(tempfile.mkdtemp(prefix="lora-db-rescue-"))
        rescued = save_outputs(replace(config, output_dir=folder), models, step)
    except (LoraDBError, OSError):
        advice = (
            f"run the same command with --resume-from-checkpoint latest {fix}"
            if checkpoints
            else "the weights of this run could not be kept anywhere"
        )
        return type(err)(f"{err}{last}; {advice}")
    return type(err)(
        f"{err}; the weights trained so far (step {step}) were saved to {rescued} instead: move them into "
        f"{config.output_dir} {fix}{last}"
    )


def replica_divergence(run: Run) -> float:
    """Largest difference of any trained weight between processes: 0 when every gradient was all-reduced.

    Gathered one tensor at a time, so it costs (number of processes) x the largest tensor, never the whole model.
    """
    worst = 0.0
    for tensor in trainable_state(run.models).values():
        gathered = run.accelerator.gather(tensor.detach().float()[None])
        worst = max(worst, (gathered - gathered[0]).abs().max().item())
    return worst
