"""What brings the estimate within 5 % of the measured peaks (benchmarks/README.md): bitsandbytes' int8 inputs counted
as long as training keeps them and no longer, and on a CPU the kernels' own buffers the trace cannot see."""

from __future__ import annotations

import pytest

import lora_db.training.estimate as estimate_module
from lora_db.config.train import TrainConfig
from lora_db.training.estimate import estimate_memory

QUANTIZED = {"mixed_precision": "bf16", "gradient_checkpointing": True, "cache_latents": True}


@pytest.mark.slow
@pytest.mark.parametrize("quantize_base", ["int8", "nf4"])
def test_a_second_traced_step_keeps_no_activation_of_the_first(monkeypatch, quantize_base):
    """bitsandbytes' int8 matmul keeps each layer's input on its autograd context, which training frees when the step
    ends; the trace once kept every first-step input into the second step (+33 % on the real-size int8 row)."""
    config = TrainConfig(model="tiny", quantize_base=quantize_base, **QUANTIZED)
    two_steps = estimate_memory(config, device="cpu")
    monkeypatch.setattr(estimate_module, "_TRACED_STEPS", 1)
    one_step = estimate_memory(config, device="cpu")
    assert two_steps.at_peak["activations"] == one_step.at_peak["activations"]
    assert two_steps.components["unet"].saved_activations > 0


@pytest.mark.slow
def test_a_cpu_estimate_adds_the_kernels_buffers_and_a_cuda_one_does_not():
    """One fp32 copy of the U-ViT's feed-forward hidden activation per example, and oneDNN's reduced-precision
    kernels with bf16 weights: what benchmarks/memory.py measured beyond the trace at two model sizes."""
    from lora_db.models.loading import load_pipeline

    pipe = load_pipeline("tiny")
    unet = pipe.unet.config
    fp32, bf16, cuda = (
        estimate_memory(TrainConfig(model="tiny", **options), device=device)
        for options, device in (({}, "cpu"), ({"mixed_precision": "bf16"}, "cpu"), ({}, "cuda"))
    )
    side = fp32.resolution // pipe.vae_scale_factor // unet.patch_size
    tokens = side * side + unet.num_text_tokens + 3 + int(unet.use_data_type_embedding)
    assert fp32.process_bytes == tokens * 4 * unet.num_attention_heads * unet.attention_head_dim * 4
    assert bf16.process_bytes == fp32.process_bytes + estimate_module.REDUCED_PRECISION_KERNEL_BYTES
    assert cuda.process_bytes == 0 and cuda.total_bytes == cuda.peak_bytes + cuda.context_bytes
    assert fp32.total_bytes == fp32.peak_bytes + fp32.process_bytes
    assert "CPU kernel buffers" in fp32.format()
