"""Does the adapter learn the subject? DreamBooth configurations over tiny-world's subject set, scored like the paper.

    python benchmarks/quality.py                                        # every configuration, the 12 held-out subjects
    python benchmarks/quality.py --configs lora-r4 --subjects heart,arrow --out /tmp/q

The quality side of benchmarks/memory.py. For each subject of lora_db.synthetic.subjects (shapes and patterns
tiny-world never saw, five photos each) and each configuration, `lora_db.train` trains on "a photo of sks toy";
then `lora_db.evaluate` (the code of `lora-db eval`) scores, at the same seeds:

- the adapter: the judge (tiny-world's self-supervised encoder, no part of the model) and the model-free pixel
  score against the subject's photos, on the subject prompt and a recontextualisation ("... on the beach");
- (a) the base model given the subject prompt;
- (b) the base model given the subject's description in tiny-world's words (`--describe`: the adapter must beat
  words);
- (c) the recommended configuration's adapter of *another* subject, scored against this subject's photos;
- the photos among themselves and the ceiling (photos through the VAE);
- prior similarity: class-prompt samples against the base model's, what prior preservation protects.

Full fine-tuning has no adapter: its U-ViT replaces the base's in a copy of the model folder. nf4 adapters are
scored on the nf4 base they were trained on (`eval --quantize-base nf4`). Results: OUT/NAME.json, .md and .png,
with the mean and spread over subjects per configuration and the recommended configuration's margins.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from lora_db.config.train import TINY_WORLD_RECOMMENDED

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT = "a photo of sks toy"
RECONTEXT = "a photo of sks toy on the beach"
CLASS = "a photo of a toy"
# name -> (options of TrainConfig, what the row shows)
MLP_TARGETS = list(TINY_WORLD_RECOMMENDED["target_modules"])  # attention and MLP
LONG = {k: TINY_WORLD_RECOMMENDED[k] for k in ("max_train_steps", "learning_rate")}  # the row's own steps and rate
DEFAULT_STEPS = 400  # rows that name no steps of their own
CONFIGS = {
    "lora-r4": ({"rank": 4}, "LoRA rank 4"),
    "lora-r1": ({"rank": 1}, "LoRA rank 1"),
    "lora-r16": ({"rank": 16}, "LoRA rank 16"),
    "lora-r8-mlp": ({"rank": 8, "target_modules": MLP_TARGETS}, "LoRA rank 8, attention + MLP"),
    "lora-r8-mlp-long": (
        {"rank": 8, "target_modules": MLP_TARGETS, **LONG},
        "LoRA rank 8, attention + MLP, 1200 steps at lr 2e-3 (recommended)",
    ),
    "lora-r8-mlp-long-prior": (
        {"rank": 8, "target_modules": MLP_TARGETS, **LONG, "prior": True},
        "the same + prior preservation",
    ),
    "lora-r4-prior": ({"rank": 4, "prior": True}, "LoRA rank 4 + prior preservation"),
    "lora-r4-text-encoder": ({"rank": 4, "train_text_encoder": True}, "LoRA rank 4 + text-encoder LoRA"),
    "lora-r4-nf4": ({"rank": 4, "quantize_base": "nf4", "mixed_precision": "bf16"}, "QLoRA rank 4 (nf4 base)"),
    "full": ({"method": "full", "learning_rate": 1e-4}, "full fine-tuning"),
    # Issue 20's rows: other optimizers, an average of the weights, other adapters, a learned identifier.
    "lora-r4-prodigy": ({"rank": 4, "optimizer": "prodigy", "learning_rate": 1.0}, "LoRA rank 4, Prodigy (lr 1.0)"),
    "lora-r4-ema": ({"rank": 4, "use_ema": True}, "LoRA rank 4 + EMA of the weights (decay 0.995)"),
    "lokr-r4": ({"adapter_type": "lokr", "rank": 4}, "LoKr rank 4"),
    "loha-r4": ({"adapter_type": "loha", "rank": 4}, "LoHa rank 4"),
    "lora-r4-pivotal": (
        {"rank": 4, "train_token": "sks", "init_token": "toy"},
        "LoRA rank 4 + pivotal tuning (sks a new token, started at toy)",
    ),
}
RECOMMENDED = "lora-r8-mlp-long"


def shares_an_eval(name: str) -> bool:
    """Whether the row's adapter is scored in one eval with the others: LoRA on the full-precision base (peft puts
    one adapter kind into a layer; nf4 and full fine-tuning need bases of their own)."""
    return name not in ("full", "lora-r4-nf4") and CONFIGS[name][0].get("adapter_type", "lora") == "lora"


# Rows whose adapter can stand in for (c): loaded in the subject's own eval, without a learned token
OTHER_FROM = [name for name, (options, _) in CONFIGS.items() if shares_an_eval(name) and "train_token" not in options]
BASELINES = {
    "base": "(a) base model, subject prompt",
    "describe": "(b) base model, describing prompt",
    "other": "(c) another subject's adapter",
}


def write_photos(subject: str, folder: Path) -> Path:
    from lora_db.synthetic.subjects import subject_photos

    folder.mkdir(parents=True, exist_ok=True)
    for n, photo in enumerate(subject_photos(subject)):
        photo.save(folder / f"{subject}-{n}.png")
    return folder


def train_run(name: str, subject: str, photos: Path, work: Path, args) -> dict:
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    options = dict(CONFIGS[name][0])
    prior = options.pop("prior", False)
    values = {
        "model": "tiny-world",
        "instance_dir": photos,
        "instance_prompt": SUBJECT,
        "output_dir": work / subject / name,
        "max_train_steps": DEFAULT_STEPS,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "overwrite": True,
        "report_to": "none",
        **options,
    }
    if args.steps is not None:  # a given --steps shortens every row, the long ones included (a quick check)
        values["max_train_steps"] = args.steps
    if prior:
        values |= {"class_prompt": CLASS, "class_dir": work / "class", "num_class_images": args.class_images}
    started = time.perf_counter()
    result = train(TrainConfig(**values))
    summary = json.loads((result.output_dir / "summary.json").read_text())
    return {
        "train_s": time.perf_counter() - started,
        "trainable_parameters": summary["trainable_parameters"],
        "output": str(result.adapter_path),
    }


def full_model_folder(unet_dir: Path, folder: Path) -> Path:
    """tiny-world with its U-ViT replaced by a fully fine-tuned one: a complete diffusers folder."""
    from lora_db.models.loading import tiny_world_dir

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_world_dir(), folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(unet_dir, folder / "unet")
    return folder


def run_eval(out: Path, photos: Path, args, describe: str, adapters: list[str], model="tiny-world", quantize="none"):
    from lora_db.config.evaluate import EvalConfig
    from lora_db.evaluation.evaluate import evaluate

    return evaluate(
        EvalConfig(
            out=out,
            instance_dir=photos,
            model=model,
            adapters=adapters,
            prompts=[SUBJECT, RECONTEXT],
            describe=[describe],
            class_prompt=CLASS,
            num_images=args.num_images,
            seed=args.seed,
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale,
            identifier="sks",
            quantize_base=quantize,
            overwrite=True,
        )
    )


def scores(row: dict) -> dict:
    subject, recontext = row["prompts"][SUBJECT], row["prompts"][RECONTEXT]
    return {
        "judge": subject["dino"],
        "pixel": subject["pixel"],
        "judge_recontext": recontext["dino"],
        "prior_similarity": row["class"]["prior_similarity"],
    }


def class_similarity(base_eval: Path, other_eval: Path, num_images: int, seed: int) -> float:
    """Prior similarity of a separately evaluated model: its class samples against the base's, same seeds."""
    from PIL import Image

    from lora_db.evaluation.metrics import ImageEmbedder, paired_similarity
    from lora_db.models.loading import load_pipeline

    embed = ImageEmbedder(load_pipeline("tiny-world"))
    index = 2  # the class prompt comes after the two --prompt values

    def samples(folder: Path, label: str):
        names = [f"{label}_p{index:02d}_seed{seed + i}.png" for i in range(num_images)]
        return [Image.open(folder / "samples" / name) for name in names]

    return paired_similarity(embed(samples(other_eval, "base")), embed(samples(base_eval, "base")))


