"""--optimizer prodigy | adafactor | lion8bit | schedulefree-adamw: each library's optimizer, its learning-rate
convention, schedule-free's averaged weights wherever the weights are sampled or saved, and exact resume."""

from __future__ import annotations

import pytest
import torch
from resume_helpers import assert_resumed_exactly, metrics, run_and_resume

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.training.loop import optimizer_step, train
from lora_db.training.optimizers import check_optimizer, training_weights
from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

NEW_OPTIMIZERS = {
    # optimizer -> (its class's module and name, a state every trained weight gets)
    "prodigy": ("prodigyopt.prodigy.Prodigy", "p0"),
    "adafactor": ("transformers.optimization.Adafactor", "exp_avg_sq_row"),
    "lion8bit": ("bitsandbytes.optim.lion.Lion8bit", "state1"),
    "schedulefree-adamw": ("schedulefree.adamw_schedulefree.AdamWScheduleFree", "z"),
}


def setup(config):
    config = check_before_loading(config, torch.device("cpu"))
    return setup_run(config, setup_accelerator(config))


def test_each_optimizer_takes_its_libraries_learning_rate_convention(tmp_path):
    def rate(**options):
        return TrainConfig(model="tiny", **options).learning_rate

    assert rate() == rate(optimizer="adamw8bit") == rate(optimizer="schedulefree-adamw") == 1e-4
    assert rate(optimizer="prodigy") == 1.0  # a multiplier of the step size Prodigy estimates
    assert rate(optimizer="lion8bit") == 3e-5  # Lion's sign updates are larger than Adam's
    assert rate(optimizer="prodigy", learning_rate=0.5) == 0.5  # what the user gives stands


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "schedulefree-adamw", "lr_scheduler": "cosine"}, "replaces the learning-rate schedule"),
        ({"optimizer": "prodigy", "loraplus_lr_ratio": 16.0}, "Prodigy estimates one step size"),
        (
            {"optimizer": "prodigy", "train_text_encoder": True, "text_encoder_learning_rate": 0.5},
            "both rates must be equal",
        ),
    ],
)
def test_what_an_optimizer_cannot_honour_is_refused_before_loading(options, message):
    with pytest.raises(LoraDBError, match=message):
        TrainConfig(model="tiny", **options)


def test_a_missing_library_is_one_line_naming_the_pip_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else find_spec(name))
    with pytest.raises(LoraDBError) as caught:
        check_optimizer(TrainConfig(model="tiny", optimizer="prodigy"))
    assert "`pip install prodigyopt`" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(NEW_OPTIMIZERS))
def test_each_optimizer_is_its_librarys_and_keeps_its_state(tiny_config, name, one_thread):
    run = setup(tiny_config(optimizer=name, rank=8))
    inner = run.optimizer.optimizer
    path, state_key = NEW_OPTIMIZERS[name]
    assert f"{type(inner).__module__}.{type(inner).__name__}" == path
    before = [p.detach().clone() for p in run.trainable_parameters]
    for step in range(2):
        training_weights(run.optimizer)
        loss = optimizer_step(run, step)
    assert torch.isfinite(loss)
    assert all(state_key in inner.state[p] for p in run.trainable_parameters)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.trainable_parameters, strict=True))


def test_prodigy_logs_its_estimated_step_size_as_the_rate(tiny_config, one_thread):
    config = tiny_config(optimizer="prodigy", learning_rate=None, max_train_steps=8)
    assert config.learning_rate == 1.0
    rates = [row["lr"] for row in metrics(train(config).output_dir)]
    assert rates[0] == 1e-6 and rates[-1] > 2 * rates[0]  # d grows from d0 = 1e-6 as Prodigy learns the scale


