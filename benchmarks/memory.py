"""Peak memory and step time of lora-db training configurations, measured beside lora-db's own estimate.

    python benchmarks/memory.py --models random:unidiffuser-v1     # real-size architecture: minutes per row
    python benchmarks/memory.py                                    # tiny and random:small (rows of others kept)
    python benchmarks/memory.py --models tiny --configs full-fp32-adamw,lora-bf16-ckpt-8bit-cached --out /tmp/b

Each configuration trains in a process of its own, through `lora_db.train` (the real code path), for a
few steps on demo photos; the class folder of prior preservation is filled beforehand, so no generation is
timed. Per row: peak memory, the median step time after warm-up, trainable parameters, adapter size, and
`lora_db.estimate_memory`'s prediction for the same configuration with its error. On CUDA the peak is the allocator's
max allocated (and reserved) since the loop began. On a CPU it is the peak resident set during the loop minus
a baseline: the same process after training the tiny model with the same options (libraries, lazily imported
code, thread pools loaded, like a CUDA context); children run with a fixed glibc mmap threshold so the resident
set follows the live tensors (--glibc-malloc measures with glibc's default instead).

A CPU row whose estimate (scaled by the worst under-estimate measured so far in the run, plus the baseline)
exceeds --limit-gib or the memory available is recorded as skipped, and a child whose resident memory passes
--stop-gib is stopped. Results go to OUT/NAME.json, .md and .png after every row; rows of models not re-run are
kept, so the real-size model can run on its own and land in the same table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

GiB = 2**30
HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = ("tiny", "random:small")
# Warm-up steps (not timed) and timed steps per model on a CPU: the first steps allocate optimizer states and
# caches. A GPU takes (3, 5) for every model: its steps are short, and the first ones pick kernels.
CPU_STEPS = {"tiny": (2, 5), "random:small": (1, 3), "random:unidiffuser-v1": (1, 2)}
GPU_STEPS = (3, 5)
FALLBACK_BASELINE = GiB  # resident set of a process with torch, diffusers and transformers imported
POLL_S = 0.5
WARM_UP_MODEL = "tiny"  # what each CPU child trains before its baseline is read
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Configuration:
    name: str
    label: str
    options: dict = field(default_factory=dict)
    gpu_only: bool = False
    prior: bool = False


_LORA_BASE = {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit"}
CONFIGURATIONS = (
    Configuration("full-fp32-adamw", "full fine-tuning, fp32 AdamW (the original DreamBooth)", {"method": "full"}),
    Configuration(
        "full-fp32-adamw-ckpt",
        "full fine-tuning, fp32 AdamW + checkpointing",
        {"method": "full", "gradient_checkpointing": True},
    ),
    Configuration(
        "full-8bit-ckpt",
        "full fine-tuning, 8-bit AdamW + checkpointing",
        {"method": "full", "optimizer": "adamw8bit", "gradient_checkpointing": True},
    ),
    Configuration("lora-fp32", "LoRA r=4, fp32"),
    Configuration("lora-bf16", "LoRA, bf16 frozen weights", {"mixed_precision": "bf16"}),
    Configuration("lora-fp16", "LoRA, fp16 frozen weights", {"mixed_precision": "fp16"}, gpu_only=True),
    Configuration(
        "lora-bf16-ckpt", "+ gradient checkpointing", {"mixed_precision": "bf16", "gradient_checkpointing": True}
    ),
    Configuration("lora-bf16-ckpt-8bit", "+ 8-bit AdamW", _LORA_BASE),
    Configuration("lora-bf16-ckpt-8bit-cached", "+ cached latents", {**_LORA_BASE, "cache_latents": True}),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-te",
        "+ text-encoder LoRA",
        {**_LORA_BASE, "cache_latents": True, "train_text_encoder": True},
    ),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-prior",
        "+ prior preservation (instance + class batch)",
        {**_LORA_BASE, "cache_latents": True},
        prior=True,
    ),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-nf4",
        "+ 4-bit NF4 frozen U-ViT (QLoRA)",
        {**_LORA_BASE, "cache_latents": True, "quantize_base": "nf4"},
    ),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-int8",
        "+ 8-bit frozen U-ViT (LLM.int8())",
        {**_LORA_BASE, "cache_latents": True, "quantize_base": "int8"},
    ),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-compile",
        "+ --compile (torch.compile of the U-ViT blocks)",
        {**_LORA_BASE, "cache_latents": True, "compile": True},
    ),
    Configuration(
        "lora-bf16-ckpt-8bit-cached-xformers",
        "+ xformers instead of SDPA",
        {**_LORA_BASE, "cache_latents": True, "attention": "xformers"},
        gpu_only=True,
    ),
)


# -- the child: one training run ---------------------------------------------------------------------------------


def run_child(spec_path: Path) -> None:
    """Train one configuration and write what it measured; runs in a fresh process per configuration."""
    spec = json.loads(spec_path.read_text())
    import torch

    from lora_db.config.train import TrainConfig
    from lora_db.layout import METRICS_FILE
    from lora_db.logs import quiet_library_logs
    from lora_db.models.memory import current_memory_bytes
    from lora_db.training.loop import train

    quiet_library_logs()
    result: dict = {}
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        # Memory the driver reports in use beyond the allocator's: the context (and any other process's).
        result["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved()
    config = TrainConfig(**spec["config"])
    if not torch.cuda.is_available():
        # The baseline is a process that has already trained the tiny model with the same options: libraries,
        # lazily imported code, thread pools and kernel caches are loaded, as a GPU's CUDA context would be.
        warm_up = Path(spec["result_path"]).with_suffix(".warm-up")
        train(replace(config, model=WARM_UP_MODEL, resolution=None, output_dir=warm_up, max_train_steps=2))
        shutil.rmtree(warm_up)
        gc.collect()
    result["baseline_rss_bytes"] = current_memory_bytes(torch.device("cpu"))
    train(config)
    metrics = [json.loads(line) for line in (config.output_dir / METRICS_FILE).read_text().splitlines() if line]
    summary = json.loads((config.output_dir / "summary.json").read_text())
    if torch.cuda.is_available():
        # The peak counters were reset at the loop's start; nothing after the loop allocates much.
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    output = config.output_dir / ("unet" if config.method == "full" else "adapter.safetensors")
    result.update(
        device=summary["device"],
        setup_memory_bytes=summary["setup_memory_bytes"],
        peak_memory_bytes=max(m["peak_memory_bytes"] for m in metrics),
        step_times_s=[m["step_time_s"] for m in metrics],
        trainable_parameters=summary["trainable_parameters"],
        adapter_bytes=sum(p.stat().st_size for p in [output, *output.rglob("*")] if p.is_file()),
        compile=summary.get("compile"),
    )
    Path(spec["result_path"]).write_text(json.dumps(result))


# -- the parent: configurations, limits, results -----------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(_meminfo("MemTotal") / GiB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        # nvidia-smi rather than torch: a CUDA context in this process would take GPU memory from the children.
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "--id=0"]
        try:
            name, mib = subprocess.run(query, capture_output=True, text=True, check=True).stdout.rsplit(",", 1)
            info.update(gpu=name.strip(), gpu_memory_gib=round(int(mib) / 1024, 1))
        except (OSError, subprocess.CalledProcessError, ValueError):
            info.update(gpu="unknown", gpu_memory_gib=0.0)
    return info


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def steps(model: str) -> tuple[int, int]:
    import torch

    return GPU_STEPS if torch.cuda.is_available() else CPU_STEPS.get(model, (1, 3))


def train_config(model: str, conf: Configuration, data: dict[str, Path], output_dir: Path):
    from lora_db.config.train import TrainConfig

    warmup, timed = steps(model)
    options = {
        "model": model,
        "instance_dir": data["instance"],
        "instance_prompt": "a photo of sks robot",
        "output_dir": output_dir,
        "max_train_steps": warmup + timed,
        "overwrite": True,
        **conf.options,
    }
    if conf.prior:
        options.update(class_prompt="a photo of a robot", class_dir=data["class"], num_class_images=data["images"])
    return TrainConfig(**options)


def child_environment(glibc_default: bool) -> dict[str, str]:
    """glibc keeps freed memory below a threshold that grows with the largest block freed (up to 32 MiB), so a
    process's resident set holds freed tensors too. A fixed 64 KiB threshold maps every tensor on its own and
    unmaps it when freed: the resident set then follows the live tensors, as a GPU allocator's counter does."""
    if glibc_default:
        return dict(os.environ)
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def measure(model: str, conf: Configuration, config, work: Path, limit: int, env: dict[str, str]) -> dict:
    """Train in a child process, stopping it if its resident memory passes `limit`."""
    spec = work / f"{conf.name}.spec.json"
    result_path = work / f"{conf.name}.result.json"
    spec.write_text(json.dumps({"config": config.to_dict(), "result_path": str(result_path)}))
    log = work / f"{conf.name}.log"
    if conf.options.get("compile"):
        # A fresh inductor cache for every --compile row: its warm-up then compiles from scratch as the row does, so
        # inductor's code generation (loaded on the first compile of a process, ~150 MiB) is in the baseline like any
        # other lazily loaded code, and the row holds only its own graphs. With a shared cache a warm-up that hit the
        # cache left that load to the row: the same row measured 24 or 181 MiB above the one without --compile.
        env = {**env, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix=f"{conf.name}.inductor-", dir=work)}
    started = time.perf_counter()
    with log.open("w") as stream:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(spec)], stdout=stream, stderr=subprocess.STDOUT, env=env
        )
        stopped = False
        while child.poll() is None:
            if _rss(child.pid) > limit:
                child.kill()
                stopped = True
            time.sleep(POLL_S)
    # Other work on the machine slows steps (two busy cores make torch's threads wait): keep the load beside them.
    row = {"wall_s": round(time.perf_counter() - started, 1), "load_average": round(os.getloadavg()[1], 2)}
    if stopped:
        return {**row, "status": f"stopped: resident memory passed {limit / GiB:.0f} GiB"}
    if child.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        return {**row, "status": f"failed (exit {child.returncode}): {tail[0][:200]}"}
    measured = json.loads(result_path.read_text())
    timed = measured["step_times_s"][steps(model)[0] :] or measured["step_times_s"]
    # The fastest step too: on a shared machine it is the one least slowed by other work.
    return {
        **row,
        "status": "measured",
        **measured,
        "step_time_s": statistics.median(timed),
        "fastest_step_s": min(timed),
    }


