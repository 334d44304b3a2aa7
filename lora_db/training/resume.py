"""What a resumed run may change, checked before anything is written.

A checkpoint carries `run.json`: the resolved options of the run that wrote it and a digest of every photo and
caption it trained on (instance and class images). `--resume-from-checkpoint` then continues only the same run:

- may change: how long it runs, how often it checkpoints and validates, and memory options that leave the
  result the same (`RESUME_MAY_CHANGE`);
- may lower: the learning rates (`RESUME_MAY_LOWER`), so that a run that diverged continues from its last good
  checkpoint more slowly (`lower_learning_rates` rescales the optimizer and its schedule);
- may not change: everything else (model, rank, targets, learning rate, seed, data, ...): refused in one line
  naming each option that differs, before any file of the run is touched.

So `config.json` always describes what actually runs. Resuming from checkpoint N moves the checkpoints after N
(another, abandoned continuation of the run) into `OUTPUT_DIR/abandoned/`, so `latest` never picks them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.images import find_images
from lora_db.layout import ABANDONED_DIR, CHECKPOINT_PATTERN, list_checkpoints
from lora_db.layout import CHECKPOINT_MARKER as MARKER
from lora_db.training.class_images import plan_class_images
from lora_db.training.concepts import concepts_record, option_of

logger = logging.getLogger("lora_db")

RUN_RECORD = "run.json"
RESUME_MAY_CHANGE = frozenset(
    {
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "overwrite",
        "output_dir",
        "validation_prompt",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "validation_guidance_scale",
        "gradient_checkpointing",  # recomputes the same activations
        "attention",  # the same attention, another kernel
        "cache_latents",  # the same encodings, kept instead of recomputed
        "cache_latents_dir",  # the same encodings, on disk
        "skip_bad_images",  # the data digest refuses a change in what is trained on
        "strict",
        "class_generation_steps",  # only used to generate missing class images, which the digest covers
        "class_generation_batch_size",
        # The folders themselves may move: the digest of their content decides.
        "instance_dir",
        "class_dir",
        # Where the results go, not what is trained.
        "report_to",
        "push_to_hub",
        "hub_private",
        "init_adapter",  # the checkpoint's weights replace the starting ones
        "dataset_config",  # the file may move: its concepts (without their folders) and the data digest decide
    }
)


RESUME_MAY_LOWER = ("learning_rate", "text_encoder_learning_rate")


def learning_rates(options: dict[str, Any]) -> dict[str, float]:
    """The learning rate of each trained component (the text encoder's defaults to --learning-rate)."""
    unet = options.get("learning_rate")
    return {"unet": unet, "text_encoder": options.get("text_encoder_learning_rate") or unet}


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    caption = path.with_suffix(".txt")
    if caption.is_file():
        digest.update(b"\0caption\0" + caption.read_bytes())
    return digest.hexdigest()


def data_digest(config: TrainConfig) -> dict[str, dict[str, str]]:
    """File name -> digest of the image and its caption, for the instance photos and the class images in use (per
    concept: `instance` and `class` for the single-concept options, `concept N folder` / `class_dir` for a file's)."""
    parts = {}
    for number, concept in enumerate(config.concepts(), start=1):
        names = ("instance", "class") if config.dataset_config is None else _concept_parts(number)
        parts[names[0]] = find_images(concept.folder, option_of(config, number, "folder"))
        if concept.class_prompt is not None:
            plan = plan_class_images(concept.class_dir, concept.class_prompt, config.model, config.num_class_images)
            parts[names[1]] = plan.paths()
    try:
        return {part: {p.name: _file_digest(p) for p in paths if p.is_file()} for part, paths in parts.items()}
    except OSError as err:
        raise LoraDBError(f"cannot read {err.filename}: {err.strerror or err}") from None


def run_record(config: TrainConfig, data: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The resolved options (with a dataset config's concepts) and the data digest."""
    concepts = concepts_record(config)
    return {"config": config.to_dict() | ({"concepts": concepts} if concepts is not None else {}), "data": data}


def read_run_record(checkpoint: Path) -> dict[str, Any] | None:
    try:
        return json.loads((checkpoint / RUN_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LoraDBError(f"checkpoint {checkpoint}: {RUN_RECORD} is unreadable ({err})") from None


def checkpoint_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoraDBError(
            f"checkpoint {checkpoint} is damaged ({err}); resume from an earlier checkpoint-N folder"
        ) from None


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`--flag NEW (the checkpoint has OLD)` for each option that differs and may not change on resume."""
    changes = []
    for name, value in current.items():
        if name == "concepts":
            value, saved_value = _without_folders(value), _without_folders(saved.get(name))
            if name in saved and value != saved_value:
                changes.append(f"--dataset-config's concepts {value} (the checkpoint has {saved_value})")
            continue
        if name in RESUME_MAY_CHANGE or name in RESUME_MAY_LOWER or name not in saved or saved[name] == value:
            continue
        changes.append(f"--{name.replace('_', '-')} {_describe(value)} (the checkpoint has {_describe(saved[name])})")
    before, now = learning_rates(saved), learning_rates(current)
    for (component, rate), name in zip(now.items(), RESUME_MAY_LOWER, strict=True):
        if isinstance(rate, int | float) and isinstance(before[component], int | float) and rate > before[component]:
            flag = f"--{name.replace('_', '-')}"
            changes.append(
                f"{flag} {rate:g} (the checkpoint has {before[component]:g}; a resumed run may only lower it)"
            )
    return changes


def lower_learning_rates(optimizer, scheduler, trained: dict[str, Any], saved: dict[str, Any], current: dict) -> None:
    """Scale each component's parameter groups (LoRA+'s B groups included) and their schedule by new / saved rate."""
    before, now = learning_rates(saved), learning_rates(current)
    owner = {id(p): component for component, module in trained.items() for p in module.parameters()}
    for index, group in enumerate(optimizer.param_groups):
        component = owner.get(id(group["params"][0])) if group["params"] else None
        if component is None or not before[component] or now[component] == before[component]:
            continue
        factor = now[component] / before[component]
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
        scheduler.base_lrs[index] *= factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _concept_parts(number: int) -> tuple[str, str]:
    return f"concept {number} folder", f"concept {number} class_dir"


def _without_folders(concepts: object) -> object:
    """A run record's concepts as a resume compares them: their folders may move (the digest covers the files)."""
    if not isinstance(concepts, list):
        return concepts
    return [{k: v for k, v in c.items() if k not in ("folder", "class_dir")} for c in concepts if isinstance(c, dict)]


def data_changes(saved: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    """What differs in the photos or class images since the checkpoint: `--instance-dir: b.png changed, ...`."""
    changes = []
    options = {"instance": "--instance-dir", "class": "--class-dir"}
    for part in dict.fromkeys([*saved, *current]):
        option = options.get(part, part)
        before, now = saved.get(part, {}), current.get(part, {})
        details = [f"{name} changed" for name in sorted(before.keys() & now.keys()) if before[name] != now[name]]
        details += [f"{name} added" for name in sorted(now.keys() - before.keys())]
        details += [f"{name} removed" for name in sorted(before.keys() - now.keys())]
        if details:
            shown = ", ".join(details[:3]) + (f" and {len(details) - 3} more" if len(details) > 3 else "")
            changes.append(f"{option}: {shown}")
    return changes


def check_resume(config: TrainConfig, checkpoint: Path) -> dict[str, dict[str, str]]:
    """Refuse to resume `checkpoint` with other options or data; returns the data digest of this run."""
    step = checkpoint_step(checkpoint)
    if step > config.max_train_steps:
        raise LoraDBError(
            f"--resume-from-checkpoint {checkpoint}: it is at step {step}, past --max-train-steps "
            f"{config.max_train_steps}; pass --max-train-steps {step} or more"
        )
    data = data_digest(config)
    record = read_run_record(checkpoint)
    if record is None:
        logger.warning(
            "%s holds no record of its options and data (an older lora-db wrote it): not checked", checkpoint
        )
        return data
    problems = changed_options(record.get("config", {}), run_record(config, {})["config"])
    if problems:
        raise LoraDBError(
            f"--resume-from-checkpoint {checkpoint}: {'; '.join(problems)}; a resumed run may change only the steps, "
            "checkpointing, validation and memory-only options, and lower its learning rates: use the checkpoint's "
            "values, or start afresh with --overwrite (or another --output-dir)"
        )
    changes = data_changes(record.get("data", {}), data)
    if changes:
        raise LoraDBError(
            f"--resume-from-checkpoint {checkpoint}: the training images changed since it was saved "
            f"({'; '.join(changes)}); put them back as they were, or start afresh with --overwrite"
        )
    return data


def retire_later_checkpoints(output_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints after `step` (an abandoned continuation) to OUTPUT_DIR/abandoned/; returns the new paths."""
    moved = []
    for path in list_checkpoints(output_dir):
        if int(CHECKPOINT_PATTERN.match(path.name).group(1)) <= step:
            continue
        target = output_dir / ABANDONED_DIR / path.name
        number = 2
        while target.exists():
            target, number = output_dir / ABANDONED_DIR / f"{path.name}-{number}", number + 1
        target.parent.mkdir(exist_ok=True)
        shutil.move(path, target)
        moved.append(target)
    if moved:
        logger.warning(
            "resuming from step %d: moved %d later checkpoint(s) of the abandoned continuation to %s",
            step,
            len(moved),
            output_dir / ABANDONED_DIR,
        )
    return moved
