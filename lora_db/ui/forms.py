"""From the page's fields to `lora-db` command lines, checked by the same config dataclasses as the CLI's options.

    args, config = train_command(workspace, {"model": "tiny", "instance_dir": "photos", ...})
    # args == ["train", "--model", "tiny", "--instance-dir", "/ws/photos", ...]: what the page runs and shows

Every field of TrainConfig is a field of the page (the main ones on top, the rest under "advanced"), with the
help text and choices the CLI's --help shows. The page's values build the config (so a bad value is the CLI's own
one-line error, before anything starts), and the command line holds each value that differs from the config's
default: running it is running `lora-db train` with those options. Paths are checked against the workspace first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_db.config.commands import ExportConfig, MergeConfig
from lora_db.config.evaluate import EvalConfig
from lora_db.config.fields import field_default, field_types, flag_name, option_type
from lora_db.config.train import TrainConfig
from lora_db.ui.workspace import Workspace

# The fields shown above "advanced", in the page's order; the photos' folder has a tab of its own.
MAIN_FIELDS = (
    "model",
    "instance_prompt",
    "output_dir",
    "class_prompt",
    "class_dir",
    "max_train_steps",
    "learning_rate",
    "rank",
    "seed",
    "validation_prompt",
    "validation_steps",
    "checkpointing_steps",
    "mixed_precision",
    "gradient_checkpointing",
    "optimizer",
    "cache_latents",
    "quantize_base",
)
# Changing one of these changes the memory a step needs: the estimate is redone.
MEMORY_FIELDS = (
    "model",
    "rank",
    "resolution",
    "train_batch_size",
    "train_text_encoder",
    "target_modules",
    "class_prompt",
    "mixed_precision",
    "gradient_checkpointing",
    "optimizer",
    "cache_latents",
    "quantize_base",
    "method",
)
# Resume adds the first; the second is a file that names folders of its own, which the page could not keep inside
# the workspace (the Photos tab is the page's one concept).
NOT_IN_PAGE = ("resume_from_checkpoint", "dataset_config")
LABELS = {
    "instance_dir": "Photos folder",
    "output_dir": "Output folder",
    "class_dir": "Class images folder (used with a class prompt)",
    "init_adapter": "Initial adapter",
}

# What the page starts with: a first run on tiny-world, the pretrained model that ships with lora-db.
STARTING_VALUES = {
    "model": "tiny-world",
    "instance_dir": "photos",
    "instance_prompt": "a photo of sks toy",
    "output_dir": "runs/sks-toy",
    "class_dir": "class-images",
    "learning_rate": 1e-3,
    "checkpointing_steps": 100,
    "validation_prompt": "a photo of sks toy",
    "validation_steps": 50,
}


@dataclass(frozen=True)
class PageField:
    """One TrainConfig field as the page shows it."""

    name: str
    kind: str  # bool, choice, int, float, list, text or path
    label: str
    help: str
    default: Any
    choices: tuple[str, ...] | None = None
    group: str | None = None

    @property
    def start(self) -> Any:
        value = STARTING_VALUES.get(self.name, self.default)
        return ", ".join(value) if isinstance(value, list) else value


def train_fields() -> list[PageField]:
    hints = field_types(TrainConfig)
    fields = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_IN_PAGE:
            continue
        base, choices, _ = option_type(hints[f.name])
        kind = {bool: "bool", int: "int", float: "float", list: "list", Path: "path"}.get(
            base, "choice" if choices else "text"
        )
        label = LABELS.get(f.name, f.name.replace("_", " ").capitalize())
        default = field_default(f)
        fields.append(PageField(f.name, kind, label, f.metadata["help"], default, choices, f.metadata.get("group")))
    return fields


def _value(field: PageField, value: Any) -> Any:
    """The page's value as the config takes it: None for an empty box, whole numbers for integer fields."""
    if isinstance(value, str):
        value = value.strip()
    if value in ("", None):
        return None
    if field.kind == "list":
        return [part.strip() for part in str(value).split(",") if part.strip()]
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def train_config(workspace: Workspace, values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from the page's values: paths inside the workspace, then every check `lora-db train` makes."""
    given = {}
    for field in train_fields():
        value = _value(field, values.get(field.name))
        if value is None:
            continue
        if field.kind == "path":
            value = workspace.path(value, field.label)
        elif field.name == "model":
            value = workspace.model(value)
        given[field.name] = value
    if "class_prompt" not in given:
        given.pop("class_dir", None)  # the folder is only asked for with a class prompt
    return TrainConfig(**given)


def command_args(config: Any) -> list[str]:
    """The command-line arguments that build `config`: positional ones in order, then each non-default option."""
    hints = field_types(type(config))
    positional, options = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("argument"):
            positional.append(str(value))
            continue
        if value is None or value == field_default(f):
            continue
        flag = "--" + flag_name(f)
        if option_type(hints[f.name])[0] is bool:
            options.append(flag if value else f"--no-{flag_name(f)}")
        elif isinstance(value, list):
            options += [item for entry in value for item in (flag, str(entry))]
        else:
            options += [flag, str(value)]
    return positional + options


def train_command(workspace: Workspace, values: dict[str, Any]) -> tuple[list[str], TrainConfig]:
    """`lora-db train` arguments for the page's values, and the config they make."""
    config = train_config(workspace, values)
    config.require_run_inputs()
    return ["train", *command_args(config)], config


def resume_args(args: list[str]) -> list[str]:
    """A stopped run's arguments, continued from its latest checkpoint (--overwrite would start it afresh)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume-from-checkpoint":
            skip = True
        elif arg != "--overwrite":
            kept.append(arg)
    return [*kept, "--resume-from-checkpoint", "latest"]


def eval_command(config: TrainConfig, out: Path, num_images: int, steps: int) -> list[str]:
    """`lora-db eval` of a run folder (each checkpoint and the final adapter), with the run's own model and prompts."""
    prompts = [config.instance_prompt] + ([config.validation_prompt] if config.validation_prompt else [])
    evaluation = EvalConfig(
        out=out,
        instance_dir=config.instance_dir,
        model=config.model,
        adapters=[str(config.output_dir)],
        prompts=list(dict.fromkeys(prompts)),
        class_prompt=config.class_prompt,
        num_images=num_images,
        num_inference_steps=steps,
        overwrite=True,
    )
    return ["eval", *command_args(evaluation)]


def merge_command(adapter: Path, model: str, out: Path) -> list[str]:
    return ["merge", *command_args(MergeConfig(adapters=[str(adapter)], out=out, model=model, overwrite=True))]


def export_command(adapter: Path, out: Path) -> list[str]:
    return ["export", *command_args(ExportConfig(adapter=adapter, out=out, overwrite=True))]
