"""Options: checks before any model loads, TOML files, and the command line winning over the file."""

from __future__ import annotations

import pytest

from lora_db.config.train import TrainConfig, load_toml
from lora_db.errors import LoraDBError


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"rank": 0}, "--rank must be at least 1"),
        ({"learning_rate": -1.0}, "--learning-rate must be a positive finite number"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a positive finite number"),
        ({"learning_rate": float("inf")}, "--learning-rate must be a positive finite number"),
        ({"class_prompt": "a photo of a dog"}, "--class-prompt needs --class-dir"),
        ({"class_dir": "classes"}, "--class-dir needs --class-prompt"),
        ({"method": "full", "train_text_encoder": True}, "--train-text-encoder is a LoRA option"),
        ({"cache_latents": True, "random_flip": True}, "--cache-latents encodes each image once"),
        ({"uncond_prob": 1.5}, "--uncond-prob must be in [0, 1]"),
        ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
        ({"target_modules": []}, "--target-modules is empty"),
        ({"overwrite": True, "resume_from_checkpoint": "latest"}, "choose one"),
    ],
)
def test_impossible_options_fail_before_loading(overrides, fragment):
    with pytest.raises(LoraDBError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**overrides)


def test_alpha_defaults_to_rank():
    assert TrainConfig(rank=8).lora_alpha == 8.0
    assert TrainConfig(rank=8, alpha=16).lora_alpha == 16.0


def test_toml_values_and_command_line_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rank = 8\nlearning-rate = 2e-4\ntarget_modules = ["to_q", "to_v"]\ninstance_dir = "photos"\n')
    config = TrainConfig.from_sources(path, rank=16, learning_rate=None)
    assert config.rank == 16  # the command line wins
    assert config.learning_rate == 2e-4  # the file wins over the default
    assert config.target_modules == ["to_q", "to_v"]
    assert str(config.instance_dir) == "photos"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ranks = 4\n", "unknown key 'ranks'"),
        ('rank = "four"\n', "rank must be an integer"),
        ("gradient_checkpointing = 1\n", "gradient_checkpointing must be true or false"),
        ('optimizer = "sgd"\n', "optimizer must be one of adamw, adamw8bit"),
        ("rank = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LoraDBError, match=fragment.replace("[", r"\[")):
        load_toml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoraDBError, match="file not found"):
        load_toml(tmp_path / "none.toml")
