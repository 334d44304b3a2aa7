"""--compile: the U-ViT's blocks compiled by torch.compile before the first step, or eager mode with one warning.

    run = setup_run(config, accelerator)
    run.compiled = compile_unet(run, micro_batch_loss)   # {"compiled": True, "compile_s": 41.3} or the reason not

Compilation happens on one forward and backward of the first micro-batch (its random draws put back, its gradients
dropped), so the time it takes is logged apart from the steps', and a configuration torch cannot compile is found
before training, not in the middle of step 1. Blocks compile with `fullgraph=True`, so a graph break is an error;
and the profiler must see every block run compiled code in that pass, which catches dynamo falling back to eager by
itself. (A forward hook that noted it cost each block call a second compiled frame: 12 % of a compiled tiny-world
step.)
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from lora_db.config.train import TrainConfig
from lora_db.models.memory import compile_uvit_blocks, uncompile_uvit_blocks

logger = logging.getLogger("lora_db")
MINIMUM_TORCH = (2, 6)  # torch.compiler.set_stance, which keeps sampling eager
COMPILED_REGION = "Torch-Compiled Region"  # the profiler's name for a run of compiled code (torch >= 2.6)


def eager_reason(config: TrainConfig) -> str | None:
    """Why torch cannot compile this configuration, known before trying; None when it can."""
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < MINIMUM_TORCH:
        return f"it needs torch {'.'.join(map(str, MINIMUM_TORCH))} or newer (this is {torch.__version__})"
    if config.quantize_base == "int8" and config.gradient_checkpointing:
        # Measured with torch 2.13: dynamo refuses the mutation of bitsandbytes' MatmulLtState inside checkpoint.
        return (
            "bitsandbytes' int8 matmul changes its state inside a checkpointed block, which torch.compile cannot "
            "trace (drop --gradient-checkpointing, or use --quantize-base nf4)"
        )
    return None


def compile_unet(run, loss_fn) -> dict:
    """Compile the U-ViT's blocks for `run` on one pass of `loss_fn(run, 0)`; what happened, for summary.json."""
    if not run.config.compile:
        return {}
    unet = run.models.unet
    reason = eager_reason(run.config)
    if reason is None:
        started = time.perf_counter()
        blocks = compile_uvit_blocks(unet)
        try:
            compiled_calls = _first_pass(run, loss_fn)
        except (torch._dynamo.exc.TorchDynamoException, RuntimeError) as err:
            if not _compile_error(err):
                raise
            reason = f"torch.compile failed: {_first_line(err)}"
        else:
            if compiled_calls < blocks:  # each block runs once in the forward
                reason = f"torch.compile ran {blocks - compiled_calls} of {blocks} blocks eagerly"
        if reason is None:
            seconds = time.perf_counter() - started
            logger.info("--compile: %d U-ViT blocks compiled in %.1f s (one forward and backward)", blocks, seconds)
            return {"compiled": True, "compiled_blocks": blocks, "compile_s": round(seconds, 2)}
        uncompile_uvit_blocks(unet)
    logger.warning("--compile: %s; training runs in eager mode", reason)
    return {"compiled": False, "reason": reason}


def _first_pass(run, loss_fn) -> int:
    """Forward and backward of the first micro-batch without a trace (random draws restored, gradients dropped);
    returns how many times compiled code ran, as the profiler saw it: dynamo marks each run of a compiled region."""
    from torch.profiler import ProfilerActivity, profile

    accelerator = run.accelerator
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    generator_state = run.generator.get_state()
    try:
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            for module in run.wrapped.values():  # no gradient all-reduce for a pass that updates nothing
                stack.enter_context(accelerator.no_sync(module))
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                loss = loss_fn(run, 0)
            accelerator.backward(loss)
    finally:
        run.generator.set_state(generator_state)
        run.optimizer.zero_grad(set_to_none=True)
    return sum(event.count for event in profiler.key_averages() if event.key.startswith(COMPILED_REGION))


def _compile_error(err: BaseException) -> bool:
    """Dynamo's and inductor's errors, and torch's own "torch.compile with fullgraph=True found no compiled frames";
    not an error of the step itself (out of memory, a bad batch), which eager training would meet as well."""
    return isinstance(err, torch._dynamo.exc.TorchDynamoException) or str(err).startswith("torch.compile")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]
