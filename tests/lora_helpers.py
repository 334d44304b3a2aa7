"""Shared by test_inference.py and test_merge.py: adapters with non-zero LoRA weights, seeded samples, the CLI."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_db.adapters.format import save_adapter
from lora_db.adapters.layers import inject_lora, lora_state_dict
from lora_db.adapters.spec import LoraSpec
from lora_db.config.train import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS

PROMPT = "a photo of sks robot"
# alpha != rank, so a merge or a hot-swap that ignored the scale would not match.
UNET_SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=UNET_ATTENTION_TARGETS)
TEXT_SPEC = LoraSpec(rank=2, alpha=1.0, target_modules=TEXT_ENCODER_TARGETS)


def _seeded_adapter(pipe, path: Path, specs: dict, seed: int, fill, metadata: dict) -> Path:
    """An adapter file for `pipe` whose LoRA tensors are `fill(tensor, seeded randn)`, one draw per tensor in order."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, spec in specs.items():
        module = copy.deepcopy(getattr(pipe, component))
        inject_lora(module, spec)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if ".lora_" in name:
                    param.copy_(fill(param, torch.randn(param.shape, generator=generator)))
        tensors[component] = lora_state_dict(module)
    return save_adapter(path, tensors, specs, metadata)


def make_adapter(pipe, path: Path, seed: int, *, text_encoder: bool = False, magnitude: float = 0.1) -> Path:
    """An adapter file for `pipe` whose A and B are seeded randn x magnitude (peft would start B at zero)."""
    specs = {"unet": UNET_SPEC} | ({"text_encoder": TEXT_SPEC} if text_encoder else {})
    metadata = {"base_model": "tiny", "instance_prompt": PROMPT, "steps": "0"}
    return _seeded_adapter(pipe, path, specs, seed, lambda param, noise: noise * magnitude, metadata)


def initial_latents(pipe, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    vae = torch.randn((1, pipe.num_channels_latents, size, size), generator=generator)
    clip = torch.randn((1, 1, pipe.image_encoder_projection_dim), generator=generator)
    return vae, clip


def t2i(pipe, seed: int = 0, steps: int = 2) -> np.ndarray:
    """One seeded text-to-image sample as floats (no uint8 rounding to hide differences)."""
    vae, clip = initial_latents(pipe, seed)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=PROMPT,
        vae_latents=vae,
        clip_latents=clip,
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    pipe.reset_mode()
    return out.images


def train_command(instance_dir, output_dir, prompt: str = PROMPT, model: str = "tiny") -> list:
    """`lora-db train`'s required arguments, for run_cli or a subprocess."""
    return ["train", "--model", model, "--instance-dir", instance_dir, "--instance-prompt", prompt,
            "--output-dir", output_dir]  # fmt: skip


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, list[str]]:
    """`lora-db ARGS` in this process through `main()`: exit code, stdout, non-empty stderr lines."""
    from lora_db.cli.application import main

    monkeypatch.setattr(sys, "argv", ["lora-db", *map(str, args)])
    monkeypatch.delenv("LORA_DB_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, [line for line in err.splitlines() if line.strip()]


def help_entries(text: str) -> dict[str, str]:
    """`--help` output as {flag: its whole entry}: the option's names (`-q, --quiet`, `--rank N`), two spaces, and
    its help, wrapped lines joined."""
    entries: dict[str, str] = {}
    flags: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            names, _, rest = line.strip().partition("  ")
            flags = [name.split()[0] for name in names.split(", ")]
            for flag in flags:
                entries[flag] = f"{names}  {rest.strip()}"
        elif flags and line.startswith("    ") and line.strip():
            for flag in flags:  # the help breaks lines after a slash too (`thu-ml/` + `unidiffuser-v1`)
                entries[flag] += ("" if entries[flag].endswith("/") else " ") + line.strip()
        else:
            flags = []
    return entries


def assert_one_line_error(result: tuple[int, str, list[str]], *fragments: str) -> None:
    code, _, err = result
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def make_variant_adapter(pipe, path: Path, seed: int, text_encoder: bool = True, **variant) -> Path:
    """Seeded non-zero A, B and (for DoRA) a magnitude that is not the base norm, so ignoring it would show."""
    specs = {"unet": LoraSpec(4, 8.0, UNET_ATTENTION_TARGETS, **variant)}
    if text_encoder:
        specs["text_encoder"] = LoraSpec(2, 3.0, TEXT_ENCODER_TARGETS, **variant)

    def fill(param, noise):
        return param * (1 + 0.2 * noise) if param.ndim == 1 else 0.2 * noise

    metadata = {"base_model": "tiny", "instance_prompt": "p", "steps": "0"}
    return _seeded_adapter(pipe, path, specs, seed, fill, metadata)


def uvit_and_text_outputs(pipe) -> list[torch.Tensor]:
    """Seeded CLIP text-encoder states and both U-ViT image outputs (fp32, no sampling loop to blur them)."""
    generator = torch.Generator().manual_seed(0)
    size, unet = pipe.unet.config.sample_size, pipe.unet
    latents = torch.randn((2, pipe.num_channels_latents, size, size), generator=generator)
    clip = torch.randn((2, 1, pipe.image_encoder_projection_dim), generator=generator)
    tokens = torch.randint(0, pipe.clip_tokenizer.vocab_size, (2, 77), generator=generator)
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens)[0]
        prompt = pipe.text_decoder.encode(hidden)
        img, clip_out, _ = unet(latents, clip, prompt, timestep_img=500, timestep_text=0, data_type=1)
    return [hidden, img, clip_out]


def assert_close(left: list[torch.Tensor], right: list[torch.Tensor], atol: float = 2e-5) -> None:
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
