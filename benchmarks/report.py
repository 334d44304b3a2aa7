"""The markdown table and bar chart of a benchmarks/memory.py results file (PIL only, no matplotlib).

python benchmarks/report.py benchmarks/results/cpu.json      # rewrites cpu.md and cpu.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GiB = 2**30
REFERENCE = "full-fp32-adamw"
TARGET = "lora-bf16-ckpt-8bit-cached"


def shown_bytes(row: dict) -> tuple[int | None, bool]:
    """What a row's bar shows: the measured peak, or for a row not run its estimate (flagged)."""
    if row.get("status") == "measured":
        return row["measured_bytes"], False
    if "estimate" in row:
        return row["estimate"]["peak_bytes"], True
    return None, False


def size(value: int) -> str:
    if abs(value) >= GiB:
        return f"{value / GiB:.2f} GiB"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _ratio(row: dict, reference: dict | None) -> str:
    mine, mine_estimated = shown_bytes(row)
    theirs, theirs_estimated = shown_bytes(reference) if reference else (None, False)
    if not mine or not theirs:
        return ""
    flag = " (est.)" if mine_estimated or theirs_estimated else ""
    return f"{mine / theirs:.0%}{flag}"


def markdown_table(info: dict, rows: list[dict], commands: dict) -> str:
    device = info["device"]
    where = "peak allocated (CUDA)" if device == "cuda" else "peak RSS − baseline"
    lines = [
        f"# lora-db memory benchmark ({device})",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory_gib']} GiB RAM"
        + (f", {info['gpu']} ({info['gpu_memory_gib']} GiB)" if "gpu" in info else "")
        + f"; torch {info['torch']}, Python {info['python']}.",
        "",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        group = [row for row in rows if row["model"] == model]
        reference = next((row for row in group if row["configuration"] == REFERENCE), None)
        lines += [f"## {model}", "", f"`{commands.get(model, '')}`", ""]
        lines += [
            f"| configuration | trainable params | adapter | {where} | estimate | error "
            "| growth in loop, measured / est. | step (s) | CUDA estimate + context | vs full FT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in group:
            lines.append(_table_row(row, reference))
        lines += ["", *_findings(group, reference), ""]
    lines += [_COLUMNS_CUDA if device == "cuda" else _COLUMNS_CPU, ""]
    return "\n".join(lines)


_COMMON = (
    "*estimate*: `lora-db estimate` for this device; *error*: (estimate − measured) / measured. *CUDA estimate*: "
    "`lora-db estimate --device cuda` plus the ~0.5 GiB CUDA context it prints apart. *vs full FT*: peak / the "
    'peak of full-fp32-adamw ("est." where either is an estimate). *step*: median wall-clock time of the steps '
    "after warm-up."
)
_COLUMNS_CPU = (
    "Columns: *peak RSS − baseline*: the child process's peak resident memory during the training loop minus its "
    "resident memory just before loading the model, after it had trained the tiny model with the same options "
    "(libraries, lazily imported code and thread pools loaded, as a CUDA context would be). Children run with "
    "MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the resident set as they leave a GPU allocator's count. "
    "*growth in loop*: peak minus the memory at the loop's start, measured / estimated. " + _COMMON
)
_COLUMNS_CUDA = (
    "Columns: *peak allocated*: torch.cuda.max_memory_allocated over the training loop, with the peak reserved "
    "by the caching allocator and the CUDA context (driver-reported use beyond the allocator) beside it. " + _COMMON
)


def _table_row(row: dict, reference: dict | None) -> str:
    est = row.get("estimate")
    cuda = row.get("estimate_cuda") or (est if est and est["device"] == "cuda" else None)
    cells = [f"{row['configuration']}<br>{row['label']}"]
    if row.get("status") == "measured":
        growth = f"{size(row['growth_bytes'])} / {size(row['estimated_growth_bytes'])}" if "growth_bytes" in row else ""
        measured = size(row["measured_bytes"])
        if "cuda_max_reserved_bytes" in row:
            measured += f" (reserved {size(row['cuda_max_reserved_bytes'])}, context {size(row['cuda_context_bytes'])})"
        cells += [
            f"{row['trainable_parameters']:,}",
            size(row["adapter_bytes"]),
            measured,
            size(row.get("predicted_bytes", est["peak_bytes"] + est.get("process_bytes", 0))),
            f"{row['estimate_error']:+.1%}",
            growth,
            f"{row['step_time_s']:.2f}",
        ]
    else:
        cells += [
            f"{est['trainable_parameters']:,}" if est else "",
            "",
            row["status"],
            size(est["peak_bytes"] + est.get("process_bytes", 0)) if est else "",
            "",
            "",
            "",
        ]
    cells += [f"{size(cuda['peak_bytes'])} + {size(cuda['context_bytes'])}" if cuda else "", _ratio(row, reference)]
    return "| " + " | ".join(cells) + " |"


def _findings(group: list[dict], reference: dict | None) -> list[str]:
    """The target configuration against every full fine-tuning row, and the estimate's error range."""
    target = next((row for row in group if row["configuration"] == TARGET), None)
    lines = []
    for full in (row for row in group if row["configuration"].startswith("full-") and target):
        ratio = _ratio(target, full)
        if not ratio:
            continue
        line = f"- {TARGET} / {full['configuration']}: peak memory {ratio}"
        if target.get("status") == "measured" and full.get("status") == "measured":
            line += f", step time {target['step_time_s'] / full['step_time_s']:.2f}x"
        lines.append(line + ".")
    cuda = target and (target.get("estimate_cuda") or target.get("estimate"))
    if cuda and cuda["device"] == "cuda":
        lines.append(
            f"- {TARGET} on CUDA (estimated): {size(cuda['peak_bytes'])} allocated at the peak, "
            f"{size(cuda['total_bytes'])} with the CUDA context."
        )
    errors = [row["estimate_error"] for row in group if "estimate_error" in row]
    if errors:
        lines.append(f"- estimate error: {min(errors):+.1%} to {max(errors):+.1%} over {len(errors)} measured rows.")
    return lines


# -- the chart ---------------------------------------------------------------------------------------------------

WIDTH, ROW, LABEL_W, PAD = 1200, 30, 330, 24
MEASURED, ESTIMATED, REFERENCE_LINE, MARK = (52, 101, 164), (170, 190, 215), (200, 60, 40), (20, 20, 20)


def draw_chart(rows: list[dict], info: dict) -> Image.Image:
    """One panel per model: a bar per configuration, full fine-tuning's peak as the reference line."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    font, bold = ImageFont.load_default(size=14), ImageFont.load_default(size=17)
    heights = [3 * PAD + ROW * sum(1 for row in rows if row["model"] == m) for m in models]
    image = Image.new("RGB", (WIDTH, 70 + sum(heights) + 40), "white")
    draw = ImageDraw.Draw(image)
    what = "peak CUDA memory allocated" if info["device"] == "cuda" else "peak resident memory minus process baseline"
    draw.text((PAD, 12), f"lora-db training step: {what} per configuration", font=bold, fill=MARK)
    draw.text(
        (PAD, 36),
        f"{info['cpu']} ({info['cpus']} CPUs). Dark bar: measured; light bar: estimated, not run; "
        "black tick: lora-db estimate; red line and %: full fine-tuning (fp32 AdamW)",
        font=font,
        fill=(90, 90, 90),
    )
    top = 70
    for model, height in zip(models, heights, strict=True):
        _panel(draw, [row for row in rows if row["model"] == model], model, top, font, bold)
        top += height
    return image


def _panel(draw: ImageDraw.ImageDraw, group: list[dict], model: str, top: int, font, bold) -> None:
    draw.text((PAD, top), model, font=bold, fill=MARK)
    values = [shown_bytes(row)[0] or 0 for row in group]
    estimates = [row["estimate"]["peak_bytes"] for row in group if "estimate" in row]
    scale_max = max(values + estimates + [1])
    left, right = LABEL_W, WIDTH - 190
    reference = next((row for row in group if row["configuration"] == REFERENCE), None)
    for i, row in enumerate(group):
        y = top + 2 * PAD + i * ROW
        draw.text((PAD, y + 4), row["configuration"], font=font, fill=MARK)
        value, estimated = shown_bytes(row)
        if value is None:
            draw.text((left + 6, y + 4), row.get("status", "")[:90], font=font, fill=(120, 120, 120))
            continue
        end = left + (right - left) * value / scale_max
        draw.rectangle((left, y + 3, end, y + ROW - 5), fill=ESTIMATED if estimated else MEASURED)
        if "estimate" in row and not estimated:
            x = left + (right - left) * row["estimate"]["peak_bytes"] / scale_max
            draw.line((x, y, x, y + ROW - 2), fill=MARK, width=3)
        ratio = _ratio(row, reference)
        text = size(value) + (f"  {ratio}" if ratio and row is not reference else "")
        draw.text((max(end, left) + 8, y + 4), text, font=font, fill=MARK)
    if reference is not None and shown_bytes(reference)[0]:
        x = left + (right - left) * shown_bytes(reference)[0] / scale_max
        bottom = top + 2 * PAD + len(group) * ROW
        draw.line((x, top + 2 * PAD - 6, x, bottom), fill=REFERENCE_LINE, width=2)


def main() -> None:
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown_table(results["machine"], results["rows"], results["commands"]))
    draw_chart(results["rows"], results["machine"]).save(path.with_suffix(".png"))


if __name__ == "__main__":
    main()
