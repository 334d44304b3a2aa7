"""--compile and --keep-sampling-encoders: the step runs compiled (or says, once, why it does not), and validation
leaves kept encoders where they are."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lora_db.config.train import TrainConfig
from lora_db.models.memory import uvit_blocks
from lora_db.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def summary(result) -> dict:
    return json.loads((result.output_dir / "summary.json").read_text())


def compile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--compile" in r.getMessage()]


@pytest.mark.slow
def test_compiled_blocks_run_compiled_and_train_as_eager_does(tiny_config, tmp_path, caplog):
    options = {"gradient_checkpointing": True, "max_train_steps": 3}
    eager = train(tiny_config(output_dir=tmp_path / "eager", **options))
    compiled = train(tiny_config(output_dir=tmp_path / "compiled", compile=True, **options))
    record = summary(compiled)["compile"]
    assert record["compiled"] is True, record
    assert record["compiled_blocks"] == 5  # the tiny U-ViT's blocks: 2 in, 1 mid, 2 out
    assert record["compile_s"] > 0
    assert compile_warnings(caplog) == []
    assert "compile" not in summary(eager)
    # Inductor fuses and reorders float arithmetic: the same run, not the same bits.
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3, abs=1e-5)


def test_a_silent_fall_back_to_eager_is_caught_and_said_once(tiny_config, caplog):
    # Under the force_eager stance compiled modules run their eager code and raise nothing: what lora-db must notice.
    with torch.compiler.set_stance("force_eager"):
        result = train(tiny_config(compile=True, max_train_steps=2))
    record = summary(result)["compile"]
    assert record["compiled"] is False
    assert "eagerly" in record["reason"]
    assert len(compile_warnings(caplog)) == 1
    assert result.steps == 2


def test_int8_with_checkpointing_trains_eagerly_after_one_warning(tiny_config, caplog):
    config = tiny_config(
        compile=True, quantize_base="int8", mixed_precision="bf16", gradient_checkpointing=True, max_train_steps=2
    )
    result = train(config)
    record = summary(result)["compile"]
    assert record["compiled"] is False
    assert "--gradient-checkpointing" in record["reason"]
    [warning] = compile_warnings(caplog)
    assert "eager mode" in warning
    assert result.steps == 2


def test_compiled_blocks_keep_their_parameter_names(pristine):
    import copy

    from lora_db.models.memory import compile_uvit_blocks, uncompile_uvit_blocks

    unet = copy.deepcopy(pristine.unet)
    names = list(unet.state_dict())
    assert compile_uvit_blocks(unet) == len(uvit_blocks(unet))
    assert list(unet.state_dict()) == names
    uncompile_uvit_blocks(unet)
    assert all(block._compiled_call_impl is None for block in uvit_blocks(unet))


# -- validation and the encoders ------------------------------------------------------------------------------------

ENCODERS = ("AutoencoderKL", "CLIPVisionModelWithProjection", "CLIPTextModel")


def encoder_moves(monkeypatch, config: TrainConfig) -> int:
    """How many times training called .to() on the VAE, the image encoder or the text encoder."""
    moves = []
    original = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        if type(module).__name__ in ENCODERS:
            moves.append(type(module).__name__)
        return original(module, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "to", spy)
        train(config)
    return len(moves)


@pytest.mark.slow
def test_validation_leaves_kept_encoders_on_the_device(tiny_config, tmp_path, monkeypatch):
    def moves(steps: int, keep: bool) -> int:
        config = tiny_config(
            output_dir=tmp_path / f"{steps}-{keep}",
            max_train_steps=steps,
            validation_prompt="a photo of sks robot",
            validation_steps=1,
            validation_inference_steps=2,
            num_validation_images=1,
            keep_sampling_encoders=keep,
            cache_latents=True,
        )
        return encoder_moves(monkeypatch, config)

    # Kept: only setting up moves them, however many validations follow.
    assert moves(1, keep=True) == moves(3, keep=True)
    # Not kept (the default): each validation moves them onto the device and off again.
    assert moves(3, keep=False) > moves(1, keep=False)


def test_releasing_what_is_already_released_skips_the_collection(pristine, monkeypatch):
    """After each validation the idle modules are released again; on a CPU nothing moves, and a full collection
    (seconds in a process holding a pipeline) would free nothing."""
    import copy
    import gc

    from lora_db.training.setup import release_idle_modules

    pipe = copy.deepcopy(pristine)
    config = TrainConfig(model="tiny", validation_prompt="a photo of sks robot", cache_latents=True)
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    release_idle_modules(config, pipe)  # the caption decoder's GPT-2 leaves: collected
    assert len(collections) == 1
    release_idle_modules(config, pipe)
    assert len(collections) == 1
    assert pipe.text_decoder.transformer.device.type == "meta" and pipe.vae.device.type == "cpu"
