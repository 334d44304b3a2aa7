"""README.md's commands as written, `lora-db demo` among them, and what the demo must show: the subject learned.

The demo trains tiny-world on a subject it never saw; its samples of the subject prompt after training must be
measurably closer to the photos than before, by the model-free pixel score (each sample against its nearest photo,
16 x 16 thumbnails), recomputed here from the grid's own images.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from lora_db.adapters.sample import GRID_MIN_CELL
from lora_db.evaluation.metrics import nearest_pixel_similarity, pixel_thumbnails
from lora_db.images import png_text
from lora_db.synthetic.subjects import subject_photos

MARGIN = 0.06  # measured: 0.766 before, 0.903 after (heart, seed 0); the quality benchmark's mean gain is 0.078


def grid_cells(path, rows: int, columns: int) -> list[list[Image.Image]]:
    """The grid's cells at the samples' 64 px: they sit bottom right, below the title and right of the row labels,
    each enlarged to GRID_MIN_CELL pixels by a whole factor (so shrinking them back is exact)."""
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    side = GRID_MIN_CELL
    left, top = grid.width - columns * side, grid.height - rows * side
    return [
        [
            grid.crop((left + c * side, top + r * side, left + (c + 1) * side, top + (r + 1) * side)).resize(
                (64, 64), Image.Resampling.BOX
            )
            for c in range(columns)
        ]
        for r in range(rows)
    ]


@pytest.mark.slow
def test_readme_commands_run_and_the_demo_grid_shows_the_subject_learned(readme_run):
    folder, outputs = readme_run
    (printed,) = [output for command, output in outputs.items() if command.startswith("lora-db demo")]
    grid = folder / "demo" / "before-after.png"
    assert f"before/after grid: {grid.relative_to(folder)}" in printed
    scores = re.search(r"before (\d\.\d+), after (\d\.\d+)", printed)
    before, after = float(scores.group(1)), float(scores.group(2))
    assert after > before + MARGIN, printed[-2000:]

    # The grid itself: titled with the prompt, the photos, then before and after; its cells score as printed.
    text = png_text(grid)
    assert text["prompt"] == "a photo of sks toy" and "before training" in text["rows"]
    record = json.loads((folder / "demo" / "demo.json").read_text())
    assert record["subject"] == "heart" and record["pixel_after"] == pytest.approx(after, abs=1e-3)
    photos, samples_before, samples_after = grid_cells(grid, rows=3, columns=5)
    reference = pixel_thumbnails(subject_photos("heart"))
    assert nearest_pixel_similarity(pixel_thumbnails(photos), reference) > 0.99  # the first row is the photos
    measured = [nearest_pixel_similarity(pixel_thumbnails(row), reference) for row in (samples_before, samples_after)]
    assert measured == pytest.approx([before, after], abs=1e-3)
    assert (folder / "demo" / "run" / "adapter.safetensors").is_file()
