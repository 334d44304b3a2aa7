"""The estimate of a quantized base: what bitsandbytes keeps outside autograd's saved tensors is counted as long as
training keeps it, no longer."""

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