def evaluate_subject(subject: str, names: list[str], runs: dict, other: str, work: Path, args) -> dict:
    """Every configuration's scores on one subject, and its baselines (a)-(c), photos and ceiling.

    (c) is the --other-from configuration's adapter of the subject `other`."""
    from lora_db.synthetic.subjects import SUBJECTS

    photos, describe = work / subject / "photos", SUBJECTS[subject].describe_prompt
    plain = [n for n in names if shares_an_eval(n)]
    # LoKr and LoHa rows are scored in an eval of their own each
    apart = [n for n in names if CONFIGS[n][0].get("adapter_type", "lora") != "lora"]
    other_adapter = work / subject / "other-subject.safetensors"
    shutil.copyfile(runs[other][args.other_from]["output"], other_adapter)
    result = run_eval(work / subject / "eval", photos, args, describe, [runs[subject][n]["output"] for n in plain]
                      + [str(other_adapter)])  # fmt: skip
    rows = {row["label"]: row for row in result.rows}
    standing = result.standing[SUBJECT]
    out = {
        "base": scores(rows["base"]),
        "describe": {"judge": standing["describe"]["dino"], "pixel": standing["describe"]["pixel"]},
        "other": scores(rows["other-subject"]),
        "photos": {"judge": standing["photos"]["dino"], "pixel": standing["photos"]["pixel"]},
        "ceiling": {"judge": standing["ceiling"]["dino"], "pixel": standing["ceiling"]["pixel"]},
        "description": describe,
        "other_subject": other,
    }
    out |= {n: scores(rows[n]) for n in plain}
    for name in apart:
        own = run_eval(work / subject / f"eval-{name}", photos, args, describe, [runs[subject][name]["output"]])
        out[name] = scores(own.rows[1])
    if "lora-r4-nf4" in names:
        nf4 = run_eval(work / subject / "eval-nf4", photos, args, describe, [runs[subject]["lora-r4-nf4"]["output"]],
                       quantize="nf4")  # fmt: skip
        out["lora-r4-nf4"] = scores(nf4.rows[1])
    if "full" in names:
        folder = full_model_folder(Path(runs[subject]["full"]["output"]), work / subject / "full-model")
        full = run_eval(work / subject / "eval-full", photos, args, describe, [], model=str(folder))
        out["full"] = scores(full.rows[0])
        out["full"]["prior_similarity"] = class_similarity(
            work / subject / "eval", work / subject / "eval-full", args.num_images, args.seed
        )
    return out


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def margins_over_baselines(per_subject: dict, name: str) -> dict:
    """Row `name` minus each baseline, subject by subject: the spread of the gaps and how many are above zero."""
    margins = {}
    for baseline in BASELINES:
        for metric in ("judge", "pixel"):
            gaps = [scores[name][metric] - scores[baseline][metric] for scores in per_subject.values()]
            margins[f"{baseline}/{metric}"] = spread(gaps) | {"above": sum(g > 0 for g in gaps)}
    return margins


