"""--dataset-config: several concepts (folder, prompt or caption files, repeats, class images, weight) in one run;
the single-concept options are the shorthand for one; resume, config.json and the model card know the concepts."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from resume_helpers import assert_resumed_exactly, run_and_resume

from lora_db.config.dataset import Concept, read_dataset_config
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.training.loop import micro_batch_loss, train
from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def concepts(tmp_path, instance_dir):
    """Two concepts: the robot photos with a prompt, repeated twice at half weight, with class images; and two
    captioned photos of another subject without an instance prompt."""
    from lora_db.synthetic.demo import make_demo_images

    other = tmp_path / "data" / "other"
    make_demo_images(other, count=2, size=96, seed=7)
    for number, photo in enumerate(sorted(other.glob("*.png"))):
        photo.with_suffix(".txt").write_text(f"a photo of zwx toy, view {number}")
    shutil.copytree(instance_dir, tmp_path / "data" / "robot")
    path = tmp_path / "data" / "concepts.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[concept]]
            folder = "robot"
            instance_prompt = "a photo of sks robot"
            repeats = 2
            weight = 0.5
            class_dir = "class"
            class_prompt = "a photo of a robot"

            [[concept]]
            folder = "other"
            """
        )
    )
    return path


def test_the_file_is_read_with_paths_beside_it(concepts):
    robot, other = read_dataset_config(concepts)
    folder = concepts.parent
    assert robot == Concept(folder / "robot", "a photo of sks robot", 2, folder / "class", "a photo of a robot", 0.5)
    assert other == Concept(folder / "other")
    shorthand = TrainConfig(model="tiny", instance_dir="photos", instance_prompt="a photo of sks dog").concepts()
    assert shorthand == [Concept(shorthand[0].folder, "a photo of sks dog")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[concept]]\nfolder = "a"\nrepeat = 2\n', "concept 1: unknown key 'repeat'; known keys: folder,"),
        ('[[concept]]\ninstance_prompt = "x"\n', "concept 1: no folder"),
        ('[[concept]]\nfolder = "a"\n[[concept]]\nfolder = "b"\nrepeats = 0\n', "concept 2: repeats must be"),
        ('[[concept]]\nfolder = "a"\nweight = -1\n', "weight must be a positive number"),
        ('[[concept]]\nfolder = "a"\nclass_prompt = "a dog"\n', "class_prompt needs class_dir too"),
        ('folder = "a"\n', "unknown key 'folder'; write one [[concept]] table per concept"),
        ('[[concept]]\nfolder = "a"\n[[concept]]\nfolder = "a"\n', "two concepts share the folder"),
        ('[[concept]]\nfolder = "a"\nclass_dir = "a/class"\nclass_prompt = "x"\n', "overlaps a concept's folder"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_concept_and_key(tmp_path, text, message):
    path = tmp_path / "concepts.toml"
    path.write_text(text)
    with pytest.raises(LoraDBError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(model="tiny", dataset_config=path)


def test_the_single_concept_options_and_the_file_are_one_or_the_other(concepts):
    with pytest.raises(
        LoraDBError, match="--dataset-config names each concept's folder and prompts: drop --instance-dir"
    ):
        TrainConfig(model="tiny", dataset_config=concepts, instance_dir=concepts.parent / "robot")
    TrainConfig(model="tiny", dataset_config=concepts, output_dir=concepts.parent / "out").require_run_inputs()


def test_repeats_captions_weights_and_class_images_reach_the_loss(concepts, tmp_path):
    config = TrainConfig(
        model="tiny",
        dataset_config=concepts,
        output_dir=tmp_path / "out",
        cache_latents=True,
        num_class_images=2,
        class_generation_steps=2,
    )
    config = check_before_loading(config, torch.device("cpu"))
    run = setup_run(config, setup_accelerator(config))
    instances, classes = run.sources
    records = instances.dataset.records
    robot = [r for r in records if r.prompt == "a photo of sks robot"]
    assert len(robot) == 2 * 4 and {r.weight for r in robot} == {0.5}  # 4 photos, twice each
    assert sorted(r.prompt for r in records if r.weight == 1.0) == [
        "a photo of zwx toy, view 0",
        "a photo of zwx toy, view 1",
    ]
    # A repeated photo is encoded once: its cache entries are the same tensors.
    first = records.index(robot[0])
    again = next(i for i, r in enumerate(records) if r.path == robot[0].path and i != first)
    assert instances.cache[first] is instances.cache[again]
    assert len(classes) == 2 and {r.weight for r in classes.dataset.records} == {0.5}
    # Examples of mixed weights are weighted one by one; a source of one weight is scaled by it once.
    assert instances.uniform_weight is None and classes.uniform_weight == 0.5
    assert (concepts.parent / "class").is_dir()


@pytest.mark.slow
def test_one_concept_in_a_file_trains_as_the_options_do_and_its_weight_scales_the_loss(tmp_path, tiny_config):
    folder = tiny_config().instance_dir
    path = tmp_path / "one.toml"
    path.write_text(f'[[concept]]\nfolder = "{folder}"\ninstance_prompt = "a photo of sks robot"\n')
    shorthand = train(tiny_config(output_dir=tmp_path / "a", max_train_steps=2)).losses
    options = {"instance_dir": None, "instance_prompt": None, "max_train_steps": 2}
    from_file = train(tiny_config(output_dir=tmp_path / "b", dataset_config=path, **options)).losses
    assert from_file == shorthand
    path.write_text(f'[[concept]]\nfolder = "{folder}"\ninstance_prompt = "a photo of sks robot"\nweight = 2.0\n')
    config = check_before_loading(
        tiny_config(output_dir=tmp_path / "c", dataset_config=path, **options), torch.device("cpu")
    )
    run = setup_run(config, setup_accelerator(config))
    assert micro_batch_loss(run, 0).item() == pytest.approx(2 * shorthand[0], rel=1e-6)


@pytest.mark.slow
def test_resume_config_json_and_model_card_know_the_concepts(concepts, tmp_path):
    options = {
        "model": "tiny",
        "dataset_config": concepts,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "learning_rate": 5e-3,
        "num_class_images": 2,
        "class_generation_steps": 2,
    }
    full, interrupted = run_and_resume(TrainConfig, tmp_path, 3, **options)
    assert_resumed_exactly(full, interrupted, 3)
    recorded = json.loads((full / "config.json").read_text())["concepts"]
    assert [(c["instance_prompt"], c["repeats"], c["weight"]) for c in recorded] == [
        ("a photo of sks robot", 2, 0.5),
        (None, 1, 1.0),
    ]
    card = (full / "README.md").read_text()
    assert "## Concepts" in card and "| `robot` | a photo of sks robot | 2 | 0.5 | a photo of a robot |" in card

    # Another weight in the file is another run; so is a changed photo.
    concepts.write_text(concepts.read_text().replace("weight = 0.5", "weight = 0.25"))
    with pytest.raises(LoraDBError, match="--dataset-config's concepts"):
        train(TrainConfig(output_dir=interrupted, resume_from_checkpoint=str(interrupted / "checkpoint-3"), **options))
    concepts.write_text(concepts.read_text().replace("weight = 0.25", "weight = 0.5"))
    first = sorted((concepts.parent / "other").glob("*.png"))[0]
    first.with_suffix(".txt").write_text("a photo of zwx toy, changed")
    with pytest.raises(LoraDBError, match=f"concept 2 folder: {first.name} changed"):
        train(TrainConfig(output_dir=interrupted, resume_from_checkpoint=str(interrupted / "checkpoint-3"), **options))


def test_a_photo_without_caption_in_a_concept_without_prompt_is_named(concepts, tmp_path):
    photo = sorted((concepts.parent / "other").glob("*.png"))[0]
    photo.with_suffix(".txt").unlink()
    with pytest.raises(LoraDBError, match=f"{photo.name} has no caption .* and its concept no instance_prompt"):
        train(TrainConfig(model="tiny", dataset_config=concepts, output_dir=tmp_path / "out", max_train_steps=1))


def test_each_example_of_a_mixed_batch_is_weighted_by_its_concept(concepts, tmp_path, monkeypatch):
    """One source (no class images) whose concepts weigh differently, two examples a micro-batch: each example's
    loss is scaled by its own concept's weight, and a source of one weight by that weight."""
    import lora_db.training.loop as loop
    from lora_db.training.data import batch_indices

    concepts.write_text(concepts.read_text().replace('class_dir = "class"\n', "").replace(
        'class_prompt = "a photo of a robot"\n', ""))  # fmt: skip
    config = TrainConfig(
        model="tiny", dataset_config=concepts, output_dir=tmp_path / "out", cache_latents=True, train_batch_size=2
    )
    config = check_before_loading(config, torch.device("cpu"))
    run = setup_run(config, setup_accelerator(config))
    (source,) = run.sources
    assert source.uniform_weight is None
    per_example = torch.tensor([1.0, 10.0])
    monkeypatch.setattr(loop, "dreambooth_loss", lambda *args, **kwargs: per_example)
    for micro_step in range(6):  # enough steps to meet both weights in one batch and alike
        pairs = batch_indices(len(source), 2, micro_step, config.seed)
        expected = (per_example * source.weights(pairs)).mean()
        assert micro_batch_loss(run, micro_step).item() == pytest.approx(expected.item())
    source.uniform_weight = 0.5
    assert micro_batch_loss(run, 0).item() == pytest.approx(5.5 * 0.5)
