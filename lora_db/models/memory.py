"""Memory options: gradient checkpointing for the U-ViT, attention backends, dtypes, peak memory.

diffusers' UniDiffuserModel has no gradient-checkpointing branch (`enable_gradient_checkpointing()` raises), so
each transformer block is given a subclass of its own class whose forward runs under
`torch.utils.checkpoint`. Parameter names, state dicts and peft keys are unchanged, unlike with wrapper modules.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import resource
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_db.errors import LoraDBError


def uvit_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-ViT's transformer blocks in forward order (in, mid, out)."""
    transformer = unet.transformer
    return [
        *transformer.transformer_in_blocks,
        transformer.transformer_mid_block,
        *(out_block["block"] for out_block in transformer.transformer_out_blocks),
    ]


@functools.cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            # Non-reentrant: works with frozen inputs and keyword arguments, and replays dropout RNG exactly.
            return checkpoint(super(checkpointed, self).forward, *args, use_reentrant=False, **kwargs)
        return super(checkpointed, self).forward(*args, **kwargs)

    checkpointed = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_lora_db_checkpointed": True})
    return checkpointed


def enable_uvit_gradient_checkpointing(unet: nn.Module) -> int:
    """Recompute each U-ViT block during backward instead of storing its activations. Returns blocks changed."""
    blocks = uvit_blocks(unet)
    for block in blocks:
        if not getattr(block, "_lora_db_checkpointed", False):
            block.__class__ = _checkpointed(type(block))
    return len(blocks)


def disable_uvit_gradient_checkpointing(unet: nn.Module) -> None:
    for block in uvit_blocks(unet):
        if getattr(block, "_lora_db_checkpointed", False):
            block.__class__ = block.__class__.__bases__[0]


def compile_uvit_blocks(unet: nn.Module) -> int:
    """torch.compile each U-ViT block in place (parameter names unchanged), checkpointed or not. `fullgraph`: a
    graph break is an error instead of a silent return to eager mode. Returns blocks compiled."""
    blocks = uvit_blocks(unet)
    for block in blocks:
        block.compile(fullgraph=True)
    return len(blocks)


def eager_calls():
    """A context in which compiled blocks run eagerly: sampling with other shapes would compile them anew."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6, which --compile needs
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def uncompile_uvit_blocks(unet: nn.Module) -> None:
    for block in uvit_blocks(unet):
        block._compiled_call_impl = None  # what nn.Module.compile() set; __call__ is eager again


def enable_text_encoder_gradient_checkpointing(text_encoder: nn.Module) -> None:
    text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_attention_backend(attention: str) -> None:
    """Refuse xformers where it cannot run, before any model loads."""
    if attention != "xformers":
        return
    if importlib.util.find_spec("xformers") is None:
        raise LoraDBError(
            "--attention xformers: xformers is not installed; `pip install 'lora-db[xformers]'` or use --attention sdpa"
        )
    if not torch.cuda.is_available():
        raise LoraDBError(
            "--attention xformers needs a CUDA GPU (its kernels do not run on the CPU); use --attention sdpa"
        )


def set_attention_backend(model: nn.Module, attention: str) -> int:
    """Switch every diffusers Attention module of `model` to the backend. Returns modules changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        if attention == "xformers":
            module.set_use_memory_efficient_attention_xformers(True)
        else:
            module.set_processor(AttnProcessor2_0())
    return len(modules)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    if mixed_precision == "fp16" and device.type == "cpu":
        raise LoraDBError(
            "--mixed-precision fp16 needs a GPU (CPU autocast has no fp16 support); "
            "use --mixed-precision bf16 on the CPU"
        )


def upcast_trainable(*models: nn.Module) -> None:
    """Keep trainable weights in fp32 while frozen ones are stored in fp16/bf16 (stable optimizer updates)."""
    for model in models:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def _proc_status_bytes(field: str) -> int | None:
    """A field of /proc/self/status in bytes (read as bytes: half the time of decoding it line by line, and the
    training loop reads the peak after every step)."""
    try:
        with open("/proc/self/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    start = status.find(b"\n" + field.encode() + b":")
    if start < 0:
        return None
    return int(status[start:].split(maxsplit=2)[1]) * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counters on a GPU; on Linux the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak then counts from the process start


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory since the last reset: CUDA's max allocated bytes, or the process's peak resident memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else peak_memory_bytes(device)


def count_parameters(*models: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for m in models for p in m.parameters() if p.requires_grad or not trainable_only)
