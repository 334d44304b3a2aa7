"""--cache-latents-dir: encodings on disk keyed by the encoders and each file, reused across runs, read a batch at a
time; a run trains exactly as with --cache-latents; resume is exact (benchmarks/latent_cache.py measures memory)."""

from __future__ import annotations

import shutil

import pytest
import torch
from resume_helpers import assert_resumed_exactly, run_and_resume

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.training.loop import train
from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

pytestmark = pytest.mark.usefixtures("one_thread")


def cached_files(cache):
    return sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))


def test_a_run_trains_as_with_cached_latents_and_the_next_one_reads_them_back(tiny_config, tmp_path):
    in_memory = train(tiny_config(output_dir=tmp_path / "a", cache_latents=True, max_train_steps=4)).losses
    cache = tmp_path / "cache"
    on_disk = train(tiny_config(output_dir=tmp_path / "b", cache_latents_dir=cache, max_train_steps=4)).losses
    assert on_disk == in_memory
    files = cached_files(cache)
    assert len(files) == 4 and len({f.parent for f in files}) == 1  # one file per photo, under one encoders' key
    stamps = {f: (cache / f).stat().st_mtime_ns for f in files}

    config = check_before_loading(tiny_config(output_dir=tmp_path / "c", cache_latents_dir=cache), torch.device("cpu"))
    run = setup_run(config, setup_accelerator(config))
    assert {f: (cache / f).stat().st_mtime_ns for f in cached_files(cache)} == stamps  # read back, not written
    source = run.sources[0]
    assert source.cache is None and len(source.files) == 4  # nothing held in memory but the file names
    for name in ("vae", "image_encoder"):
        assert {p.device.type for p in getattr(run.models.pipe, name).parameters()} == {"meta"}, name


@pytest.mark.slow
def test_another_dtype_or_an_edited_photo_is_encoded_anew(tiny_config, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(tiny_config().instance_dir, photos)
    cache = tmp_path / "cache"
    train(tiny_config(output_dir=tmp_path / "a", instance_dir=photos, cache_latents_dir=cache, max_train_steps=1))
    before = set(cached_files(cache))
    edited = sorted(photos.glob("*.png"))[0]
    from PIL import Image

    Image.open(edited).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited)
    train(tiny_config(output_dir=tmp_path / "b", instance_dir=photos, cache_latents_dir=cache, max_train_steps=1))
    after = set(cached_files(cache))
    assert len(after - before) == 1  # only the edited photo
    options = {"instance_dir": photos, "cache_latents_dir": cache, "max_train_steps": 1, "mixed_precision": "bf16"}
    train(tiny_config(output_dir=tmp_path / "c", **options))
    assert len({f.parent for f in cached_files(cache)}) == 2  # bf16 encodings are other encodings


@pytest.mark.slow
def test_resume_is_exact_and_the_cache_may_move(tiny_config, tmp_path):
    options = {"max_train_steps": 6, "checkpointing_steps": 3, "cache_latents_dir": tmp_path / "cache"}
    moved = {"cache_latents_dir": tmp_path / "elsewhere"}  # the resumed half reads its encodings elsewhere

    def make(**values):
        return tiny_config(**{**values, **moved} if "resume_from_checkpoint" in values else values)

    assert_resumed_exactly(*run_and_resume(make, tmp_path, 3, **options), 3)


def test_a_damaged_cache_file_is_one_line_naming_it(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    train(tiny_config(output_dir=tmp_path / "a", cache_latents_dir=cache, max_train_steps=1))
    damaged = cache / cached_files(cache)[0]
    damaged.write_bytes(b"not safetensors")
    with pytest.raises(LoraDBError, match=f"{damaged.name} is unreadable .*; delete it and run again"):
        train(tiny_config(output_dir=tmp_path / "b", cache_latents_dir=cache, max_train_steps=4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"random_flip": True}, "--cache-latents-dir encodes each image once"),
        ({"cache_latents": True}, "--cache-latents keeps the encodings in memory, --cache-latents-dir on disk"),
    ],
)
def test_impossible_combinations_are_refused(tmp_path, options, message):
    with pytest.raises(LoraDBError, match=message):
        TrainConfig(model="tiny", cache_latents_dir=tmp_path, **options)


@pytest.mark.slow
def test_estimate_holds_one_batch_whatever_the_image_count(tmp_path):
    from lora_db.synthetic.demo import make_demo_images
    from lora_db.training.estimate import estimate_memory

    peaks = {}
    for count in (2, 40):
        make_demo_images(tmp_path / str(count), count=count, size=64)
        for option in ("cache_latents", "cache_latents_dir"):
            value = True if option == "cache_latents" else tmp_path / "cache"
            config = TrainConfig(model="tiny", instance_dir=tmp_path / str(count), **{option: value})
            peaks[count, option] = estimate_memory(config, device="cpu").setup_bytes
    assert peaks[40, "cache_latents_dir"] == peaks[2, "cache_latents_dir"]
    assert peaks[40, "cache_latents"] > peaks[2, "cache_latents"]
