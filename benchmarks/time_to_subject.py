"""How many steps and seconds until an adapter has the subject? tiny-world's held-out subjects, scored while training.

    python benchmarks/time_to_subject.py                                   # 3 subjects, every configuration
    python benchmarks/time_to_subject.py --subjects heart,spiral --configs default,lr-1e-3

Each configuration trains on each subject's five photos through `lora_db.train` with `--eval-steps`, which samples
the model being trained at fixed seeds and scores the samples with tiny-world's judge (`eval/dino`: the encoder that
is no part of the model, as in benchmarks/quality.py) and the pixel score. For every run: the first evaluated step at
which the judge score reaches 90 % of its final value, and the training seconds up to it (the sum of the steps'
`step_time_s`, sampling and scoring left out); the same for 90 % of the best final score of all configurations, a
bar common to every row. Results: OUT/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import MLP_TARGETS, SUBJECT, write_photos  # noqa: E402  (benchmarks/quality.py: the same subject runs)

FRACTION = 0.9
SUBJECTS = "heart,crescent,arrow"  # the first three of the twelve held-out subjects
# name -> (TrainConfig options, eval every N steps, label); options left out keep TrainConfig's defaults.
CONFIGS = {
    "default": ({}, 50, "lora-db's defaults: rank 4 on attention, lr 1e-4, 400 steps"),
    "lr-1e-3": ({"learning_rate": 1e-3}, 50, "rank 4, lr 1e-3 (benchmarks/quality.py's setting)"),
    "lr-1e-3-loraplus": (
        {"learning_rate": 1e-3, "loraplus_lr_ratio": 16.0},
        50,
        "rank 4, lr 1e-3, LoRA+ (B at 16x the rate)",
    ),
    "r8-mlp-lr-1e-3": (
        {"rank": 8, "target_modules": MLP_TARGETS, "learning_rate": 1e-3},
        50,
        "rank 8 on attention + MLP, lr 1e-3",
    ),
    "r8-mlp-lr-2e-3-1200": (
        {"rank": 8, "target_modules": MLP_TARGETS, "learning_rate": 2e-3, "max_train_steps": 1200},
        100,
        "rank 8 on attention + MLP, lr 2e-3, 1200 steps (benchmarks/quality.py's recommended setting)",
    ),
}


def train_curve(name: str, subject: str, photos: Path, work: Path, args) -> dict:
    from lora_db.config.train import TrainConfig
    from lora_db.layout import METRICS_FILE
    from lora_db.training.loop import train

    options, every, _ = CONFIGS[name]
    config = TrainConfig(
        model="tiny-world",
        instance_dir=photos,
        instance_prompt=SUBJECT,
        output_dir=work / subject / name,
        seed=args.seed,
        eval_steps=every,
        num_eval_images=args.num_images,
        validation_inference_steps=args.inference_steps,
        validation_guidance_scale=args.guidance_scale,
        report_to="none",
        overwrite=True,
        **options,
    )
    started = time.perf_counter()
    train(config)
    metrics = [json.loads(line) for line in (config.output_dir / METRICS_FILE).read_text().splitlines() if line]
    seconds, curve = 0.0, []
    for m in metrics:
        seconds += m["step_time_s"]
        if "eval/dino" in m:
            curve.append({"step": m["step"], "train_s": seconds, "judge": m["eval/dino"], "pixel": m["eval/pixel"]})
    step_s = statistics.median(m["step_time_s"] for m in metrics)
    return {"curve": curve, "wall_s": time.perf_counter() - started, "step_s": step_s}


def within_tenth(score: float) -> float:
    """The bar 10 % below a score (FRACTION of it when positive): a judge cosine can end below zero, and 90 % of a
    negative final is above it, a bar its own curve might never reach."""
    return score - (1 - FRACTION) * abs(score)


def first_reaching(curve: list[dict], bar: float) -> dict | None:
    return next((point for point in curve if point["judge"] >= bar), None)


def summarise(runs: dict, names: list[str]) -> dict:
    """Per configuration: final judge score, and steps / seconds to 90 % of it and to 90 % of the best final."""
    finals = {n: statistics.fmean(runs[s][n]["curve"][-1]["judge"] for s in runs) for n in names}
    best = max(finals.values())
    rows = {}
    for name in names:
        own, common = [], []
        for subject in runs:
            curve = runs[subject][name]["curve"]
            own.append(first_reaching(curve, within_tenth(curve[-1]["judge"])))
            common.append(first_reaching(curve, within_tenth(best)))
        reached = [p for p in common if p is not None]
        rows[name] = {
            "final_judge": finals[name],
            "final_judge_sd": statistics.stdev(runs[s][name]["curve"][-1]["judge"] for s in runs)
            if len(runs) > 1
            else 0.0,
            "final_pixel": statistics.fmean(runs[s][name]["curve"][-1]["pixel"] for s in runs),
            "steps": runs[next(iter(runs))][name]["curve"][-1]["step"],
            "step_s": statistics.median(runs[s][name]["step_s"] for s in runs),
            "own_steps": statistics.median(p["step"] for p in own),
            "own_s": statistics.median(p["train_s"] for p in own),
            "common_reached": len(reached),
            "common_steps": statistics.median(p["step"] for p in reached) if reached else None,
            "common_s": statistics.median(p["train_s"] for p in reached) if reached else None,
        }
    return {"best_final": best, "rows": rows}


def markdown(results: dict) -> str:
    summary, n = results["summary"], len(results["subjects"])
    bar = within_tenth(summary["best_final"])
    lines = [
        f"Median over {n} subjects ({', '.join(results['subjects'])}); judge: tiny-world's judge, subject prompt.",
        "",
        f"| configuration | steps | step (s) | final judge | final pixel | steps to 90 % of its final | seconds | "
        f"steps to judge {bar:.3f} (90 % of the best final) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["rows"].items():
        common = (
            f"{row['common_steps']:.0f} ({row['common_reached']}/{n} reach it) | {row['common_s']:.1f}"
            if row["common_steps"] is not None
            else f"not reached (0/{n}) | -"
        )
        lines.append(
            f"| {CONFIGS[name][2]} | {row['steps']} | {row['step_s']:.3f} | {row['final_judge']:.3f} ± "
            f"{row['final_judge_sd']:.3f} | {row['final_pixel']:.3f} | {row['own_steps']:.0f} | {row['own_s']:.1f} | "
            f"{common} |"
        )
    lines += ["", f"{results['settings']}. Command: `{results['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--subjects", default=SUBJECTS, help="comma-separated held-out subject names")
    parser.add_argument("--num-images", type=int, default=4, help="samples per evaluation")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="time-to-subject")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]}; choose from {', '.join(CONFIGS)}")

    import platform

    import torch

    from lora_db.logs import quiet_library_logs
    from lora_db.synthetic.subjects import SUBJECTS as KNOWN

    subjects = [s for s in args.subjects.split(",") if s]
    if any(s not in KNOWN for s in subjects):
        parser.error(f"--subjects: choose from {', '.join(KNOWN)}")
    torch.set_num_threads(args.threads)
    quiet_library_logs()
    started = time.perf_counter()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lora-db-time-to-subject-") as tmp:
        work = Path(tmp)
        for subject in subjects:
            photos = write_photos(subject, work / subject / "photos")
            runs[subject] = {}
            for name in names:
                runs[subject][name] = train_curve(name, subject, photos, work, args)
                final = runs[subject][name]["curve"][-1]
                print(f"{subject} {name}: judge {final['judge']:.3f} at step {final['step']}", flush=True)
    results = {
        "subjects": subjects,
        "runs": runs,
        "summary": summarise(runs, names),
        "settings": (
            f"{args.num_images} samples per evaluation, {args.inference_steps} denoising steps, guidance "
            f"{args.guidance_scale:g}, seed {args.seed}, {args.threads} thread(s), torch {torch.__version__}, "
            f"{platform.machine()}, {(time.perf_counter() - started) / 60:.0f} min in all on a shared machine"
        ),
        "command": "python benchmarks/time_to_subject.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
