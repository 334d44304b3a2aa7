#!/usr/bin/env bash
# One check of lora-db on a CUDA GPU, within 8 minutes, into one JSON (benchmarks/results/gpu-check.json, with a .md
# beside it). On the real-size UniDiffuser architecture (random weights, 512 px), most wanted first:
#   - memory (benchmarks/memory.py): peak CUDA memory of each configuration (max allocated and reserved, the CUDA
#     context apart), each beside `lora-db estimate`, and its step times: the target configuration (bf16, checkpointing,
#     8-bit AdamW, cached latents) with PyTorch SDPA, the same with xformers, the same with --compile (compile time
#     apart from the steps), bf16 and fp16 frozen weights, the NF4 and int8 bases, full fine-tuning in fp32;
#   - speed (benchmarks/speed.py): lora-db's step against the bare loop, the target configuration, if time is left.
# Rows not started within the memory part's budget (300 s) are recorded as skipped, so the script ends in time even
# on a slower card; on one under ~21 GiB the full fine-tuning row ends as "failed" with the out-of-memory line.
# Not run on a GPU yet: written and dry-run (--cpu-smoke) on a machine without one.
#
#   pip install -e ".[xformers]"             # optional: without xformers its row fails with a one-line reason
#   bash benchmarks/gpu_check.sh             # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu-smoke # the same steps on the CPU and the tiny model, into a temporary folder:
#                                            # checks the script end to end, measures nothing about GPUs
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  smoke=1
  shift
fi
started=$SECONDS
limit_s=480
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

configs=lora-bf16-ckpt-8bit-cached,lora-bf16-ckpt-8bit-cached-xformers,lora-bf16-ckpt-8bit-cached-compile
configs+=,lora-bf16,lora-fp16,lora-bf16-ckpt-8bit-cached-nf4,lora-bf16-ckpt-8bit-cached-int8,full-fp32-adamw
if ((smoke)); then
  model=tiny
  out=$work/results
  memory_budget_s=240
  configs=lora-bf16-ckpt-8bit-cached,lora-bf16-ckpt-8bit-cached-xformers,lora-bf16-ckpt-8bit-cached-compile,lora-fp16
else
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU: --cpu-smoke, or benchmarks/memory.py" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  model=random:unidiffuser-v1
  out=benchmarks/results
  memory_budget_s=300
fi

python benchmarks/memory.py --models "$model" --configs "$configs" --out "$work" --name memory \
  --budget-s "$memory_budget_s" "$@"

speed_note="not run: under 150 s of the ${limit_s} s were left"
left=$((limit_s - (SECONDS - started) - 20))
if ((left >= 150)); then
  if timeout "$left" python benchmarks/speed.py --models "$model" --configs lora-bf16-ckpt-8bit-cached --repeats 1 \
    --out "$work" --name speed; then
    speed_note=""
  else
    speed_note="stopped after ${left} s (the ${limit_s} s limit)"
  fi
fi

mkdir -p "$out"
python - "$work" "$out" "$speed_note" "$((SECONDS - started))" <<'EOF'
"""Both parts into one JSON (and one .md): memory rows, the speed row, the machine, the time the check took."""
import json
import sys
from pathlib import Path

work, out, speed_note, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
memory = json.loads((work / "memory.json").read_text())
speed = json.loads((work / "speed.json").read_text()) if (work / "speed.json").is_file() else None
check = {"machine": memory["machine"], "seconds": seconds, "memory": memory, "speed": speed, "speed_note": speed_note}
(out / "gpu-check.json").write_text(json.dumps(check, indent=1) + "\n")
parts = [f"# GPU check ({seconds} s)\n", "## Memory and step time\n", (work / "memory.md").read_text()]
parts += ["## lora-db against the bare loop\n", (work / "speed.md").read_text() if speed else speed_note + "\n"]
(out / "gpu-check.md").write_text("\n".join(parts))
print(f"wrote {out / 'gpu-check.json'} and gpu-check.md in {seconds} s")
EOF
