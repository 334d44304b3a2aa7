"""Dispatch modes for `lora_db.training.estimate`'s trace: ops on fake tensors that must run otherwise than their
fake kernels would, so that the trace allocates what training allocates.

- `host_tensors_stay_real_mode`: ops on host tensors only (data order, token ids) run for real, uncounted.
- `kernels_mode`: ops whose real kernels allocate inside themselves, which a fake kernel (output only) does not:
  bitsandbytes' NF4 matmul and, on a CPU, its optimizer updates, traced through its own Python implementations;
  and on a CPU the temporaries of in-place ops whose operands promote (`promotion_temporaries`).
"""

from __future__ import annotations

import torch


def host_tensors_stay_real_mode():
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from torch.utils._pytree import tree_leaves

    class HostTensorsStayReal(TorchDispatchMode):
        """Ops on host tensors only (data order, image batches, token ids) run for real and are not counted.

        The data order is drawn with randperm and read back with int(), which a fake tensor cannot answer.
        A number read back from a fake tensor (Prodigy's step-size estimate reads sums with `.item()`) is 1: it
        steers no allocation.
        """

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if func is torch.ops.aten._local_scalar_dense.default and isinstance(tensors[0], FakeTensor):
                return True if tensors[0].dtype == torch.bool else 1
            host = func is torch.ops.aten.randperm.generator or (
                tensors and not any(isinstance(t, FakeTensor) for t in tensors)
            )
            if host:
                with _disable_current_modes():
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    return HostTensorsStayReal()


def kernels_mode(quantize_base: str, device: str):
    """bitsandbytes ops whose fake kernels yield only their outputs, traced through bitsandbytes' own Python
    implementations instead, so that what they allocate inside is counted while they hold it:

    - NF4's forward matmul (`bitsandbytes::gemm_4bit`): its CPU implementation (and its CUDA one for
      training-sized inputs on most GPUs) dequantizes the whole weight first, then multiplies (the default one).
    - on a CPU, the 8-bit optimizers' update (`optimizer_update_8bit_blockwise`) and the 32-bit one kept for tensors
      under 4096 elements (`optimizer_update_32bit`): the CPU kernels dequantize both moments of the tensor to fp32,
      scale a fp32 copy of its gradient and divide by the square root of the second moment, about 20 bytes an
      element at once for the largest trained tensor (full fine-tuning of random:small: 18 MiB the trace missed).
      CUDA's kernels update in place.
    - on a CPU, in-place ops whose operands promote to another dtype (`promotion_temporaries`).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    implementations = {}
    if quantize_base == "nf4":
        from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

        implementations[torch.ops.bitsandbytes.gemm_4bit.default] = _gemm_4bit_default_impl
    if device == "cpu":
        from bitsandbytes.backends.cpu.ops import _optimizer_update_8bit_blockwise_cpu, _optimizer_update_32bit_cpu

        implementations[torch.ops.bitsandbytes.optimizer_update_8bit_blockwise.default] = (
            _optimizer_update_8bit_blockwise_cpu
        )
        implementations[torch.ops.bitsandbytes.optimizer_update_32bit.default] = _optimizer_update_32bit_cpu

    class KernelsAsTheyAllocate(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            held = promotion_temporaries(func, args) if device == "cpu" else []  # noqa: F841 (held while it runs)
            return implementations.get(func, func)(*args, **(kwargs or {}))

    return KernelsAsTheyAllocate()


def promotion_temporaries(func, args) -> list[torch.Tensor]:
    """What a CPU in-place op allocates when its operands promote to another dtype: TensorIterator computes in the
    common dtype, so each operand of another dtype is copied into it, the result too, and then copied back; on CUDA
    the kernel casts as it reads. bitsandbytes' int8 matmul on a CPU scales the bf16 copy of each weight in place by
    fp32 scales (`CB.to(A.dtype).mul_(SCB...)`, forward and backward): two fp32 copies of the weight, 8 MiB
    for random:small's largest, as measured on one such `mul_`; the int8 row was -6.5 % without them."""
    name = func._schema.name
    if not name.endswith("_") or name == "aten::copy_" or len(args) < 2 or not isinstance(args[1], torch.Tensor):
        return []  # copy_ casts as it copies: no common dtype
    target, other = args[0], args[1]
    common = torch.result_type(target, other)
    if common == target.dtype:
        return []
    # The result in the common dtype, and every operand not in it (the target always: it is read, too).
    shapes = [target.shape, target.shape] + ([other.shape] if other.dtype != common else [])
    return [torch.empty(shape, dtype=common, device=target.device) for shape in shapes]
