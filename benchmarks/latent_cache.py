"""Peak memory of training with cached latents in memory (--cache-latents) and on disk (--cache-latents-dir), at 200
and 2,000 images of 64 px, on the shipped tiny-world model (64 px, the real code path: `lora_db.train`).

    taskset -c 1 python benchmarks/latent_cache.py                 # 200 and 2,000 images: a few minutes
    python benchmarks/latent_cache.py --counts 50,500 --out /tmp/b

Each row trains in a process of its own for a few steps and reports that process's peak resident set (VmHWM,
imports and the model included), the time to encode (or read back) the images, and how many were encoded: the
disk cache is measured twice, when it is written and when a second run reads it back. The photos are procedural
and distinct (the demo robot in random poses and rooms; the encoded count shows none repeats). Results go to
OUT/latent_cache.json and .md.

With glibc's default malloc, the in-memory cache's many small tensors, interleaved with each image's freed
temporaries, keep the heap from shrinking: the resident set grows far beyond the live encodings (about 12 KB an
image on tiny-world). `MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/latent_cache.py --out ...` fixes the
threshold so the resident set follows the live tensors (results/latent_cache-mmap-threshold.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
STEPS = 3  # a few steps: the peak comes from encoding and holding the images, not from training


def make_photos(folder: Path, count: int) -> None:
    """`count` distinct 64 px photos (lora-db's demo robot in random poses and rooms)."""
    from lora_db.synthetic.demo import make_demo_images

    make_demo_images(folder, count=count, size=64, seed=count)


def child(photos: Path, output: Path, mode: str, cache: Path) -> None:
    """One training run; prints a JSON line with its peak memory and encoding time."""
    import logging
    import time

    from lora_db.config.train import TrainConfig
    from lora_db.training import latent_cache
    from lora_db.training.loop import train

    logging.basicConfig(level=logging.WARNING)
    counts = {"written": 0, "reused": 0}
    ensure = latent_cache.LatentCache.ensure

    def counted(self, image, encode):
        path_before = self.written
        result = ensure(self, image, encode)
        counts["written" if self.written > path_before else "reused"] += 1
        return result

    latent_cache.LatentCache.ensure = counted
    options = {"cache_latents": True} if mode == "memory" else {"cache_latents_dir": cache}
    started = time.perf_counter()
    result = train(
        TrainConfig(
            model="tiny-world",
            instance_dir=photos,
            instance_prompt="a photo of sks toy",
            output_dir=output,
            max_train_steps=STEPS,
            learning_rate=1e-4,
            **options,
        )
    )
    elapsed = time.perf_counter() - started
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_bytes": peak, "run_s": elapsed, "steps": result.steps, **counts}))


def measure(photos: Path, mode: str, cache: Path, scratch: Path) -> dict:
    output = Path(tempfile.mkdtemp(dir=scratch))
    command = [sys.executable, __file__, "--child", str(photos), str(output), mode, str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {photos} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    """What the peaks were measured with: torch, the processor, the malloc setting, the CPUs this process may use."""
    import os
    import platform

    import torch

    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc's default")
    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"MALLOC_MMAP_THRESHOLD_ {threshold}, {len(os.sched_getaffinity(0))} CPU(s) allowed, {STEPS} steps a run"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="200,2000")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        for count in (int(c) for c in args.counts.split(",")):
            photos = scratch / f"photos-{count}"
            make_photos(photos, count)
            cache = scratch / f"cache-{count}"
            for mode, label in (("memory", "--cache-latents"), ("disk", "--cache-latents-dir (writes)"),
                                ("disk", "--cache-latents-dir (reads back)")):  # fmt: skip
                row = {"images": count, "option": label, **measure(photos, mode, cache, scratch)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(photos)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latent_cache.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| images | option | peak memory (MiB) | run (s) | encoded | read back |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['images']:,} | {row['option']} | {row['peak_bytes'] / MiB:.0f} | {row['run_s']:.1f} | "
            f"{row['written']:,} | {row['reused']:,} |"
        )
    command = " ".join(["python benchmarks/latent_cache.py", *sys.argv[1:]])
    lines += ["", f"{machine()}. Command: `{command}`."]
    (args.out / "latent_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        main()
