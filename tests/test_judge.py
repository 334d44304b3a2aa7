"""tiny-world's judge: an encoder no part of the model sees, that tells the DreamBooth subjects apart.

The subject set (lora_db.synthetic.subjects) is drawn by a generator the judge's training never used, so these
numbers measure what `lora-db eval` relies on: photos of one subject look alike to the judge, photos of two do not.
"""

from __future__ import annotations

import pytest
import torch

from lora_db.models.loading import tiny_world_dir
from lora_db.synthetic.judge import (
    JUDGE_FOLDER,
    JudgeConfig,
    is_judge_folder,
    judge_similarity,
    load_judge,
    pixel_similarity,
    separation,
    train_judge,
)
from lora_db.synthetic.subjects import SUBJECTS, held_out_names, subject_tensor


@pytest.fixture(scope="module")
def held_out():
    return subject_tensor(held_out_names())


def test_the_shipped_judge_tells_held_out_subjects_apart(held_out, one_thread):
    pixels, owners = held_out
    judge = load_judge(tiny_world_dir() / JUDGE_FOLDER)
    scores = separation(judge_similarity(judge, pixels, pixels), owners)
    # Photos of one subject (moved, rescaled, in other rooms) against photos of the others.
    assert scores["margin"] > 0.4, scores
    assert scores["separated"] >= 0.7, scores
    # The model-free 16 px score is fooled by the rooms; the judge must do clearly better than it.
    model_free = separation(pixel_similarity(pixels, pixels), owners)
    assert scores["margin"] > model_free["margin"] + 0.2 and scores["top1"] > model_free["top1"]


def test_the_judge_is_no_part_of_the_model_it_judges(one_thread):
    from lora_db.evaluation.judge import shares_weights
    from lora_db.models.loading import load_pipeline

    judge = load_judge(tiny_world_dir() / JUDGE_FOLDER)
    pipe = load_pipeline("tiny-world")
    for name in ("image_encoder", "text_encoder", "vae", "unet"):
        assert not shares_weights(judge, getattr(pipe, name)), name
    assert is_judge_folder(tiny_world_dir() / JUDGE_FOLDER)
    assert not is_judge_folder(tiny_world_dir() / "image_encoder")


def test_judge_training_is_deterministic_and_learns(one_thread):
    config = JudgeConfig(steps=6, batch=8, pool=16, eval_every=1000)
    first, second = train_judge(config, log=lambda line: None), train_judge(config, log=lambda line: None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    untrained = type(first)(config.width, config.embed_dim)
    assert any(
        not torch.equal(a, b) for a, b in zip(first.state_dict().values(), untrained.state_dict().values(), strict=True)
    )


def test_every_subject_has_its_photos_and_a_prompt_in_tiny_worlds_words():
    assert len(held_out_names()) >= 10
    for subject in SUBJECTS.values():
        assert subject.instance_prompt == "a photo of sks toy"
        assert subject.describe_prompt.startswith("a photo of ")
