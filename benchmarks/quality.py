"""Does the adapter learn the subject? DreamBooth configurations on tiny-world, scored like the paper.

    python benchmarks/quality.py                                   # every configuration (see the README for time)
    python benchmarks/quality.py --configs lora-r4,lora-r4-prior --steps 100 --num-images 4 --out /tmp/q

The quality side of benchmarks/memory.py. Each configuration trains on the subject tiny-world never saw (the toy
robot of `lora-db demo-images`) through `lora_db.train`, then `lora_db.evaluate` (the code of
`lora-db eval`) scores every run and the base model at the same seeds: CLIP-I on the subject prompt and on a
recontextualisation ("... on the beach"), CLIP-T with tiny-world's own CLIP, CLIP-I of an unrelated prompt (should
stay low), prior similarity of class-prompt samples to the base model's (what prior preservation protects) and
diversity. Full fine-tuning has no adapter: its U-ViT replaces the base's in a copy of the model folder, and its
class samples are compared with the base model's through the same image encoder. Results go to
OUT/NAME.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT = "a photo of sks robot"
PROMPTS = (SUBJECT, "a photo of sks robot on the beach", "a photo of a red car")
CLASS = "a photo of a robot"
# name -> (options of TrainConfig, what the row shows)
CONFIGS = {
    "lora-r1": ({"rank": 1}, "LoRA rank 1"),
    "lora-r4": ({"rank": 4}, "LoRA rank 4"),
    "lora-r16": ({"rank": 16}, "LoRA rank 16"),
    "lora-r4-prior": ({"rank": 4, "prior": True}, "LoRA rank 4 + prior preservation"),
    "lora-r4-text-encoder": ({"rank": 4, "train_text_encoder": True}, "LoRA rank 4 + text-encoder LoRA"),
    "full": ({"method": "full", "learning_rate": 2e-4}, "full fine-tuning (the reference)"),
}


def train_run(name: str, options: dict, photos: Path, class_dir: Path, work: Path, args) -> dict:
    from lora_db.config.train import TrainConfig
    from lora_db.training.loop import train

    options = dict(options)
    prior = options.pop("prior", False)
    values = {
        "model": "tiny-world",
        "instance_dir": photos,
        "instance_prompt": SUBJECT,
        "output_dir": work / name,
        "max_train_steps": args.steps,
        "learning_rate": args.learning_rate,
        "uncond_prob": 0.1,
        "seed": args.seed,
        "overwrite": True,
        **options,
    }
    if prior:
        values |= {"class_prompt": CLASS, "class_dir": class_dir, "num_class_images": args.class_images}
    started = time.perf_counter()
    result = train(TrainConfig(**values))
    summary = json.loads((result.output_dir / "summary.json").read_text())
    return {
        "train_s": time.perf_counter() - started,
        "trainable_parameters": summary["trainable_parameters"],
        "output": str(result.adapter_path),
        "final_loss": summary["final_loss"],
    }


def full_model_folder(unet_dir: Path, work: Path) -> Path:
    """tiny-world with its U-ViT replaced by a fully fine-tuned one: a complete diffusers folder."""
    from lora_db.models.loading import tiny_world_dir as asset_dir

    folder = work / "full-model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(asset_dir(), folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(unet_dir, folder / "unet")
    return folder


def eval_config(out: Path, photos: Path, args, model: str, adapters: list[str]):
    from lora_db.config.evaluate import EvalConfig

    return EvalConfig(
        out=out,
        instance_dir=photos,
        model=model,
        adapters=adapters,
        prompts=list(PROMPTS),
        class_prompt=CLASS,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=args.inference_steps,
        clip_model="tiny-world",
        identifier="sks",
        overwrite=True,
    )


def class_similarity(base_eval: Path, other_eval: Path, num_images: int, seed: int) -> float:
    """Prior similarity of a separately evaluated model: its class samples against the base's, same seeds."""
    from PIL import Image

    from lora_db.evaluation.metrics import ImageEmbedder, paired_similarity
    from lora_db.models.loading import load_pipeline

    embed = ImageEmbedder(load_pipeline("tiny-world"))
    index = len(PROMPTS)  # the class prompt comes after the --prompt values

    def samples(folder: Path):
        return [Image.open(folder / "samples" / f"base_p{index:02d}_seed{seed + i}.png") for i in range(num_images)]

    return paired_similarity(embed(samples(other_eval)), embed(samples(base_eval)))