def estimate(config, device: str) -> dict:
    from lora_db.training.estimate import estimate_memory

    started = time.perf_counter()
    result = estimate_memory(config, device=device).to_dict()
    return {**result, "seconds": round(time.perf_counter() - started, 1)}


def estimates(row: dict, config, device: str, gpu_only: bool) -> str | None:
    """Fill the row's estimates; a failure becomes the row's status rather than the end of a long run."""
    try:
        if device == "cpu":
            row["estimate_cuda"] = estimate(config, "cuda")
        if not (gpu_only and device == "cpu"):
            row["estimate"] = estimate(config, device)
    except Exception as err:
        return f"skipped: estimate failed ({type(err).__name__}: {str(err)[:160]})"
    return "skipped: needs a CUDA GPU (benchmarks/gpu_check.sh)" if gpu_only and device == "cpu" else None


def compare(row: dict) -> None:
    """The estimate's error against what was measured on the same device (see benchmarks/README.md)."""
    if row["status"] != "measured":
        return
    est = row["estimate"]
    if row["device"].startswith("cuda"):
        measured = row["peak_memory_bytes"]  # max_memory_allocated: the same tensors the estimate counts
        predicted = est["peak_bytes"]
    else:
        # The process peak minus the process before any model: tensors plus allocator overhead.
        measured = row["peak_memory_bytes"] - row["baseline_rss_bytes"]
        predicted = est["peak_bytes"] + est.get("process_bytes", 0)  # kernels' own buffers, as measured
        if row["model"] == WARM_UP_MODEL:
            # The warm-up trained this very model with these options: the kernels' buffers for its shapes were
            # allocated before the baseline was read, so the measurement cannot see them.
            predicted = est["peak_bytes"]
        grown = row["peak_memory_bytes"] - row["setup_memory_bytes"]
        row["growth_bytes"] = grown
        row["estimated_growth_bytes"] = predicted - est["setup_bytes"]
    row["measured_bytes"] = measured
    row["predicted_bytes"] = predicted
    row["estimate_error"] = (predicted - measured) / measured


