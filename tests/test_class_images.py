"""Class images: generated once per (prompt, base model) into a manifest, reused, never mixed; own photos as given."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.models.random import build_random_pipeline
from lora_db.training.class_images import MANIFEST, generate_class_images, plan_class_images
from lora_db.training.loop import train

ROBOT, DOG = "a photo of a robot", "a photo of a dog"


@pytest.fixture(scope="module")
def pipe():
    pipe = build_random_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, folder, prompt, wanted, model="tiny"):
    plan = plan_class_images(folder, prompt, model, wanted)
    generate_class_images(pipe, plan, seed=0, num_inference_steps=2, batch_size=2)
    return plan


def test_generated_images_are_recorded_with_prompt_and_model_and_reused(pipe, tmp_path, caplog):
    written = generate(pipe, tmp_path, ROBOT, 3).reused
    manifest = json.loads((tmp_path / MANIFEST).read_text())["images"]
    assert sorted(manifest) == sorted(p.name for p in written)
    assert {(e["prompt"], e["model"]) for e in manifest.values()} == {(ROBOT, "tiny")}
    with caplog.at_level(logging.WARNING, logger="lora_db"):
        again = plan_class_images(tmp_path, ROBOT, "tiny", 3)
    assert again.missing == 0 and sorted(again.paths()) == sorted(written)
    assert "ignoring" not in caplog.text  # the manifest is lora-db's own, not a photo the user meant


def test_another_prompt_or_model_gets_its_own_images_and_leaves_the_others(pipe, tmp_path):
    robots = generate(pipe, tmp_path, ROBOT, 2).paths()
    stamps = [p.stat().st_mtime_ns for p in robots]
    dogs = generate(pipe, tmp_path, DOG, 2).paths()
    other_model = plan_class_images(tmp_path, ROBOT, "random:small", 2)
    assert not set(dogs) & set(robots)
    assert [p.stat().st_mtime_ns for p in robots] == stamps
    assert plan_class_images(tmp_path, DOG, "tiny", 2).paths() == dogs
    assert plan_class_images(tmp_path, ROBOT, "tiny", 2).paths() == robots
    assert other_model.missing == 2 and other_model.foreign == 4 and other_model.paths() == []


def test_same_seed_same_image_whatever_the_batching(pipe, tmp_path):
    one = generate(pipe, tmp_path / "a", ROBOT, 3).paths()
    plan = plan_class_images(tmp_path / "b", ROBOT, "tiny", 3)
    generate_class_images(pipe, plan, seed=0, num_inference_steps=2, batch_size=1)
    for a, b in zip(one, plan.paths(), strict=True):
        # The same starting noise; batched and single matrix products may round the last bit differently.
        difference = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert difference.max() <= 2


def test_a_folder_of_own_photos_is_used_as_given_and_topped_up(instance_dir, tiny_config, tmp_path, caplog):
    class_dir = tmp_path / "class"
    shutil.copytree(instance_dir, class_dir)
    own = sorted(class_dir.glob("*.png"))
    options = {"class_prompt": ROBOT, "class_dir": class_dir, "class_generation_steps": 2, "max_train_steps": 1}
    with caplog.at_level(logging.INFO, logger="lora_db"):
        train(tiny_config(output_dir=tmp_path / "a", num_class_images=len(own), **options))
    assert sorted(class_dir.glob("*.png")) == own, "enough own photos: nothing generated"
    assert f"{len(own)} of your own photos" in caplog.text and "generating" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_db"):
        train(tiny_config(output_dir=tmp_path / "b", num_class_images=len(own) + 1, **options))
    assert "generating 1 for" in caplog.text
    assert len(json.loads((class_dir / MANIFEST).read_text())["images"]) == 1


def test_a_damaged_manifest_is_one_clear_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(LoraDBError, match=r"damaged .*delete it"):
        plan_class_images(tmp_path, ROBOT, "tiny", 2)
