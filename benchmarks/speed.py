"""lora-db's training step against a bare loop, side by side in one run, and what --compile buys.

    python benchmarks/speed.py                                          # tiny-world, then the real-size architecture
    python benchmarks/speed.py --models tiny-world --repeats 5          # minutes
    python benchmarks/speed.py --models random:unidiffuser-v1 --configs lora-bf16-ckpt-8bit-cached --repeats 2

For each model, configuration and repeat, one fresh process runs both sides one after the other (the same process
state, the same moment's load on the machine), their order alternating from repeat to repeat: lora-db's `train`
(the real code path: accelerate, the divergence checks, metrics.jsonl, the progress bar) and a bare loop written
below (peft LoRA on the same U-ViT with the same weights, the same photos encoded once, the same dtype,
checkpointing, optimizer and gradient clipping; no accelerate, no checks, no logging). Both take the same number
of threads and read two clocks at the end of every step: the process's CPU time, which other work on a shared
machine barely changes (the figure compared), and the wall clock; lora-db's are read where its loop updates the
progress bar, the bare loop's at the end of each iteration. Steps after the warm-up count. Each process starts with
an empty inductor cache, so the side that runs first in it compiles cold (`--compile` rows: that compile time is
reported apart from the steady-state step).

Results: OUT/NAME.json (every step time, the machine, the load average) and OUT/NAME.md (per row: medians of both
sides, the median over repeats of lora-db / bare, and --compile's speed-up over the same row without it). Rows of
models a run does not measure are kept from the earlier OUT/NAME.json, so tiny-world and the real size share a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "a photo of sks toy"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# name -> TrainConfig options; the bare loop reads the same keys.
_TARGET = {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit", "cache_latents": True}
CONFIGS = {
    "lora-fp32-cached": {"cache_latents": True},
    "lora-bf16-ckpt-8bit-cached": _TARGET,
    "lora-bf16-ckpt-8bit-cached-compile": {**_TARGET, "compile": True},
    "lora-bf16-cached": {"mixed_precision": "bf16", "cache_latents": True},
    "lora-bf16-cached-compile": {"mixed_precision": "bf16", "cache_latents": True, "compile": True},
}
DEFAULT_CONFIGS = {
    "tiny-world": list(CONFIGS),
    "random:unidiffuser-v1": ["lora-bf16-ckpt-8bit-cached", "lora-bf16-ckpt-8bit-cached-compile"],
}
# (warm-up, timed) steps: a real-size step takes half a minute or more on this CPU.
STEPS = {"tiny-world": (10, 40), "random:unidiffuser-v1": (1, 3), "tiny": (2, 4)}


# -- the bare loop ---------------------------------------------------------------------------------------------------


def bare_loop(spec: dict) -> dict:
    """peft LoRA on the U-ViT, trained for the spec's steps with nothing around it; the time of each step."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image
    from torch.utils.checkpoint import checkpoint

    from lora_db.models.loading import load_pipeline  # the weights lora-db trains, loaded the same way

    class Checkpointed(torch.nn.Module):
        """A block recomputed in backward (torch.utils.checkpoint, non-reentrant), as a wrapper module."""

        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    options = spec["options"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = options.get("mixed_precision") == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    pipe = load_pipeline(spec["model"], torch_dtype=dtype).to(device)
    unet = pipe.unet.requires_grad_(False).train()  # as lora-db trains it (from_pretrained leaves it in eval mode)
    for module in (pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.text_decoder):
        module.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    transformer = unet.transformer
    slots = [(transformer.transformer_in_blocks, i) for i in range(len(transformer.transformer_in_blocks))]
    slots += [(transformer.transformer_out_blocks[i], "block") for i in range(len(transformer.transformer_out_blocks))]
    blocks = []
    for container, key in slots:
        if options.get("gradient_checkpointing"):
            container[key] = Checkpointed(container[key])
        blocks.append(container[key])
    if options.get("gradient_checkpointing"):
        transformer.transformer_mid_block = Checkpointed(transformer.transformer_mid_block)
    blocks.append(transformer.transformer_mid_block)
    if options.get("compile"):
        for block in blocks:
            block.compile()

    # The photos, encoded once (cached latents), and the prompt.
    size = unet.config.sample_size * pipe.vae_scale_factor
    cache = []
    with torch.no_grad():
        for path in sorted(Path(spec["instance_dir"]).glob("*.png")):
            image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
            latent = pipe.vae.encode(pixels.to(device, dtype)).latent_dist
            clip_pixels = pipe.clip_image_processor(images=image, return_tensors="pt")["pixel_values"]
            clip = pipe.image_encoder(pixel_values=clip_pixels.to(device, dtype)).image_embeds[:, None]
            cache.append((latent.mean.float(), latent.std.float(), clip.float()))
        length = pipe.clip_tokenizer.model_max_length
        tokens = pipe.clip_tokenizer(
            [PROMPT], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        prompt = pipe.text_decoder.encode(pipe.text_encoder(tokens.input_ids.to(device))[0])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaling = pipe.vae.config.scaling_factor
    if options.get("optimizer") == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    generator = torch.Generator(device).manual_seed(0)
    warmup, timed = spec["steps"]
    marks = [(time.perf_counter(), time.process_time())]
    for step in range(warmup + timed):
        mean, std, clip = cache[step % len(cache)]
        latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scaling
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        clip_noise = torch.randn(clip.shape, generator=generator, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            vae_out, clip_out, _ = unet(
                scheduler.add_noise(latents, noise, t),
                scheduler.add_noise(clip, clip_noise, t),
                prompt,
                timestep_img=t,
                timestep_text=torch.zeros_like(t),
                data_type=1,
            )
        vae_error = (vae_out.float() - noise).pow(2).flatten(1)
        loss = torch.cat([vae_error, (clip_out.float() - clip_noise).pow(2).flatten(1)], 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), time.process_time()))
    return step_times(marks) | {"compile_s": marks[1][0] - marks[0][0] if options.get("compile") else None}


def step_times(marks: list[tuple[float, float]]) -> dict:
    """Wall-clock and CPU seconds of each step from (wall, process CPU) clock readings at each step's end."""
    return {
        "step_times_s": [b[0] - a[0] for a, b in itertools.pairwise(marks)],
        "step_cpu_s": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
    }


# -- lora-db ---------------------------------------------------------------------------------------------------------


def lora_db_loop(spec: dict) -> dict:
    import tqdm.auto

    from lora_db.config.train import TrainConfig
    from lora_db.layout import METRICS_FILE
    from lora_db.training.loop import train

    marks = []

    class StepClock(tqdm.auto.tqdm):
        """The loop's progress bar, which it updates once at the end of every step: both clocks read there."""

        def update(self, n=1):
            marks.append((time.perf_counter(), time.process_time()))
            return super().update(n)

    tqdm.auto.tqdm = StepClock  # the loop imports it when it starts
    warmup, timed = spec["steps"]
    config = TrainConfig(
        model=spec["model"],
        instance_dir=spec["instance_dir"],
        instance_prompt=PROMPT,
        output_dir=Path(spec["work"]) / "run",
        max_train_steps=warmup + timed,
        report_to="none",
        overwrite=True,
        target_modules=ATTENTION,
        **spec["options"],
    )
    result = train(config)
    metrics = [json.loads(line) for line in (result.output_dir / METRICS_FILE).read_text().splitlines() if line]
    summary = json.loads((result.output_dir / "summary.json").read_text())
    # The first step has no reading before it (it is a warm-up step); its wall time is in metrics.jsonl.
    times = step_times(marks)
    return {
        "step_times_s": [metrics[0]["elapsed_s"], *times["step_times_s"]],
        "step_cpu_s": [None, *times["step_cpu_s"]],
        "compile_s": summary.get("compile", {}).get("compile_s"),
        "compile": summary.get("compile"),
    }


def run_child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    import torch

    from lora_db.logs import quiet_library_logs

    quiet_library_logs()
    torch.set_num_threads(spec["threads"])
    results = {}
    for side in spec["order"]:
        work = Path(spec["work"]) / side
        results[side] = (bare_loop if side == "bare" else lora_db_loop)(spec | {"work": str(work)})
        results[side]["load_average"] = round(os.getloadavg()[0], 2)
    Path(spec["result"]).write_text(json.dumps(results))


# -- the parent ------------------------------------------------------------------------------------------------------


def measure(order: tuple[str, str], model: str, name: str, photos: Path, work: Path, args) -> dict:
    """One repeat: both sides one after the other in one fresh process (same process state, same moment's load on
    the machine), its inductor cache empty, so the side that runs first compiles cold."""
    folder = Path(tempfile.mkdtemp(prefix="repeat-", dir=work))
    spec = {
        "order": order,
        "model": model,
        "options": CONFIGS[name],
        "instance_dir": str(photos),
        "work": str(folder),
        "steps": STEPS.get(model, (2, 5)),
        "threads": args.threads,
        "result": str(folder / "result.json"),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor")}
    with (folder / "log.txt").open("w") as log:
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(folder / "spec.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if child.returncode != 0:
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{model} {name} failed (exit {child.returncode}): {tail[0][:300]}")
    pair = json.loads((folder / "result.json").read_text())
    warmup = spec["steps"][0]
    for side, result in pair.items():
        result.update(
            warmup=warmup,
            first=side == order[0],
            median_s=statistics.median(result["step_times_s"][warmup:]),
            median_cpu_s=statistics.median(result["step_cpu_s"][warmup:]),
        )
    return pair


def summarise(row: dict) -> None:
    """Medians of the timed steps of every repeat, per side and clock; lora-db / bare per repeat and its median."""
    pairs = row["repeats"]
    for clock, key in (("cpu", "step_cpu_s"), ("wall", "step_times_s")):
        for side in ("lora-db", "bare"):
            row[f"{side}_{clock}_s"] = statistics.median(t for p in pairs for t in p[side][key][p[side]["warmup"] :])
        median = "median_cpu_s" if clock == "cpu" else "median_s"
        row[f"{clock}_ratios"] = [p["lora-db"][median] / p["bare"][median] for p in pairs]
        row[f"{clock}_ratio"] = statistics.median(row[f"{clock}_ratios"])
    compiled = [p["lora-db"]["compile_s"] for p in pairs if p["lora-db"].get("compile_s") and p["lora-db"]["first"]]
    row["lora_db_compile_s"] = statistics.median(compiled) if compiled else None


def markdown(results: dict) -> str:
    lines = [
        "| model | configuration | lora-db step, CPU s | bare loop step, CPU s | lora-db / bare (CPU), per repeat | "
        "median | wall-clock: lora-db / bare | --compile: compile s (cold) | --compile speed-up (CPU) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    rows = {(r["model"], r["configuration"]): r for r in results["rows"]}
    for row in results["rows"]:
        eager = rows.get((row["model"], row["configuration"].removesuffix("-compile")))
        speedup = ""
        if row["configuration"].endswith("-compile") and eager is not None:
            speedup = f"{eager['lora-db_cpu_s'] / row['lora-db_cpu_s']:.2f}x"
        compile_s = f"{row['lora_db_compile_s']:.1f}" if row.get("lora_db_compile_s") else ""
        lines.append(
            f"| {row['model']} | {row['configuration']} | {row['lora-db_cpu_s']:.4g} | {row['bare_cpu_s']:.4g} "
            f"| {', '.join(f'{r:.3f}' for r in row['cpu_ratios'])} | **{row['cpu_ratio']:.3f}** "
            f"| {row['wall_ratio']:.3f} | {compile_s} | {speedup} |"
        )
    info = results["machine"]
    lines += [
        "",
        f"{info['cpu']}, {info['cpus']} CPUs, {info['threads']} thread(s) per process, torch {info['torch']}; "
        f"load average {min(results['load_averages']):.1f}-{max(results['load_averages']):.1f} while it ran "
        "(the machine was shared).",
        "",
        *(f"{model}: `{command}`" for model, command in results["commands"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_CONFIGS), help="comma-separated model names")
    parser.add_argument("--configs", default="", help=f"comma-separated, of {', '.join(CONFIGS)} (default per model)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of processes per row, their order alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="speed")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        run_child(args.child)
        return
    wanted = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(wanted) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration {unknown[0]}; known: {', '.join(CONFIGS)}")
    sys.path.insert(0, str(HERE))
    from memory import machine  # benchmarks/memory.py: the same description of the machine

    from lora_db.synthetic.subjects import subject_photos

    info = machine() | {"threads": args.threads}
    models = [m for m in args.models.split(",") if m]
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"machine": info, "commands": {}, "rows": [], "load_averages": []}
    earlier = args.out / f"{args.name}.json"
    if earlier.is_file():  # the rows of models this run leaves alone are kept, with their commands and load
        kept = json.loads(earlier.read_text())
        results["rows"] = [row for row in kept["rows"] if row["model"] not in models]
        results["commands"] = {m: c for m, c in kept.get("commands", {}).items() if m not in models}
        results["load_averages"] = [a for row in results["rows"] for a in row.get("load_averages", [])]
    results["commands"].update(dict.fromkeys(models, command))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-db-speed-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        photos.mkdir()
        for n, photo in enumerate(subject_photos("heart")):
            photo.save(photos / f"heart-{n}.png")
        for model in models:
            for name in wanted or DEFAULT_CONFIGS.get(model, list(CONFIGS)):
                row = {"model": model, "configuration": name, "options": CONFIGS[name], "repeats": []}
                results["rows"].append(row)
                for repeat in range(args.repeats):
                    order = ("lora-db", "bare") if repeat % 2 == 0 else ("bare", "lora-db")
                    pair = measure(order, model, name, photos, work, args)
                    for side in order:
                        results["load_averages"].append(pair[side]["load_average"])
                        row.setdefault("load_averages", []).append(pair[side]["load_average"])
                        cpu_s = pair[side]["median_cpu_s"]
                        print(f"[{model}] {name} #{repeat} {side}: {cpu_s:.4g} CPU s a step", flush=True)
                    row["repeats"].append(pair)
                summarise(row)
                print(f"[{model}] {name}: lora-db / bare = {row['cpu_ratio']:.3f} (CPU)", flush=True)
                (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
                (args.out / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