def benchmark_model(model: str, configs: list[Configuration], data: dict, work: Path, args, rows: list, save) -> None:
    """Estimate every configuration, then train them cheapest first, appending to `rows` and saving each."""
    import torch

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    limit = int(args.limit_gib * GiB)
    plans = []
    for conf in configs:
        row = {"model": model, "configuration": conf.name, "label": conf.label, "options": conf.options}
        rows.append(row)
        config = train_config(model, conf, data, work / "runs" / conf.name)
        print(f"[{model}] {conf.name}: estimating", flush=True)
        skipped = estimates(row, config, device, conf.gpu_only)
        if skipped:
            row["status"] = skipped
            continue
        row["status"] = "pending"
        plans.append((row["estimate"]["peak_bytes"], conf, config, row))
    # On a CPU cheapest first: the larger runs' safety margin is then calibrated on this run's own measurements. A
    # GPU takes them in the order given, most wanted first, for --budget-s.
    worst_ratio, baseline = 1.0, FALLBACK_BASELINE
    for predicted, conf, config, row in plans if on_gpu else sorted(plans, key=lambda plan: plan[0]):
        if args.budget_s and time.perf_counter() - STARTED > args.budget_s:
            row["status"] = f"skipped: the run's time budget ({args.budget_s:.0f} s, --budget-s) was spent"
            save()
            continue
        expected = int(predicted * worst_ratio) + baseline
        room = min(limit, _meminfo("MemAvailable") - GiB) if not on_gpu else limit
        if not on_gpu and expected > room:
            row["status"] = (
                f"skipped: estimated {expected / GiB:.1f} GiB > limit {room / GiB:.1f} GiB "
                f"(estimate x{worst_ratio:.2f}, the worst measured so far, + process baseline)"
            )
            print(f"[{model}] {conf.name}: {row['status']}", flush=True)
            save()
            continue
        print(f"[{model}] {conf.name}: training (expect ~{expected / GiB:.1f} GiB)", flush=True)
        env = child_environment(args.glibc_malloc)
        row.update(measure(model, conf, config, work, limit=int(args.stop_gib * GiB), env=env))
        row["malloc"] = (
            "glibc default" if args.glibc_malloc else f"MALLOC_MMAP_THRESHOLD_={env['MALLOC_MMAP_THRESHOLD_']}"
        )
        compare(row)
        shutil.rmtree(work / "runs" / conf.name, ignore_errors=True)
        if row["status"] == "measured" and not on_gpu:
            baseline = row["baseline_rss_bytes"]
            worst_ratio = max(worst_ratio, (row["peak_memory_bytes"] - baseline) / max(predicted, 1))
        print(f"[{model}] {conf.name}: {summary_line(row)}", flush=True)
        save()


