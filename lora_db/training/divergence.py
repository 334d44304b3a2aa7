"""Divergence: a run whose weights or loss stop being finite numbers of a sane size ends in an error, never in an
adapter that samples black images.

The loss of every micro-batch is checked as it is computed (`check_loss`): NaN or infinite weights make the next
step's loss non-finite, so they are found one step after the update that made them. The trained weights themselves
(`check_weights`: NaN, infinities and magnitudes above `MAX_ABS_WEIGHT`, which no trained LoRA or U-ViT weight comes
near) are checked every `WEIGHT_CHECK_STEPS` updates, at the last step, before every save (checkpoint, stop, final
outputs) and before every validation or evaluation; a finite but outsized weight is therefore found before anything
is written or sampled from it, and the message names the steps between which it happened. On divergence the
checkpoints written from the diverged weights on are moved to OUTPUT_DIR/abandoned/, and the message names the
likely cause and the last good checkpoint, which a resumed run may continue with a lower learning rate
(`lora_db.training.resume`).
"""

from __future__ import annotations

import math

import torch

from lora_db.adapters.spec import MAX_ABS_WEIGHT, describe_peak, out_of_range
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.layout import ABANDONED_DIR, list_checkpoints
from lora_db.training.resume import retire_later_checkpoints

WEIGHT_CHECK_STEPS = 10  # every step cost tiny-world's 25 ms step 0.3 ms (1 %; benchmarks/README.md, Speed)
LARGE_SCALE = 16.0  # alpha / rank above this makes every update that much larger: named as the likely cause


class Diverged(LoraDBError):
    """The weights or the loss of a run stopped being finite numbers of a sane size."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet  # the other processes of a multi-process run: the main process says it


def likely_causes(config: TrainConfig) -> str:
    """What to change, most likely first: an outsized LoRA scale, the learning rates, fp16's narrow range."""
    causes = []
    if config.method == "lora":
        scale = config.lora_alpha / (math.sqrt(config.rank) if config.use_rslora else config.rank)
        if scale > LARGE_SCALE:
            causes.append(
                f"--alpha {config.lora_alpha:g} over --rank {config.rank} scales every update by {scale:.3g}: "
                "lower --alpha (the rank is usual)"
            )
    rates = f"--learning-rate {config.learning_rate:g}"
    if config.train_text_encoder and config.text_encoder_learning_rate is not None:
        rates += f" / --text-encoder-learning-rate {config.text_encoder_learning_rate:g}"
    causes.append(f"lower {rates}")
    if config.mixed_precision == "fp16":
        causes.append("use --mixed-precision bf16 instead of fp16")
    return ", or ".join(causes)


def diverged(
    config: TrainConfig, weights_step: int, what: str, main_process: bool, checked_at: int | None = None
) -> Diverged:
    """The error for weights that diverged at (or, by their loss, were found diverged at) `weights_step`, or after
    `checked_at` (the step whose weights were last found sane) if that is earlier than the step before; the
    checkpoints written from `weights_step` on are moved to abandoned/ first, so `latest` resumes from before (every
    checkpoint was checked before it was written)."""
    output_dir = config.output_dir
    moved = retire_later_checkpoints(output_dir, weights_step - 1) if main_process else []
    kept = list_checkpoints(output_dir)
    where = (
        f"resume the last good checkpoint with --resume-from-checkpoint {kept[-1]} and a lower --learning-rate "
        "(a resumed run may lower it)"
        if kept
        else "no checkpoint holds weights from before it: start afresh with --overwrite"
    )
    if moved:
        where = f"{len(moved)} checkpoint(s) from the diverged weights moved to {output_dir / ABANDONED_DIR}; {where}"
    when = f"at step {weights_step}"
    if checked_at is not None and checked_at < weights_step - 1:
        when = f"between steps {checked_at + 1} and {weights_step} (weights checked every {WEIGHT_CHECK_STEPS} steps)"
    return Diverged(
        f"training diverged {when}: {what}; {likely_causes(config)}; {where}",
        quiet=not main_process,
    )


@torch.no_grad()
def largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """The largest |value| of all `tensors` (NaN if any holds one) in one fused pass (four ops per tensor cost
    tiny-world's loop 4 % of its step; this pass 0.19 ms, hence every WEIGHT_CHECK_STEPS; benchmarks/README.md)."""
    if not tensors:
        return 0.0
    return float(torch.stack(torch._foreach_norm(tensors, math.inf)).max())


def weights_check_due(step: int, last_step: int) -> bool:
    """Whether the loop checks the weights after update `step` (saves, validation and evaluation check their own)."""
    return step % WEIGHT_CHECK_STEPS == 0 or step == last_step


def check_weights(
    config: TrainConfig, models, step: int, main_process: bool = True, checked_at: int | None = None
) -> None:
    """Refuse weights holding NaN, infinities or magnitudes above MAX_ABS_WEIGHT (every WEIGHT_CHECK_STEPS updates,
    before saves and sampling); `checked_at`: the step whose weights were last found sane, if known."""
    weights = models.named_trainable
    if largest_magnitude(list(weights.values())) <= MAX_ABS_WEIGHT:  # NaN compares False
        return
    bad = out_of_range(weights)  # tensor by tensor, to name the one
    if bad is not None:
        name, peak = bad
        what = f"{name} holds {describe_peak(peak)} (trained weights stay far below {MAX_ABS_WEIGHT:g})"
        raise diverged(config, step, what, main_process, checked_at)


def check_loss(config: TrainConfig, loss: torch.Tensor, weights_step: int, main_process: bool = True) -> None:
    """A non-finite loss means the weights it was computed with (after `weights_step` updates) diverged."""
    if not torch.isfinite(loss):
        raise diverged(config, weights_step, f"the loss became {loss.item()}", main_process)
