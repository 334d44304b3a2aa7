"""Adapter variants in training: the LoRA spec a run asks for, LoRA+ learning rates, and starting from an adapter.

    lora-db train ... --use-dora                      # peft's DoRA: magnitude per output feature + LoRA direction
    lora-db train ... --use-rslora --rank 32          # scale alpha / sqrt(rank)
    lora-db train ... --loraplus-lr-ratio 16          # B matrices at 16 x the learning rate (LoRA+)
    lora-db train ... --init-adapter old/adapter.safetensors   # continue from an existing adapter's weights

peft does the math of each: `LoraConfig(use_dora=..., use_rslora=...)` and `create_loraplus_optimizer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from lora_db.adapters.format import read_adapter
from lora_db.adapters.layers import check_fits, load_lora_state_dict
from lora_db.adapters.spec import AdapterFile, LoraSpec
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")


def lora_spec(config: TrainConfig, target_modules: tuple[str, ...]) -> LoraSpec:
    return LoraSpec(
        config.rank,
        config.lora_alpha,
        tuple(target_modules),
        config.lora_dropout,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        kind=config.adapter_type,
    )


def loraplus_optimizer(
    trained: Mapping[str, nn.Module],
    learning_rates: Mapping[str, float],
    ratio: float,
    cls: type[torch.optim.Optimizer],
    weight_decay: float,
    **options: object,
) -> torch.optim.Optimizer:
    """peft's LoRA+ optimizer (`cls`, given `options`) over every trained component, each at its own base rate.

    `create_loraplus_optimizer` takes one model and one rate, so each component gets its own; the first
    optimizer then takes the other components' (non-empty) parameter groups, in a fixed order for resume.
    """
    from peft.optimizers import create_loraplus_optimizer

    optimizer = None
    for component, module in trained.items():
        built = create_loraplus_optimizer(
            module,
            cls,
            lr=learning_rates[component],
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=weight_decay,
            weight_decay=weight_decay,
            **options,
        )
        if optimizer is None:
            optimizer = built
        else:
            for group in built.param_groups:
                if group["params"]:
                    optimizer.add_param_group(group)
    return optimizer


def load_init_adapter(config: TrainConfig, specs: Mapping[str, LoraSpec], trained: Mapping[str, nn.Module]) -> None:
    """`--init-adapter FILE`: copy an adapter's weights into the freshly injected LoRA layers.

    Rank, alpha, targets and variant must equal what this run injects (the options to change are named);
    shapes and layers are checked against the model as for sampling. A component the file lacks starts fresh.
    """
    adapter = read_adapter(config.init_adapter)
    extra = [c for c in adapter.specs if c not in specs]
    if extra:
        hint = " (add --train-text-encoder)" if extra[0] == "text_encoder" else ""
        raise LoraDBError(f"--init-adapter {adapter.path} holds a {extra[0]} adapter this run does not train{hint}")
    for component, spec in specs.items():
        if component not in adapter.specs:
            logger.warning("--init-adapter %s has no %s adapter: it starts fresh", adapter.path, component)
            continue
        _check_same_spec(adapter, component, spec)
        check_fits(trained[component], adapter, component)
        load_lora_state_dict(trained[component], adapter.tensors[component])
    logger.info("starting from the weights of %s", adapter.path)


def _check_same_spec(adapter: AdapterFile, component: str, spec: LoraSpec) -> None:
    found = adapter.specs[component]
    options = [
        ("kind", "--adapter-type", found.kind, spec.kind),
        ("rank", "--rank", found.rank, spec.rank),
        ("alpha", "--alpha", found.alpha, spec.alpha),
        ("DoRA", "--use-dora" if found.use_dora else "--no-use-dora", found.use_dora, spec.use_dora),
        ("rsLoRA", "--use-rslora" if found.use_rslora else "--no-use-rslora", found.use_rslora, spec.use_rslora),
    ]
    for what, flag, in_file, in_run in options:
        if in_file != in_run:
            value = "" if isinstance(in_file, bool) else f" {in_file}" if isinstance(in_file, str) else f" {in_file:g}"
            raise LoraDBError(
                f"--init-adapter {adapter.path}: its {component} has {what} {in_file}, this run {in_run}; "
                f"pass {flag}{value}"
            )
    if set(found.target_modules) != set(spec.target_modules):
        fix = (
            f"pass --target-modules {','.join(found.target_modules)}"
            if component == "unet"
            else "lora-db trains the text encoder's q/k/v/out projections only"
        )
        raise LoraDBError(
            f"--init-adapter {adapter.path}: its {component} targets {','.join(found.target_modules)}, this run "
            f"{','.join(spec.target_modules)}; {fix}"
        )
