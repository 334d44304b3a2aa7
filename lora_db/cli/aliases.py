"""diffusers' DreamBooth flag names, accepted by `lora-db train` / `estimate` as hidden aliases.

A command written for diffusers' `train_dreambooth_lora.py` runs as it is: each flag that means the same thing maps
one-to-one onto a lora-db option (`--pretrained_model_name_or_path` -> `--model`, `--use_8bit_adam` ->
`--optimizer adamw8bit`), every lora-db option is also accepted with underscores (`--cache_latents`), and a flag
lora-db has no meaning for is refused with one line saying what to use instead. docs/diffusers-flags.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_db.errors import LoraDBError


@dataclass(frozen=True)
class Alias:
    flag: str  # diffusers' spelling
    field: str  # the TrainConfig field it sets
    switch_value: Any = None  # for a switch (no value): what the field becomes; None: takes the field's value


RENAMED = (
    Alias("--pretrained_model_name_or_path", "model"),
    Alias("--instance_data_dir", "instance_dir"),
    Alias("--class_data_dir", "class_dir"),
    Alias("--sample_batch_size", "class_generation_batch_size"),
    Alias("--text_encoder_lr", "text_encoder_learning_rate"),
    Alias("--adam_weight_decay", "weight_decay"),
    Alias("--use_8bit_adam", "optimizer", "adamw8bit"),
    Alias("--enable_xformers_memory_efficient_attention", "attention", "xformers"),
    Alias("--hub_model_id", "push_to_hub"),
    # kohya's sd-scripts
    Alias("--network_weights", "init_adapter"),
    Alias("--network_dim", "rank"),
    Alias("--network_alpha", "alpha"),
)

# Switches with no lora-db option of their own: checked against the resulting configuration.
REQUIRES = {
    "--with_prior_preservation": "lora-db turns prior preservation on with --class_prompt and --class_data_dir",
    "--push_to_hub": "lora-db uploads with --hub_model_id REPO (or --push-to-hub REPO)",
}

# Flags of diffusers' scripts that lora-db has no meaning for: (takes a value, what to do instead).
REFUSED: dict[str, tuple[bool, str]] = {
    "--revision": (True, "download that revision (`hf download REPO --revision R --local-dir DIR`), then --model DIR"),
    "--variant": (True, "lora-db loads the pipeline's own weights; --mixed-precision bf16|fp16 stores them smaller"),
    "--tokenizer_name": (True, "UniDiffuser's tokenizers come with the pipeline; drop it"),
    "--center_crop": (False, "lora-db center-crops unless --random-crop is given; drop it"),
    "--num_train_epochs": (True, "lora-db counts optimizer steps: use --max-train-steps"),
    "--validation_epochs": (True, "lora-db validates every N optimizer steps: use --validation-steps N"),
    "--scale_lr": (
        False,
        "lora-db uses --learning-rate as given: scale it by batch x accumulation x processes yourself",
    ),
    "--lr_num_cycles": (True, "lora-db's --lr-scheduler is constant, constant_with_warmup, linear or cosine"),
    "--lr_power": (True, "lora-db's --lr-scheduler is constant, constant_with_warmup, linear or cosine"),
    "--dataloader_num_workers": (True, "lora-db loads images in the training process (--cache-latents encodes once)"),
    "--adam_beta1": (True, "lora-db uses AdamW's default betas (0.9, 0.999); drop it"),
    "--adam_beta2": (True, "lora-db uses AdamW's default betas (0.9, 0.999); drop it"),
    "--adam_epsilon": (True, "lora-db uses AdamW's default epsilon (1e-8); drop it"),
    "--allow_tf32": (False, "lora-db leaves TF32 to PyTorch's defaults; drop it"),
    "--prior_generation_precision": (True, "class images are generated in the --mixed-precision dtype; drop it"),
    "--local_rank": (True, "start processes with torchrun or accelerate launch, which set the rank themselves"),
    "--logging_dir": (True, "lora-db logs into OUTPUT_DIR/logs"),
    "--hub_token": (True, "a token on the command line leaks into shell history: run `hf auth login` or set HF_TOKEN"),
    "--pre_compute_text_embeddings": (False, "lora-db encodes prompts once whenever the text encoder is frozen"),
    "--text_encoder_use_attention_mask": (False, "UniDiffuser's text path takes no attention mask; drop it"),
    "--tokenizer_max_length": (True, "UniDiffuser's prompts are 77 CLIP tokens; drop it"),
    "--class_labels_conditioning": (True, "UniDiffuser has no class-label conditioning; drop it"),
    "--validation_images": (True, "lora-db validates text-to-image from --validation-prompt"),
    "--set_grads_to_none": (False, "lora-db always sets gradients to None; drop it"),
}


def underscore_aliases(field_names: list[str], field_is_bool: dict[str, bool]) -> list[Alias]:
    """Every option spelled with underscores, unless a renamed alias or refused flag already owns that spelling."""
    taken = {a.flag for a in RENAMED} | set(REQUIRES) | set(REFUSED)
    aliases = []
    for name in field_names:
        flag = "--" + name
        if "_" in name and flag not in taken:
            aliases.append(Alias(flag, name, True if field_is_bool[name] else None))
    return aliases


def apply_aliases(values: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Fold the alias values the user typed (`given`: flag -> value or True) into `values` (field -> value).

    Returns the REQUIRES flags that were given, to check against the built configuration.
    """
    for flag in given:
        if flag in REFUSED:
            raise LoraDBError(f"{flag} is a diffusers option lora-db does not have: {REFUSED[flag][1]}")
    if "--hub_model_id" in given and "--push_to_hub" not in given:
        raise LoraDBError("--hub_model_id names the repository of --push_to_hub: add --push_to_hub, or drop it")
    by_flag = {a.flag: a for a in RENAMED}
    for flag, value in given.items():
        alias = by_flag.get(flag) or Alias(flag, flag[2:])
        if flag in REQUIRES:
            continue
        new = alias.switch_value if alias.switch_value is not None else value
        old = values.get(alias.field)
        if old is not None and old != new:
            option = "--" + alias.field.replace("_", "-")
            raise LoraDBError(f"{flag} and {option} both set {option} (to {new} and {old}): give only one")
        values[alias.field] = new
    return [flag for flag in given if flag in REQUIRES]


def check_required(flags: list[str], config) -> None:
    if "--with_prior_preservation" in flags and not config.with_prior_preservation:
        raise LoraDBError(f"--with_prior_preservation: {REQUIRES['--with_prior_preservation']}; add both")
    if "--push_to_hub" in flags and not config.push_to_hub:
        raise LoraDBError(f"--push_to_hub: {REQUIRES['--push_to_hub']}; add it")