def row_of(name: str, label: str, eval_row: dict, run: dict | None) -> dict:
    scores = eval_row["prompts"]
    return {
        "configuration": name,
        "label": label,
        "clip_i": scores[PROMPTS[0]]["clip_i"],
        "clip_i_recontext": scores[PROMPTS[1]]["clip_i"],
        "clip_t_recontext": scores[PROMPTS[1]]["clip_t"],
        "clip_i_unrelated": scores[PROMPTS[2]]["clip_i"],
        "prior_similarity": eval_row["class"]["prior_similarity"],
        "diversity": scores[PROMPTS[0]]["diversity"],
        **(run or {}),
    }


def markdown(results: dict) -> str:
    lines = [
        "| configuration | trainable params | train (s) | CLIP-I | CLIP-I beach | CLIP-T beach | CLIP-I unrelated | "
        "prior sim. | diversity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        params = f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "-"
        train_s = f"{row['train_s']:.0f}" if "train_s" in row else "-"
        lines.append(
            f"| {row['label']} | {params} | {train_s} | {row['clip_i']:.3f} | {row['clip_i_recontext']:.3f} | "
            f"{row['clip_t_recontext']:.3f} | {row['clip_i_unrelated']:.3f} | {row['prior_similarity']:.3f} | "
            f"{row['diversity']:.3f} |"
        )
    ref = results["reference"]
    lines += [
        "",
        f"Real photos of the subject among themselves: CLIP-I {ref['clip_i']:.3f} ({ref['images']} photos). "
        f"{results['settings']}. Command: `{results['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def chart(results: dict):
    from PIL import Image, ImageDraw, ImageFont

    rows = results["rows"]
    font, bold = ImageFont.load_default(size=14), ImageFont.load_default(size=17)
    series = (("clip_i", "CLIP-I (subject)", (200, 60, 40)), ("prior_similarity", "prior similarity", (52, 101, 164)))
    width, row_h, left = 1000, 44, 300
    image = Image.new("RGB", (width, 90 + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 12), "DreamBooth on tiny-world: subject fidelity and prior similarity", font=bold, fill="black")
    for n, (_, name, colour) in enumerate(series):
        draw.rectangle((20 + 220 * n, 44, 34 + 220 * n, 58), fill=colour)
        draw.text((40 + 220 * n, 44), name, font=font, fill="black")
    for i, row in enumerate(rows):
        y = 80 + i * row_h
        draw.text((20, y + 10), row["label"], font=font, fill="black")
        for n, (key, _, colour) in enumerate(series):
            value = max(0.0, row[key])
            end = left + (width - left - 80) * value
            draw.rectangle((left, y + 3 + 18 * n, end, y + 17 + 18 * n), fill=colour)
            draw.text((end + 6, y + 3 + 18 * n), f"{row[key]:.3f}", font=font, fill="black")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA rows (full FT sets its own)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quality")
    parser.add_argument("--work", type=Path, default=None, help="where runs go (a temporary folder by default)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]}; choose from {', '.join(CONFIGS)}")

    import tempfile

    import torch

    from lora_db.evaluation.evaluate import evaluate
    from lora_db.logs import quiet_library_logs
    from lora_db.synthetic.demo import make_demo_images

    torch.set_num_threads(args.threads)
    quiet_library_logs()
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-db-quality-"))
    photos = work / "photos"
    make_demo_images(photos, count=5, size=64, seed=0)
    runs = {name: train_run(name, CONFIGS[name][0], photos, work / "class", work, args) for name in names}

    adapters = [runs[n]["output"] for n in names if n != "full"]
    base_eval = evaluate(eval_config(work / "eval", photos, args, "tiny-world", adapters))
    by_label = {row["label"]: row for row in base_eval.rows}
    rows = [row_of("base", "base model (no training)", by_label["base"], None)]
    rows += [row_of(n, CONFIGS[n][1], by_label[n], runs[n]) for n in names if n != "full"]
    if "full" in runs:
        folder = full_model_folder(Path(runs["full"]["output"]), work)
        full_eval = evaluate(eval_config(work / "eval-full", photos, args, str(folder), []))
        row = row_of("full", CONFIGS["full"][1], full_eval.rows[0], runs["full"])
        row["prior_similarity"] = class_similarity(work / "eval", work / "eval-full", args.num_images, args.seed)
        rows.append(row)

    settings = (
        f"{args.steps} steps, LoRA lr {args.learning_rate:g}, {args.num_images} samples per prompt, "
        f"{args.inference_steps} denoising steps, seed {args.seed}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    )
    results = {
        "rows": rows,
        "reference": base_eval.reference,
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
