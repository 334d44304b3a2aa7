"""The checkpoint plot of `lora-db eval` on a run folder: each metric against the training step, drawn with PIL."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from lora_db.evaluation.metrics import _mean
from lora_db.images import save_png

PLOT_SERIES = (("clip_i", "CLIP-I (subject)", (200, 40, 40)), ("prior_similarity", "prior similarity", (40, 90, 200)))


def save_plot(path: Path, rows: list[dict], with_class: bool) -> Path:
    """Metrics against the training step (PIL line chart): where a run starts to overfit."""

    series = {"clip_i": [], "prior_similarity": [], "diversity": []}
    base = next((r for r in rows if r["adapter"] == "none"), None)
    for row in sorted((r for r in rows if r["step"] is not None), key=lambda r: r["step"]):
        series["clip_i"].append((row["step"], row["clip_i"]))
        series["diversity"].append((row["step"], _mean([p["diversity"] for p in row["prompts"].values()])))
        if with_class and row["class"]:
            series["prior_similarity"].append((row["step"], row["class"]["prior_similarity"]))
    lines = [
        ("CLIP-I (subject fidelity)", (200, 40, 40), series["clip_i"]),
        ("prior similarity (class prompt vs base)", (40, 90, 200), series["prior_similarity"]),
        ("diversity", (60, 150, 60), series["diversity"]),
    ]
    references = [("base CLIP-I", (200, 40, 40), base["clip_i"])] if base else []
    return save_png(line_chart(lines, references, "training step"), path)


def line_chart(lines, references, x_label: str, width: int = 640, height: int = 400) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 20, 20, height - 90
    points = [p for _, _, values in lines for p in values]
    xs = [x for x, _ in points] or [0, 1]
    ys = [y for _, y in points] + [y for _, _, y in references]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys, default=0.0)), max(1.0, max(ys, default=1.0))

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((8, at(x0, y)[1] - 6), f"{y:.2f}", fill="black", font=font)
        draw.line((left, at(x0, y)[1], right, at(x0, y)[1]), fill=(230, 230, 230))
    for x in sorted(set(xs)):
        draw.text((at(x, y0)[0] - 8, bottom + 4), str(x), fill="black", font=font)
    draw.text(((left + right) // 2 - 30, bottom + 20), x_label, fill="black", font=font)
    for _, colour, y in references:
        _dashed(draw, at(x0, y), at(x1, y), colour)
    for _, colour, values in lines:
        coords = [at(x, y) for x, y in values]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
    legend = [(name, colour, "solid") for name, colour, values in lines if values]
    legend += [(name, colour, "dashed") for name, colour, _ in references]
    for n, (name, colour, style) in enumerate(legend):
        y = bottom + 40 + 14 * (n // 2)
        x = left + (n % 2) * 290
        if style == "solid":
            draw.line((x, y + 6, x + 20, y + 6), fill=colour, width=2)
        else:
            _dashed(draw, (x, y + 6), (x + 20, y + 6), colour)
        draw.text((x + 26, y), name, fill="black", font=font)
    return image


def _dashed(draw, start, end, colour, dash: float = 6.0) -> None:
    (xa, ya), (xb, yb) = start, end
    length = math.hypot(xb - xa, yb - ya)
    for k in range(int(length // (2 * dash)) + 1):
        a, b = 2 * k * dash / length, min(1.0, (2 * k + 1) * dash / length)
        draw.line((xa + (xb - xa) * a, ya + (yb - ya) * a, xa + (xb - xa) * b, ya + (yb - ya) * b), fill=colour)
