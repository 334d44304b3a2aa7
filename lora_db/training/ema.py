"""`--use-ema`: an exponential moving average of the trained weights, and which weights the model holds when.

    lora-db train ... --use-ema --ema-decay 0.995

After every optimizer step each average moves towards its weight: `average = d x average + (1 - d) x weight`, with
d = min(--ema-decay, (1 + step) / (10 + step)) (diffusers' EMAModel rule, so the first steps are not dominated by
the untrained start). Validation and `--eval-steps` sample the average, the adapter file is the average and
`adapter-raw.safetensors` beside it the weights the optimizer trained; checkpoints keep both, so resume is exact.
The average costs one fp32 copy of the trained weights (`lora-db estimate` counts it).

`evaluation_weights(run)` puts the weights to sample, score and save into the model (the EMA, or schedule-free's
average) and `training_weights(run)` those a step is taken at; both are copies or exact switches, so sampling in
between leaves the run as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_db.training import optimizers


class EMA:
    """The moving average of `parameters` (name -> trained weight), kept in fp32 beside them."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        self.parameters, self.decay = parameters, decay
        self.average = {name: p.detach().float().clone() for name, p in parameters.items()}
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights while the average is applied

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the weights after optimizer step `step` (counted from 1)."""
        averages = list(self.average.values())
        weights = [p.detach().float() for p in self.parameters.values()]
        torch._foreach_lerp_(averages, weights, 1 - self.decay_at(step))

    @torch.no_grad()
    def apply(self) -> None:
        """The average into the model, the trained weights kept aside (again: nothing changes)."""
        if self._trained is not None:
            return
        self._trained = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, param in self.parameters.items():
            param.copy_(self.average[name])

    @torch.no_grad()
    def restore(self) -> None:
        """The trained weights back into the model (when the average is not applied: nothing changes)."""
        if self._trained is None:
            return
        for name, param in self.parameters.items():
            param.copy_(self._trained[name])
        self._trained = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.average):
            raise KeyError("the checkpoint's EMA holds other weights than this run trains")
        for name, tensor in state.items():
            self.average[name].copy_(tensor)


def setup_ema(config, parameters: dict[str, nn.Parameter]) -> EMA | None:
    return EMA(parameters, config.ema_decay) if config.use_ema else None


def evaluation_weights(run) -> None:
    """The weights to sample, score and save: the EMA, or schedule-free's average; for others the trained ones."""
    optimizers.averaged_weights(run.optimizer)
    if run.ema is not None:
        run.ema.apply()


def training_weights(run) -> None:
    """The weights the next optimizer step is taken at."""
    if run.ema is not None:
        run.ema.restore()
    optimizers.training_weights(run.optimizer)


def checkpoint_weights(run) -> None:
    """The weights a checkpoint keeps: the trained ones (the EMA goes beside them), schedule-free's average (with
    its state in the mode that average belongs to)."""
    optimizers.averaged_weights(run.optimizer)
    if run.ema is not None:
        run.ema.restore()
