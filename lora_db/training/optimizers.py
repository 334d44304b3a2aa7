"""The optimizer of a training run and its learning-rate schedule, each optimizer from its own library.

    lora-db train ... --optimizer prodigy               # lr 1.0: Prodigy estimates the step size itself
    lora-db train ... --optimizer schedulefree-adamw    # no schedule; samples and saves its averaged weights
    lora-db train ... --optimizer lion8bit              # lr 3e-5 by default: Lion's sign updates are larger

| --optimizer          | library      | state kept per trained weight              | default lr |
|----------------------|--------------|--------------------------------------------|------------|
| `adamw`              | torch        | two fp32 moments (8 bytes)                 | 1e-4       |
| `adamw8bit`          | bitsandbytes | two 8-bit moments (2 bytes)                | 1e-4       |
| `prodigy`            | prodigyopt   | two moments, the start and a sum (16 bytes)| 1.0        |
| `adafactor`          | transformers | one row and one column per matrix          | 1e-4       |
| `lion8bit`           | bitsandbytes | one 8-bit moment (1 byte)                  | 3e-5       |
| `schedulefree-adamw` | schedulefree | the z sequence and one moment (8 bytes)    | 1e-4       |

The libraries outside lora-db's dependencies install with `pip install 'lora-db[optimizers]'`. Schedule-free AdamW
trains at an interpolation of two sequences and evaluates at their average: `averaged_weights` switches it to the
average before anything samples, checks or saves the weights, and `training_weights` back before each step
(both are no-ops for the other optimizers). Checkpoints hold the average, so a resumed run switches back exactly
as the uninterrupted run did.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from dataclasses import dataclass

import torch

from lora_db.adapters.variants import loraplus_optimizer
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")


@dataclass(frozen=True)
class Library:
    module: str  # what is imported
    package: str  # what pip installs


LIBRARIES = {
    "adamw8bit": Library("bitsandbytes", "bitsandbytes"),
    "lion8bit": Library("bitsandbytes", "bitsandbytes"),
    "prodigy": Library("prodigyopt", "prodigyopt"),
    "adafactor": Library("transformers", "transformers"),
    "schedulefree-adamw": Library("schedulefree", "schedulefree"),
}


def check_optimizer(config: TrainConfig) -> None:
    """Before any model loads: the optimizer's library is installed; a learning rate against its convention is
    pointed out."""
    library = LIBRARIES.get(config.optimizer)
    if library is not None and importlib.util.find_spec(library.module) is None:
        raise LoraDBError(
            f"--optimizer {config.optimizer} needs {library.package}: `pip install {library.package}` "
            "(or `pip install 'lora-db[optimizers]'`), or use --optimizer adamw"
        )
    if config.optimizer == "prodigy" and config.learning_rate < 0.1:
        logger.warning(
            "--optimizer prodigy multiplies the step size it estimates by --learning-rate: %g makes every step "
            "%.0fx smaller than Prodigy's own estimate (its convention is 1.0)",
            config.learning_rate,
            1 / config.learning_rate,
        )


def optimizer_class(config: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, object]]:
    """The optimizer's class and the options lora-db gives it besides the learning rate and weight decay."""
    name = config.optimizer
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit), {}
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Bias correction and, under a warm-up, the safeguard: what Prodigy's authors advise for diffusion models.
        return Prodigy, {"use_bias_correction": True, "safeguard_warmup": config.lr_warmup_steps > 0}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # The learning rate is ours (and the schedule's), not Adafactor's relative step.
        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    if name == "schedulefree-adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree, {"warmup_steps": config.lr_warmup_steps}
    return torch.optim.AdamW, {}


def setup_optimizer(config: TrainConfig, models):
    """The optimizer over every trained component (each at its learning rate; LoRA+ splits A and B) and its
    learning-rate schedule, ready to step."""
    from diffusers.optimization import get_scheduler

    cls, options = optimizer_class(config)
    rates = {
        component: (config.text_encoder_learning_rate if component == "text_encoder" else None) or config.learning_rate
        for component in models.trained
    }
    if config.loraplus_lr_ratio is not None:
        optimizer = loraplus_optimizer(
            models.trained, rates, config.loraplus_lr_ratio, cls, weight_decay=config.weight_decay, **options
        )
    else:
        groups = [
            {"params": [p for p in module.parameters() if p.requires_grad], "lr": rates[component]}
            for component, module in models.trained.items()
        ]
        with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints its weight-decay mode
            optimizer = cls(groups, lr=config.learning_rate, weight_decay=config.weight_decay, **options)
    schedule_free = config.optimizer == "schedulefree-adamw"  # its warm-up is its own, and it needs no schedule
    scheduler = get_scheduler(
        "constant" if schedule_free else config.lr_scheduler,
        optimizer,
        num_warmup_steps=0 if schedule_free else config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    training_weights(optimizer)
    return optimizer, scheduler


def _schedule_free(optimizer) -> torch.optim.Optimizer | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return inner if "train_mode" in inner.param_groups[0] else None


def averaged_weights(optimizer) -> None:
    """Schedule-free: put the averaged weights (what it evaluates at) into the model; others: nothing."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.eval()


def training_weights(optimizer) -> None:
    """Schedule-free: the interpolated weights a step is taken at, back in the model; others: nothing."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.train()


def stepped_optimizer(optimizer):
    """The optimizer a step calls: the one accelerate wraps where its wrapper adds nothing to a step (no fp16 gradient
    scaler, not XLA; lora-db accumulates gradients itself). The wrapper asks importlib whether lomo_optim is installed
    twice a step: 0.3 ms of tiny-world's 25 ms step on a CPU (benchmarks/README.md, Speed)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType

    if not isinstance(optimizer, AcceleratedOptimizer) or optimizer.scaler is not None:
        return optimizer
    if optimizer.accelerator_state.distributed_type == DistributedType.XLA:
        return optimizer
    return optimizer.optimizer


def gradient_clipper(accelerator):
    """What clips a step's gradients: torch's `clip_grad_norm_` where accelerate's adds nothing (no fp16 gradient
    scaler to unscale first; plain or DDP processes, whose gradients are whole tensors), else accelerate's. Its
    version sorts the gradients by DTensor mesh and norms the one total again: 0.1 ms of tiny-world's 25 ms step."""
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.scaler is not None or accelerator.distributed_type not in plain:
        return accelerator.clip_grad_norm_
    return torch.nn.utils.clip_grad_norm_


def current_learning_rate(optimizer, scheduler) -> float:
    """The rate the last step used: Prodigy's estimated step size times its lr, schedule-free's warmed-up rate,
    or the schedule's."""
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]
    if "d" in group and "d0" in group:
        return float(group["d"] * group["lr"])
    if "scheduled_lr" in group:
        return float(group["scheduled_lr"])
    return scheduler.get_last_lr()[0]