def summary_line(row: dict) -> str:
    if row["status"] != "measured":
        return row["status"]
    return (
        f"peak {row['measured_bytes'] / GiB:.2f} GiB, estimate {row['estimate']['peak_bytes'] / GiB:.2f} GiB "
        f"({row['estimate_error']:+.0%}), step {row['step_time_s']:.2f} s"
    )


def prepare_data(work: Path, images: int) -> dict:
    from lora_db.synthetic.demo import make_demo_images

    # 512 px covers the largest model; smaller models resize, as they would any photo.
    make_demo_images(work / "instance", count=images, size=512, seed=0)
    make_demo_images(work / "class", count=images, size=512, seed=1)
    return {"instance": work / "instance", "class": work / "class", "images": images}


def reestimate(out: Path, name: str, models: list[str], configs: dict[str, Configuration], images: int) -> None:
    """Estimate the rows of an earlier run again with today's estimator; the measurements stay as they were."""
    path = out / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no earlier results to re-estimate")
    earlier = json.loads(path.read_text())
    device = earlier["machine"]["device"]
    with tempfile.TemporaryDirectory(prefix="lora-db-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work, images)
        for row in earlier["rows"]:
            conf = configs.get(row["configuration"])
            if row["model"] not in models or conf is None:
                continue
            print(f"[{row['model']}] {conf.name}: estimating again", flush=True)
            config = train_config(row["model"], conf, data, work / "runs" / conf.name)
            skipped = estimates(row, config, device, conf.gpu_only)
            if skipped and row["status"] == "measured":
                raise SystemExit(f"{conf.name}: {skipped}")
            compare(row)
            row["reestimated"] = True
    for model in models:
        earlier["commands"][model] += " && python benchmarks/memory.py " + " ".join(sys.argv[1:])
    for written in write_results(out, name, earlier["machine"], earlier["rows"], earlier["commands"]):
        print(f"wrote {written}")


# -- outputs -----------------------------------------------------------------------------------------------------


def earlier_results(path: Path, models: list[str]) -> tuple[list[dict], dict[str, str]]:
    """Rows and commands of an earlier results file for the models this run does not touch."""
    if not path.is_file():
        return [], {}
    earlier = json.loads(path.read_text())
    rows = [row for row in earlier["rows"] if row["model"] not in models]
    return rows, {model: command for model, command in earlier["commands"].items() if model not in models}


def write_results(out: Path, name: str, info: dict, rows: list[dict], commands: dict) -> list[Path]:
    from report import draw_chart, markdown_table  # benchmarks/report.py: the script's folder is on sys.path

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps({"machine": info, "commands": commands, "rows": rows}, indent=1) + "\n")
    paths[1].write_text(markdown_table(info, rows, commands))
    draw_chart(rows, info).save(paths[2])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for NAME.json/.md/.png")
    parser.add_argument("--name", default="", help="results file name (default: cpu or cuda)")
    parser.add_argument("--images", type=int, default=5, help="instance (and class) demo photos")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="skip CPU rows expected above this")
    parser.add_argument("--stop-gib", type=float, default=20.0, help="stop a child whose resident set passes this")
    parser.add_argument("--budget-s", type=float, default=0, help="start no row after this many seconds (0: none)")
    parser.add_argument(
        "--glibc-malloc", action="store_true", help="measure with glibc's default malloc, which keeps freed memory"
    )
    parser.add_argument(
        "--reestimate",
        action="store_true",
        help="recompute the estimates (and errors) of the measured rows in OUT/NAME.json without training again",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        run_child(args.child)
        return
    from lora_db.logs import quiet_library_logs

    quiet_library_logs()
    models = [m for m in args.models.split(",") if m]
    wanted = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(wanted) - {c.name for c in CONFIGURATIONS})
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(c.name for c in CONFIGURATIONS)}")
    configs = [c for c in CONFIGURATIONS if not wanted or c.name in wanted]
    info = machine()
    name = args.name or info["device"]
    if args.reestimate:
        reestimate(args.out, name, models, {c.name: c for c in configs}, args.images)
        return
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kept, commands = earlier_results(args.out / f"{name}.json", models)
    commands.update(dict.fromkeys(models, command.strip()))
    rows: list[dict] = []

    def save() -> list[Path]:
        return write_results(args.out, name, info, kept + rows, commands)

    with tempfile.TemporaryDirectory(prefix="lora-db-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work, args.images)
        for model in models:
            benchmark_model(model, configs, data, work, args, rows, save)
    for written in save():
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
