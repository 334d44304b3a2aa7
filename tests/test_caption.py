"""`lora-db caption FOLDER`: UniDiffuser's image-to-text mode writes NAME.txt beside each photo (prefix first),
existing captions are kept without --overwrite, an adapter can be applied, and unreadable output is refused."""

from __future__ import annotations

import pytest
from lora_helpers import run_cli

from lora_db.adapters import caption as caption_module
from lora_db.config.commands import CaptionConfig
from lora_db.errors import LoraDBError
from lora_db.training.data import scan_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def photos(tmp_path, instance_dir):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(instance_dir, folder)
    return folder


@pytest.fixture
def captioner(monkeypatch):
    """The real pipeline and i2t call, with the tiny model's decoder output replaced by readable text per image."""
    calls = []
    generate = caption_module.generate_captions

    def readable(pipe, image, count, **kwargs):
        generate(pipe, image, count, **kwargs)  # the model's own image-to-text pass runs
        calls.append((pipe, kwargs["seed"]))
        return [f"  a small robot\tnumber {len(calls)} "]

    monkeypatch.setattr(caption_module, "generate_captions", readable)
    return calls


def test_captions_are_written_beside_each_photo_and_read_by_training(photos, captioner):
    result = caption_module.caption(
        CaptionConfig(folder=photos, model="tiny", prefix="a photo of sks", num_inference_steps=2)
    )
    captions = sorted(photos.glob("*.txt"))
    assert len(captions) == 4 and sorted(result.written) == captions
    assert captions[0].read_text() == "a photo of sks, a small robot number 1\n"
    prompts = {record.prompt for record in scan_images(photos, "unused")}
    assert prompts == {f"a photo of sks, a small robot number {n}" for n in range(1, 5)}


def test_existing_captions_are_kept_unless_overwrite(photos, captioner):
    first = sorted(photos.glob("*.png"))[0].with_suffix(".txt")
    first.write_text("mine")
    result = caption_module.caption(CaptionConfig(folder=photos, model="tiny", num_inference_steps=2))
    assert result.kept == [first] and first.read_text() == "mine" and len(result.written) == 3
    again = caption_module.caption(CaptionConfig(folder=photos, model="tiny", num_inference_steps=2))
    assert again.written == {} and len(again.kept) == 4 and len(captioner) == 3  # nothing left: no model load
    caption_module.caption(CaptionConfig(folder=photos, model="tiny", overwrite=True, num_inference_steps=2))
    assert first.read_text().startswith("a small robot")


def test_an_adapter_is_applied_while_captioning(photos, captioner, pristine, tmp_path):
    from lora_helpers import make_adapter

    adapter = make_adapter(pristine, tmp_path / "a.safetensors", seed=1)
    caption_module.caption(CaptionConfig(folder=photos, model="tiny", adapter=str(adapter), num_inference_steps=2))
    pipe = captioner[0][0]
    assert pipe.unet.get_submodule("transformer.transformer_in_blocks.0.attn1.to_q").active_adapters == ["a"]


def test_an_untrained_caption_decoder_is_refused_in_one_line(photos, monkeypatch, capsys):
    """The tiny model's GPT-2 is random: it writes control characters and undecodable bytes, which no caption file
    should hold."""
    code, _, err = run_cli(monkeypatch, capsys, "caption", photos, "--model", "tiny", "--num-inference-steps", "2")
    errors = [line for line in err if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "wrote no readable caption for" in errors[0] and "untrained" in errors[0]
    assert not list(photos.glob("*.txt"))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"folder": ""}, "FOLDER is empty"), ({"folder": "x", "prefix": " "}, "--prefix is empty")],
)
def test_bad_options_are_one_line(options, message):
    with pytest.raises(LoraDBError, match=message):
        CaptionConfig(**options)


def test_a_folder_without_photos_is_refused_before_loading(tmp_path):
    with pytest.raises(LoraDBError, match="FOLDER"):
        caption_module.caption(CaptionConfig(folder=tmp_path, model="tiny"))


@pytest.mark.slow
def test_tiny_world_captions_name_the_colour_and_shape_of_pictures_it_never_saw(tmp_path, monkeypatch, capsys):
    """No stand-in: `lora-db caption` on tiny-world, at its default settings, writes captions that name the object's
    colour and shape (said together, as the world says them) for most pictures of a seed the build never drew."""
    import itertools
    import random

    from lora_db.synthetic.world import random_scene, render

    rng = random.Random(2026)
    folder, scenes = tmp_path / "photos", {}
    folder.mkdir()
    for number in range(16):
        scene = random_scene(rng)
        render(scene, rng).save(folder / f"{number:02d}.png")
        scenes[f"{number:02d}"] = scene
    code, _, err = run_cli(monkeypatch, capsys, "caption", folder, "--model", "tiny-world", "--prefix", "sks")
    assert code == 0, err
    named = 0
    for name, scene in scenes.items():
        text = (folder / f"{name}.txt").read_text()
        assert text.startswith("sks, a photo of ")
        named += (scene.colour, scene.shape) in itertools.pairwise(text.replace(",", " ").split())
    assert named >= 9, named  # most of 16
