"""The checkpoint plot of `lora-db eval` on a run folder: subject fidelity against the training step, drawn with PIL.

One line per subject prompt and metric (the judge's DINO when there is a judge, else CLIP-I; and pixel), never
averaged with control prompts; the ceiling and the photos among themselves as reference lines; the best checkpoint
(by the subject prompts' judge score, else CLIP-I) in the title. The base model is step 0: a LoRA starts as it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lora_db.images import save_png

METRIC_NAMES = {"clip_i": "CLIP-I", "dino": "DINO", "pixel": "pixel"}
PALETTE = ((200, 40, 40), (60, 150, 60), (230, 130, 20), (20, 150, 160), (150, 60, 170), (120, 90, 40))
PRIOR_COLOUR = (40, 90, 200)


def plot_series(rows: Sequence[dict], standing: dict, metric: str, with_class: bool):
    """(lines, references) of the checkpoint plot: the data `save_plot` draws.

    `standing` maps each subject prompt to its reference rows (`photos`, `ceiling`); only those prompts are drawn."""
    stepped = sorted((r for r in rows if r["step"] is not None), key=lambda r: r["step"])
    base = next((r for r in rows if r["adapter"] == "none"), None)
    points = ([(0, base)] if base else []) + [(r["step"], r) for r in stepped]
    metrics = (metric, "pixel")
    lines = []
    for number, prompt in enumerate(standing):
        for k, name in enumerate(metrics):
            values = [(step, row["prompts"][prompt][name]) for step, row in points]
            colour = PALETTE[(2 * number + k) % len(PALETTE)]
            lines.append((f"{METRIC_NAMES[name]}: {prompt}", colour, values))
    if with_class:
        prior = [(step, row["class"]["prior_similarity"]) for step, row in points if row["class"]]
        lines.append(("prior similarity (class prompt vs base)", PRIOR_COLOUR, prior))
    references = []
    first = next(iter(standing.values()), None)  # photos and ceiling do not depend on the prompt
    for k, name in enumerate(metrics if first else ()):
        colour = PALETTE[k]
        for reference, style in (("ceiling", "dashed"), ("photos", "dotted")):
            if first[reference][name] is not None:
                references.append((f"{reference} {METRIC_NAMES[name]}", colour, first[reference][name], style))
    return lines, references


def save_plot(path: Path, rows: Sequence[dict], standing: dict, metric: str, with_class: bool, best: dict | None):
    """Subject fidelity and prior similarity against the training step: where a run starts to overfit."""
    lines, references = plot_series(rows, standing, metric, with_class)
    title = ""
    if best is not None:
        title = (
            f"best checkpoint: {best['label']} ({METRIC_NAMES[best['metric']]} {best['score']:.3f}, subject prompts)"
        )
    return save_png(line_chart(lines, references, "training step (0: the base model)", title), path)


def line_chart(lines, references, x_label: str, title: str = "", width: int = 640) -> Image.Image:
    """Solid `lines` (name, colour, [(x, y)]) over dashed or dotted `references` (name, colour, y, style)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    legend = [(name, colour, "solid") for name, colour, values in lines if values]
    legend += [(name, colour, style) for name, colour, _, style in references]
    top = 34 if title else 20
    left, right, bottom = 50, width - 20, top + 300
    image = Image.new("RGB", (width, bottom + 46 + 14 * len(legend)), "white")
    draw = ImageDraw.Draw(image)
    points = [p for _, _, values in lines for p in values]
    xs = [x for x, _ in points] or [0, 1]
    ys = [y for _, y in points if y is not None] + [y for _, _, y, _ in references]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys, default=0.0)), max(1.0, max(ys, default=1.0))

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    if title:
        draw.text((left, 10), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((8, at(x0, y)[1] - 6), f"{y:.2f}", fill="black", font=font)
        draw.line((left, at(x0, y)[1], right, at(x0, y)[1]), fill=(230, 230, 230))
    for x in sorted(set(xs)):
        draw.text((at(x, y0)[0] - 8, bottom + 4), str(x), fill="black", font=font)
    draw.text(((left + right) // 2 - 80, bottom + 20), x_label, fill="black", font=font)
    for _, colour, y, style in references:
        _dashed(draw, at(x0, y), at(x1, y), colour, DASHES[style])
    for _, colour, values in lines:
        coords = [at(x, y) for x, y in values if y is not None]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
    for n, (name, colour, style) in enumerate(legend):
        y = bottom + 40 + 14 * n
        if style == "solid":
            draw.line((left, y + 6, left + 20, y + 6), fill=colour, width=2)
        else:
            _dashed(draw, (left, y + 6), (left + 20, y + 6), colour, DASHES[style])
        draw.text((left + 26, y), name, fill="black", font=font)
    return image


DASHES = {"dashed": 6.0, "dotted": 2.0}


def _dashed(draw, start, end, colour, dash: float) -> None:
    (xa, ya), (xb, yb) = start, end
    length = math.hypot(xb - xa, yb - ya)
    for k in range(int(length // (2 * dash)) + 1):
        a, b = 2 * k * dash / length, min(1.0, (2 * k + 1) * dash / length)
        draw.line((xa + (xb - xa) * a, ya + (yb - ya) * a, xa + (xb - xa) * b, ya + (yb - ya) * b), fill=colour)
