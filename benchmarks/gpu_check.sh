#!/usr/bin/env bash
# The CUDA-only rows of the memory benchmark, on the real-size UniDiffuser architecture (random weights, 512 px):
# peak CUDA memory (max allocated and reserved, the CUDA context apart), fp16, xformers against SDPA, 8-bit Adam on
# CUDA, the NF4 and int8 bases (QLoRA) with bitsandbytes' CUDA kernels, and step times, each beside `lora-db estimate`. Expected to take 5-8 minutes on one recent GPU (not timed:
# written on a machine without one); on a card under ~21 GiB the fp32 full fine-tuning row ends as "failed (exit 1)"
# with the out-of-memory message, which is itself the answer.
#
#   pip install -e ".[xformers]"          # optional: without xformers its row fails with a one-line reason
#   bash benchmarks/gpu_check.sh          # writes benchmarks/results/cuda.json, cuda.md, cuda.png
#   bash benchmarks/gpu_check.sh --configs lora-fp16,lora-bf16-ckpt-8bit-cached    # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU run benchmarks/memory.py" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

configs=full-fp32-adamw,full-8bit-ckpt,lora-fp16,lora-bf16-ckpt,lora-bf16-ckpt-8bit
configs+=,lora-bf16-ckpt-8bit-cached,lora-bf16-ckpt-8bit-cached-xformers
configs+=,lora-bf16-ckpt-8bit-cached-nf4,lora-bf16-ckpt-8bit-cached-int8
exec python benchmarks/memory.py --models random:unidiffuser-v1 --configs "$configs" --name cuda "$@"