@pytest.mark.parametrize("name", sorted(NEW_OPTIMIZERS))
def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path, name, one_thread):
    options = {
        "optimizer": name,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "lr_warmup_steps": 2,
        "train_text_encoder": True,
        # Validation on the checkpoint's step: schedule-free samples its averaged weights there, then trains on.
        "validation_prompt": "a photo of sks robot",
        "validation_steps": 3,
        "num_validation_images": 1,
        "validation_inference_steps": 2,
    }
    if name == "prodigy":
        options["learning_rate"] = None  # its convention, 1.0
    else:
        options["lr_scheduler"] = "constant_with_warmup" if name != "schedulefree-adamw" else "constant"
    assert_resumed_exactly(*run_and_resume(tiny_config, tmp_path, 3, **options), 3)


def test_schedule_free_samples_checkpoints_and_saves_its_averaged_weights(tiny_config, monkeypatch, one_thread):
    """Schedule-free AdamW steps at an interpolation y of its sequences and evaluates at their average x: each
    validation, checkpoint and the adapter must see x (the optimizer in eval mode), each step y."""
    import schedulefree

    import lora_db.training.loop as loop

    seen = []

    def mode(what):
        def wrapped(*args, **kwargs):
            train_mode = {g["train_mode"] for g in optimizers[0].param_groups}
            seen.append((what, train_mode))
            return originals[what](*args, **kwargs)

        return wrapped

    optimizers = []
    init = schedulefree.AdamWScheduleFree.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        optimizers.append(self)

    monkeypatch.setattr(schedulefree.AdamWScheduleFree, "__init__", remember)
    originals = {"validation": loop.run_validation, "checkpoint": loop.save_checkpoint, "adapter": loop.save_outputs}
    originals["step"] = loop.optimizer_step
    for name, attribute in (
        ("validation", "run_validation"),
        ("checkpoint", "save_checkpoint"),
        ("adapter", "save_outputs"),
        ("step", "optimizer_step"),
    ):
        monkeypatch.setattr(loop, attribute, mode(name))
    config = tiny_config(
        optimizer="schedulefree-adamw",
        max_train_steps=4,
        checkpointing_steps=2,
        validation_prompt="a photo of sks robot",
        validation_steps=3,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    train(config)
    assert [what for what, _ in seen] == [
        *("step", "step", "checkpoint", "step", "validation", "step", "checkpoint", "validation", "adapter")
    ]
    assert all(modes == ({True} if what == "step" else {False}) for what, modes in seen), seen


@pytest.mark.parametrize("name", ["adamw", *sorted(NEW_OPTIMIZERS)])
def test_estimate_counts_the_state_each_optimizer_keeps(tiny_config, name, one_thread):
    """`lora-db estimate`'s optimizer column against the state the real optimizer holds after two real steps.
    Prodigy keeps a scalar instead of a copy of a weight that starts at zero (LoRA's B), which fake tensors cannot
    tell: its estimate is that much high, and says so."""
    from lora_db.training.estimate import estimate_memory

    config = tiny_config(optimizer=name, rank=16, learning_rate=None)
    estimate = estimate_memory(config, device="cpu")
    run = setup(config)
    for step in range(2):
        training_weights(run.optimizer)
        optimizer_step(run, step)
    inner = run.optimizer.optimizer
    held = sum(
        t.numel() * t.element_size() for state in inner.state.values() for t in state.values() if torch.is_tensor(t)
    )
    counted = estimate.components["unet"].optimizer
    if name == "prodigy":
        zeros_at_start = [p for n, p in run.models.unet.named_parameters() if "lora_B" in n]
        assert counted == held + sum(p.numel() * p.element_size() - p.element_size() for p in zeros_at_start)
        assert any("Prodigy" in note for note in estimate.notes)
    else:
        assert counted == held
    trainable = sum(p.numel() * 4 for p in run.trainable_parameters)
    expected_per_weight = {"adamw": 2, "prodigy": 3, "schedulefree-adamw": 2, "lion8bit": 1}  # fp32 tensors < 4096
    if name in expected_per_weight:
        assert held >= expected_per_weight[name] * trainable
    else:  # adafactor: one row and one column per matrix
        assert held < 0.5 * trainable
