"""`--dataset-config FILE.toml`: several concepts in one run, each with its folder, prompts, repeats and weight.

    [[concept]]
    folder = "photos/dog"                    # the subject's photos (relative paths: to this file's folder)
    instance_prompt = "a photo of sks dog"   # or leave it out and put NAME.txt captions beside every photo
    repeats = 2                              # each photo counts this many times per epoch (kohya's num_repeats)
    class_dir = "class/dog"                  # optional prior preservation for this concept, with class_prompt
    class_prompt = "a photo of a dog"
    weight = 1.0                             # its examples' share of the loss (OneTrainer's loss weight)

    [[concept]]
    folder = "photos/cat"
    instance_prompt = "a photo of zwx cat"

The single-concept options (--instance-dir, --instance-prompt, --class-dir, --class-prompt) are the shorthand for
a file of one concept: `concepts(config)` gives the same list either way, and training reads only that list.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_db.config.fields import expand_path, toml_table
from lora_db.errors import LoraDBError
from lora_db.logs import printable

KEYS = ("folder", "instance_prompt", "repeats", "class_dir", "class_prompt", "weight")
MAX_REPEATS = 10_000


@dataclass(frozen=True)
class Concept:
    folder: Path
    instance_prompt: str | None = None  # None: every photo has its caption file
    repeats: int = 1
    class_dir: Path | None = None
    class_prompt: str | None = None
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def read_dataset_config(path: Path) -> list[Concept]:
    """The concepts of a dataset config, each key and value checked; errors name the file, the concept and the key."""
    path = Path(path)
    raw = toml_table(path, "--dataset-config")
    unknown = [key for key in raw if key != "concept"]
    tables = raw.get("concept")
    if unknown or not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        found = f"unknown key {printable(unknown[0])!r}" if unknown else "no [[concept]] tables"
        raise LoraDBError(f"--dataset-config {path}: {found}; write one [[concept]] table per concept")
    return [_concept(path, number, table) for number, table in enumerate(tables, start=1)]


def _concept(path: Path, number: int, table: dict[str, Any]) -> Concept:
    where = f"--dataset-config {path}: concept {number}"
    for key in table:
        if key not in KEYS:
            raise LoraDBError(f"{where}: unknown key {printable(key)!r}; known keys: {', '.join(KEYS)}")

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise LoraDBError(f"{where}: {key} must be non-empty text, not {printable(repr(value))}")
        return value

    def folder(key: str) -> Path | None:
        value = text(key)
        return None if value is None else path.parent / expand_path(value, f"{where}: {key}")

    if "folder" not in table:
        raise LoraDBError(f"{where}: no folder; every concept names the folder of its photos")
    repeats, weight = table.get("repeats", 1), table.get("weight", 1.0)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise LoraDBError(
            f"{where}: repeats must be a whole number in [1, {MAX_REPEATS}], not {printable(repr(repeats))}"
        )
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (math.isfinite(weight) and weight > 0):
        raise LoraDBError(f"{where}: weight must be a positive number, not {printable(repr(weight))}")
    concept = Concept(
        folder=folder("folder"),
        instance_prompt=text("instance_prompt"),
        repeats=repeats,
        class_dir=folder("class_dir"),
        class_prompt=text("class_prompt"),
        weight=float(weight),
    )
    if (concept.class_dir is None) != (concept.class_prompt is None):
        given, missing = ("class_prompt", "class_dir") if concept.class_dir is None else ("class_dir", "class_prompt")
        raise LoraDBError(f"{where}: {given} needs {missing} too (prior preservation uses both), or drop {given}")
    return concept


def check_concepts(concepts: list[Concept], where: str) -> None:
    """No concept's class images may mix with any concept's photos; no folder is two concepts."""
    folders = [c.folder.resolve() for c in concepts]
    if len(set(folders)) < len(folders):
        raise LoraDBError(f"{where}: two concepts share the folder {concepts[0].folder}; give each its own")
    for concept in concepts:
        if concept.class_dir is None:
            continue
        classes = concept.class_dir.resolve()
        for photos in folders:
            if photos == classes or photos in classes.parents or classes in photos.parents:
                raise LoraDBError(
                    f"{where}: class_dir {concept.class_dir} overlaps a concept's folder {photos}: generated class "
                    "images would mix with the photos; give the class images a folder of their own"
                )