def summarise(per_subject: dict, names: list[str], runs: dict) -> dict:
    subjects = list(per_subject)
    rows = {}
    for key in [*names, "base", "describe", "other", "photos", "ceiling"]:
        metrics = per_subject[subjects[0]][key].keys()
        rows[key] = {m: spread([per_subject[s][key][m] for s in subjects]) for m in metrics}
        if key in names:
            rows[key]["train_s"] = statistics.fmean(runs[s][key]["train_s"] for s in subjects)
            rows[key]["trainable_parameters"] = runs[subjects[0]][key]["trainable_parameters"]
    row_margins = {name: margins_over_baselines(per_subject, name) for name in names}
    return {"rows": rows, "margins": row_margins.get(RECOMMENDED, {}), "row_margins": row_margins}


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def markdown(results: dict) -> str:
    summary, n = results["summary"], len(results["subjects"])
    lines = [
        f"Mean ± standard deviation over {n} subjects ({', '.join(results['subjects'])}).",
        "",
        "| row | trainable params | train (s) | judge | pixel | judge, on the beach | prior similarity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {name: label for name, (_, label) in CONFIGS.items()} | BASELINES
    labels |= {"photos": "photos among themselves", "ceiling": "ceiling (photos through the VAE)"}
    for key, row in summary["rows"].items():
        params = f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "-"
        train_s = f"{row['train_s']:.0f}" if "train_s" in row else "-"
        recontext = _cell(row["judge_recontext"]) if "judge_recontext" in row else "-"
        prior = _cell(row["prior_similarity"]) if "prior_similarity" in row else "-"
        lines.append(
            f"| {labels[key]} | {params} | {train_s} | {_cell(row['judge'])} | {_cell(row['pixel'])} | "
            f"{recontext} | {prior} |"
        )
    if summary["margins"]:
        lines += [
            "",
            f"Margins of {CONFIGS[RECOMMENDED][1]} over each baseline, per subject (adapter minus baseline):",
            "",
            "| baseline | judge: mean | min | subjects above | pixel: mean | min | subjects above |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for baseline, label in BASELINES.items():
            j, p = summary["margins"][f"{baseline}/judge"], summary["margins"][f"{baseline}/pixel"]
            lines.append(
                f"| {label} | {j['mean']:+.3f} | {j['min']:+.3f} | {j['above']}/{n} | {p['mean']:+.3f} | "
                f"{p['min']:+.3f} | {p['above']}/{n} |"
            )
    if len(summary["row_margins"]) > 1:
        lines += ["", *margins_table(summary["row_margins"], n), "", *against_first_row(results)]
    lines += ["", f"{results['settings']}. Command: `{results['command']}`."]
    return "\n".join(lines) + "\n"


def margins_table(row_margins: dict, n: int) -> list[str]:
    """Every row's mean margin over (a)-(c), judge then pixel, with the subjects above each baseline."""
    lines = [
        "Every row's margins over the baselines: mean of (row minus baseline) per subject, (subjects above):",
        "",
        "| row | judge - (a) | judge - (b) | judge - (c) | pixel - (a) | pixel - (b) | pixel - (c) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, margins in row_margins.items():
        cells = [
            f"{margins[f'{b}/{m}']['mean']:+.3f} ({margins[f'{b}/{m}']['above']}/{n})"
            for m in ("judge", "pixel")
            for b in BASELINES
        ]
        lines.append(f"| {CONFIGS[name][1]} | " + " | ".join(cells) + " |")
    return lines


def against_first_row(results: dict) -> list[str]:
    """Each other row minus the first configured one, subject by subject: what a variant changes, paired."""
    first, *others = results["configurations"]
    n, metrics = len(results["subjects"]), ("judge", "pixel", "judge_recontext", "prior_similarity")
    lines = [
        f"Each row minus {CONFIGS[first][1]}, per subject: mean (min to max, subjects above):",
        "",
        "| row | judge | pixel | judge, on the beach | prior similarity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in others:
        cells = []
        for metric in metrics:
            gaps = [scores[name][metric] - scores[first][metric] for scores in results["per_subject"].values()]
            above = sum(g > 0 for g in gaps)
            cells.append(f"{statistics.fmean(gaps):+.3f} ({min(gaps):+.3f} to {max(gaps):+.3f}, {above}/{n})")
        lines.append(f"| {CONFIGS[name][1]} | " + " | ".join(cells) + " |")
    return lines


def chart(results: dict):
    """Judge score per row: the mean as a bar, the spread over subjects as a whisker (min to max)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = results["summary"]["rows"]
    labels = {name: label for name, (_, label) in CONFIGS.items()} | BASELINES
    labels |= {"photos": "photos among themselves", "ceiling": "ceiling (VAE round trip)"}
    font, bold = ImageFont.load_default(size=14), ImageFont.load_default(size=17)
    width, row_h, left = 1000, 30, 320
    image = Image.new("RGB", (width, 80 + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    title = (
        f"DreamBooth on tiny-world, {len(results['subjects'])} unseen subjects: judge score (bar: mean, line: range)"
    )
    draw.text((20, 12), title, font=bold, fill="black")

    def x(value: float) -> float:  # -0.5 .. 1 across the plot
        return left + (width - left - 60) * (max(-0.5, value) + 0.5) / 1.5

    draw.line((x(0), 44, x(0), 70 + row_h * len(rows)), fill=(180, 180, 180))
    for i, (key, row) in enumerate(rows.items()):
        y = 60 + i * row_h
        colour = (200, 60, 40) if key in CONFIGS else (120, 120, 120)
        stats = row["judge"]
        draw.text((20, y + 4), labels[key], font=font, fill="black")
        left_end, right_end = sorted((x(0), x(stats["mean"])))  # a negative mean draws left of zero
        draw.rectangle((left_end, y + 6, right_end, y + 20), fill=colour)
        draw.line((x(stats["min"]), y + 13, x(stats["max"]), y + 13), fill="black", width=2)
        draw.text((x(max(stats["max"], stats["mean"])) + 6, y + 4), f"{stats['mean']:.3f}", font=font, fill="black")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    parser.add_argument("--subjects", default=None, help="comma-separated subject names (default: the held-out set)")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"every row's steps (default: the row's own, else {DEFAULT_STEPS})"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA rows (full FT sets its own)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="3 suits tiny-world; eval's default is 8")
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--other-from",
        default=RECOMMENDED,
        choices=OTHER_FROM,
        help=f"baseline (c): this configuration's adapter of the next subject, trained even when --configs "
        f"leaves it out (default {RECOMMENDED})",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quality")
    parser.add_argument("--work", type=Path, default=None, help="where runs go (a temporary folder by default)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]}; choose from {', '.join(CONFIGS)}")
    if args.other_from not in names:
        names.insert(0, args.other_from)  # (c) needs another subject's adapter of this configuration

    import tempfile

    import torch

    from lora_db.logs import quiet_library_logs
    from lora_db.synthetic.subjects import SUBJECTS, held_out_names

    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else held_out_names()
    missing = [s for s in subjects if s not in SUBJECTS]
    if missing or len(subjects) < 2:
        parser.error(f"--subjects: give two or more of {', '.join(SUBJECTS)}")
    torch.set_num_threads(args.threads)
    quiet_library_logs()
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-db-quality-"))
    started = time.perf_counter()
    runs = {}
    for subject in subjects:
        photos = write_photos(subject, work / subject / "photos")
        runs[subject] = {name: train_run(name, subject, photos, work, args) for name in names}
    per_subject = {
        subject: evaluate_subject(subject, names, runs, subjects[(i + 1) % len(subjects)], work, args)
        for i, subject in enumerate(subjects)
    }
    settings = (
        (f"{args.steps} steps for every row, " if args.steps else f"{DEFAULT_STEPS} steps where a row names none, ")
        + f"LoRA lr {args.learning_rate:g} where a row names none, "
        f"{args.num_images} samples per prompt, "
        f"(c) the next subject's {args.other_from} adapter, "
        f"{args.inference_steps} denoising steps, guidance {args.guidance_scale:g}, seed {args.seed}, "
        f"torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"{(time.perf_counter() - started) / 60:.0f} min in all (load average {os.getloadavg()[1]:.1f} over the last "
        "5 min: train times are comparable within one run only)"
    )
    results = {
        "subjects": subjects,
        "configurations": names,
        "per_subject": per_subject,
        "summary": summarise(per_subject, names, runs),
        "settings": settings,
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(results))
    chart(results).save(args.out / f"{args.name}.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
