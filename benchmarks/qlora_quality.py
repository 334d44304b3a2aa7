"""What a quantized base costs the adapter: the same DreamBooth run on tiny-world's bf16, NF4 and int8 bases.

    python benchmarks/qlora_quality.py                          # seeds 0-4, bf16 / nf4 / int8 (see the README)
    python benchmarks/qlora_quality.py --seeds 0 --kinds bf16,nf4 --steps 100 --out /tmp/q

Each training seed trains one adapter per base (400 steps, lr 1e-3, rank 4, bf16 compute, a subject of
lora_db.synthetic.subjects, the heart by default), then scores it with tiny-world's judge (four samples of "a photo
of sks toy" against the photos, sampling seed 0; the judge is no part of the model) twice: on the base it was
trained on (what `lora-db sample --quantize-base` and `lora-db merge --dequantized-base` give) and on the
full-precision base (what a plain `lora-db merge` gives). Results go to OUT/qlora-quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT = "a photo of sks toy"
KINDS = ("bf16", "nf4", "int8")


def fidelity(adapter: Path, quantize_base: str, photos: Path, num_images: int, steps: int) -> float:
    """CLIP-I of the subject prompt's samples against the photos, as `lora-db train --eval-steps` scores it."""
    from lora_db.adapters.hotswap import load_pipeline
    from lora_db.evaluation.judge import load_model_judge
    from lora_db.evaluation.metrics import TrainingEval
    from lora_db.images import find_images, load_image

    pipe = load_pipeline("tiny-world", [adapter], quantize_base=quantize_base)
    pipe.set_progress_bar_config(disable=True)
    real = [load_image(p) for p in find_images(photos)]
    score = TrainingEval(
        pipe,
        real,
        SUBJECT,
        None,
        judge=load_model_judge("tiny-world", pipe),
        num_images=num_images,
        seed=0,
        num_inference_steps=steps,
    )
    return score(0)["eval/dino"]


def run(kind: str, seed: int, photos: Path, work: Path, args) -> dict:
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    quantize_base = "none" if kind == "bf16" else kind
    started = time.perf_counter()
    train(
        TrainConfig(
            model="tiny-world",
            instance_dir=photos,
            instance_prompt=SUBJECT,
            output_dir=work / f"{kind}-{seed}",
            max_train_steps=args.steps,
            learning_rate=args.learning_rate,
            uncond_prob=0.1,
            mixed_precision="bf16",
            quantize_base=quantize_base,
            seed=seed,
            overwrite=True,
            report_to="none",
        )
    )
    train_s = time.perf_counter() - started
    adapter = work / f"{kind}-{seed}" / "adapter.safetensors"
    trained_on = fidelity(adapter, quantize_base, photos, args.num_images, args.inference_steps)
    on_full = trained_on if kind == "bf16" else fidelity(adapter, "none", photos, args.num_images, args.inference_steps)
    return {"kind": kind, "seed": seed, "train_s": round(train_s, 1), "judge": trained_on, "judge_full_base": on_full}


def table(rows: list[dict], seeds: list[int], kinds: list[str]) -> list[str]:
    by = {(r["kind"], r["seed"]): r for r in rows}
    header = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| base in training | {header} | mean | vs bf16 | merged onto full precision |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    bf16 = statistics.mean(by["bf16", s]["judge"] for s in seeds) if "bf16" in kinds else None
    for kind in kinds:
        scores = [by[kind, s]["judge"] for s in seeds]
        mean = statistics.mean(scores)
        versus = f"{mean - bf16:+.3f}" if bf16 is not None and kind != "bf16" else ""
        full = statistics.mean(by[kind, s]["judge_full_base"] for s in seeds)
        cells = " | ".join(f"{x:.3f}" for x in scores)
        lines.append(f"| {kind} | {cells} | **{mean:.3f}** | {versus} | {full:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated")
    parser.add_argument("--kinds", default=",".join(KINDS), help="bases: bf16, nf4, int8")
    parser.add_argument("--subject", default="heart", help="a subject of lora_db.synthetic.subjects")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--inference-steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path("qlora-quality-runs"))
    args = parser.parse_args()
    import torch

    from lora_db.io import atomic_write_json, atomic_write_text
    from lora_db.synthetic.subjects import SUBJECTS, subject_photos

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        sys.exit(f"--kinds: unknown {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    if args.subject not in SUBJECTS:
        sys.exit(f"--subject: unknown {args.subject}; choose from {', '.join(SUBJECTS)}")
    photos = args.work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for n, photo in enumerate(subject_photos(args.subject)):
        photo.save(photos / f"{args.subject}-{n}.png")
    started = time.perf_counter()
    rows = []
    for seed in seeds:
        for kind in kinds:
            rows.append(run(kind, seed, photos, args.work, args))
            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/qlora_quality.py " + " ".join(sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    result = {"command": command.strip(), "machine": machine, "minutes": (time.perf_counter() - started) / 60}
    result |= {"subject": args.subject, "steps": args.steps, "learning_rate": args.learning_rate, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "qlora-quality.json", result)
    text = [
        f"# What a quantized base costs the adapter (tiny-world, the {args.subject}: judge score of its prompt)",
        "",
        f"`{result['command']}`",
        "",
        f"{machine}, {result['minutes']:.1f} min. Each adapter is sampled on the base it was trained on; the last",
        "column puts it on the full-precision base instead (a plain `lora-db merge`).",
        "",
        *table(rows, seeds, kinds),
        "",
    ]
    atomic_write_text(args.out / "qlora-quality.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
