"""The page's workspace: one folder that every path typed in the page must stay inside, and the photos in it.

    ws = Workspace(Path("~/dreambooth").expanduser())
    ws.path("photos/dog", "Photos folder")     # -> /home/me/dreambooth/photos/dog
    ws.path("../etc", "Output folder")         # LoraDBError: `..` is not allowed ...

A path is relative to the workspace, or absolute and inside it; `..` is refused as typed, and symbolic links are
resolved before the check, so a link inside the workspace that points out of it is refused too. Uploaded photos are
copied in under safe names; captions are the NAME.txt files training reads beside each photo.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_db.errors import LoraDBError
from lora_db.images import IMAGE_EXTENSIONS, find_images
from lora_db.io import atomic_write, atomic_write_text

UPLOAD_NAME = re.compile(r"[^0-9A-Za-z_.-]+")


class OutsideWorkspace(LoraDBError):
    """A path typed in the page that leads out of the workspace."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        root = Path(os.path.realpath(Path(self.root).expanduser()))
        if not root.is_dir():
            raise LoraDBError(f"workspace {self.root}: no such folder; create it or choose another")
        object.__setattr__(self, "root", root)

    def path(self, text: str | os.PathLike | None, what: str) -> Path:
        """The real path of `text`, typed in the page as `what`, or one line saying why it is refused."""
        text = str(text or "").strip()
        example = "e.g. runs/sks-dog"
        if not text:
            raise LoraDBError(f"{what} is empty; give a path inside the workspace, {example}")
        typed = Path(text)
        if ".." in typed.parts:
            raise OutsideWorkspace(
                f"{what} {text}: `..` is not allowed; paths stay inside the workspace {self.root}, {example}"
            )
        real = Path(os.path.realpath(self.root / typed))  # an absolute `typed` replaces the root here
        if real != self.root and self.root not in real.parents:
            raise OutsideWorkspace(
                f"{what} {text} is outside the workspace {self.root}; give a path inside it, {example}"
            )
        return real

    def show(self, path: str | os.PathLike) -> str:
        """`path` as the page shows it: relative to the workspace."""
        path = Path(path)
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def model(self, text: str) -> str:
        """The model field: a built-in (tiny, tiny-world, random:...), a folder inside the workspace, or a hub id."""
        text = (text or "").strip()
        if not text:
            raise LoraDBError("Model is empty; give tiny-world, a hub id such as thu-ml/unidiffuser-v1, or a folder")
        if text in ("tiny", "tiny-world") or text.startswith("random:"):
            return text
        if Path(text).is_absolute() or ".." in Path(text).parts or (self.root / text).exists():
            return str(self.path(text, "Model folder"))
        return text  # a hub id: diffusers reads it from the cache or the hub


def import_photos(folder: Path, uploads: list[str | os.PathLike]) -> list[Path]:
    """Copy uploaded files into `folder` under safe names (a name taken gets -2, -3, ...); only photos."""
    refused = [Path(u).name for u in uploads if Path(u).suffix.lower() not in IMAGE_EXTENSIONS]
    if refused:
        raise LoraDBError(f"{refused[0]} is not a jpg/jpeg/png/webp/bmp photo; upload photos in one of those formats")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for upload in uploads:
        upload = Path(upload)
        stem = UPLOAD_NAME.sub("_", upload.stem).strip("._") or "photo"
        target, number = folder / f"{stem}{upload.suffix.lower()}", 2
        while target.exists():
            target, number = folder / f"{stem}-{number}{upload.suffix.lower()}", number + 1
        written.append(atomic_write(target, lambda tmp, source=upload: shutil.copyfile(source, tmp)))
    return written


def photos(folder: Path) -> list[Path]:
    """The photos training would read from `folder` (none if it does not exist yet)."""
    return find_images(folder, "Photos folder", allow_empty=True)


def captions(folder: Path) -> list[list[str]]:
    """[photo name, caption] for each photo: the text of NAME.txt beside it, "" where there is none."""
    rows = []
    for photo in photos(folder):
        caption = photo.with_suffix(".txt")
        rows.append([photo.name, caption.read_text(encoding="utf-8-sig").strip() if caption.is_file() else ""])
    return rows


def save_captions(folder: Path, rows: list[list[str]]) -> int:
    """Write each row's caption to NAME.txt beside its photo (an empty caption removes it: the prompt applies)."""
    known = {photo.name: photo for photo in photos(folder)}
    saved = 0
    for name, caption in rows:
        if name not in known:
            raise LoraDBError(f"{name} is not a photo in {folder}; reload the photos and edit the captions again")
        path = known[name].with_suffix(".txt")
        caption = " ".join(str(caption or "").split())
        if caption:
            atomic_write_text(path, caption + "\n")
            saved += 1
        elif path.is_file():
            path.unlink()
    return saved
