"""--use-ema: the moving average of the trained weights is updated after every step, sampled by validation, saved
as the adapter (the trained weights beside it), checkpointed and resumed exactly."""

from __future__ import annotations

import pytest
import torch
from resume_helpers import assert_resumed_exactly, run_and_resume
from safetensors.torch import load_file

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.training.ema import EMA
from lora_db.training.loop import train


def test_the_average_follows_the_weights_at_the_warmed_up_decay():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": weight}, decay=0.9)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(1)  # decay min(0.9, 2 / 11): the first steps follow the weights closely
    torch.testing.assert_close(ema.average["w"], torch.full((3,), 1 - 2 / 11))
    ema.update(100)  # then at most 0.9
    torch.testing.assert_close(ema.average["w"], torch.full((3,), 1 - 0.9 * 2 / 11))
    average = ema.average["w"].clone()
    ema.apply()
    ema.apply()  # twice: still the trained weights kept aside
    assert torch.equal(weight.detach(), average)
    ema.restore()
    assert torch.equal(weight.detach(), torch.ones(3))
    ema.restore()
    assert torch.equal(weight.detach(), torch.ones(3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ema_decay": 0.99}, "--ema-decay sets --use-ema's decay"),
        ({"use_ema": True, "optimizer": "schedulefree-adamw"}, "already samples and saves an average"),
        ({"use_ema": True, "method": "full"}, "--use-ema averages LoRA weights"),
        ({"use_ema": True, "ema_decay": 1.0}, "--ema-decay must be"),
    ],
)
def test_impossible_ema_options_are_refused(options, message):
    with pytest.raises(LoraDBError, match=message):
        TrainConfig(model="tiny", **options)
    assert TrainConfig(model="tiny", use_ema=True).ema_decay == 0.995


def test_the_adapter_is_the_average_and_the_trained_weights_lie_beside_it(tiny_config, monkeypatch, one_thread):
    import lora_db.training.loop as loop
    import lora_db.training.setup as setup

    emas = []
    make = setup.setup_ema

    def remember(*args):
        emas.append(make(*args))
        return emas[-1]

    sampled = []

    def validation(config, models, accelerator, step):
        weights = {name: p.detach().clone() for name, p in emas[0].parameters.items()}
        sampled.append(all(torch.equal(weights[name], emas[0].average[name]) for name in weights))
        return config.output_dir / "validation"

    monkeypatch.setattr(setup, "setup_ema", remember)
    monkeypatch.setattr(loop, "run_validation", validation)
    config = tiny_config(
        use_ema=True,
        ema_decay=0.9,
        train_text_encoder=True,
        max_train_steps=6,
        checkpointing_steps=6,
        validation_prompt="a photo of sks robot",
        validation_steps=3,
        learning_rate=1e-2,
    )
    result = train(config)
    assert sampled == [True, True]  # validation at steps 3 and 6 sampled the average
    checkpoint = config.output_dir / "checkpoint-6"
    average = load_file(str(checkpoint / "ema.safetensors"))
    trained = load_file(str(checkpoint / "trainable.safetensors"))
    adapter = load_file(str(result.adapter_path))
    raw = load_file(str(config.output_dir / "adapter-raw.safetensors"))
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key in lora_keys:  # checkpoint keys: component.module.lora_A.default.weight; adapter: without .default
        file_key = key.replace(".default.weight", ".weight")
        assert torch.equal(adapter[file_key], average[key]), key
        assert torch.equal(raw[file_key], trained[key]), key
    assert any(not torch.equal(average[k], trained[k]) for k in lora_keys)


def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path, one_thread):
    options = {
        "use_ema": True,
        "ema_decay": 0.9,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "train_text_encoder": True,
        "validation_prompt": "a photo of sks robot",  # samples the average at the checkpoint's step
        "validation_steps": 3,
        "num_validation_images": 1,
        "validation_inference_steps": 2,
    }
    full, interrupted = run_and_resume(tiny_config, tmp_path, 3, **options)
    assert_resumed_exactly(full, interrupted, 3, files=("adapter.safetensors", "adapter-raw.safetensors"))
    # The average lives in the checkpoint: resuming a run with --use-ema without it is refused by name.
    with pytest.raises(LoraDBError, match="--use-ema"):
        train(tiny_config(output_dir=full, resume_from_checkpoint=str(full / "checkpoint-3"), max_train_steps=6))


@pytest.mark.slow
def test_estimate_counts_the_average(one_thread):
    from lora_db.training.estimate import estimate_memory

    plain = estimate_memory(TrainConfig(model="tiny"), device="cpu")
    averaged = estimate_memory(TrainConfig(model="tiny", use_ema=True), device="cpu")
    grown = averaged.components["unet"].optimizer - plain.components["unet"].optimizer
    assert grown == 4 * plain.trainable_parameters  # one fp32 copy of each trained weight
    assert averaged.peak_bytes > plain.peak_bytes
    assert any("--use-ema" in note for note in averaged.notes)
