import logging
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_db.errors import LoraDBError
from lora_db.images import find_images, load_image, prepare_image, to_tensor
from lora_db.synthetic.demo import make_demo_images
from lora_db.training.data import DreamBoothDataset, ImageRecord, collate, scan_images

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def bands(colours, band_width: int, height: int) -> Image.Image:
    """Vertical stripes left to right, so crops and flips are visible in pixel values."""
    image = Image.new("RGB", (band_width * len(colours), height))
    for i, colour in enumerate(colours):
        image.paste(colour, (i * band_width, 0, (i + 1) * band_width, height))
    return image


def png_with_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims `width` x `height`: a decompression bomb without the memory cost."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def close_to(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# ---------------------------------------------------------------------------------------------------------
# load_image: colour modes and orientation


def test_exif_orientation_is_applied(tmp_path):
    image = bands([RED, BLUE], 20, 20)  # 40 x 20: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.size == (20, 40)
    assert close_to(loaded.getpixel((10, 5)), RED)
    assert close_to(loaded.getpixel((10, 35)), BLUE)


def _rgba(tmp_path):
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (4, 0, 8, 4))
    return save(image, tmp_path / "rgba.png"), RED


def _la(tmp_path):
    image = Image.new("LA", (8, 4), (0, 0))
    image.paste((40, 255), (4, 0, 8, 4))
    return save(image, tmp_path / "la.png"), (40, 40, 40)


def _palette(tmp_path):
    image = Image.new("P", (8, 4), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (4, 0, 8, 4))
    return save(image, tmp_path / "palette.png", transparency=0), BLUE


@pytest.mark.parametrize("make", [_rgba, _la, _palette], ids=["RGBA", "LA", "P-transparency"])
def test_transparency_is_composited_on_white(tmp_path, make):
    path, opaque = make(tmp_path)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == WHITE
    assert loaded.getpixel((6, 1)) == opaque


def test_half_transparent_pixel_blends_with_white(tmp_path):
    path = save(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), tmp_path / "half.png")

    assert close_to(load_image(path).getpixel((0, 0)), (127, 127, 127), tolerance=1)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 100, (100, 100, 100)), ("1", 1, WHITE)])
def test_grayscale_becomes_rgb(tmp_path, mode, value, expected):
    path = save(Image.new(mode, (6, 6), value), tmp_path / f"gray_{mode}.png")

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == expected


def test_cmyk_jpeg_has_correct_colours(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert close_to(loaded.getpixel((8, 8)), RED, tolerance=20)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (4, 1))  # 0 .. 65535 left to right
    path = save(Image.fromarray(gradient), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")

    pixels = np.asarray(load_image(path))

    assert pixels.shape == (4, 256, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 128].tolist() == [128, 128, 128]
    assert pixels[0, 255].tolist() == [255, 255, 255]
    assert np.array_equal(pixels[0, :, 0], np.arange(256))


def test_float_image_in_unit_range_is_scaled(tmp_path):
    path = save(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), tmp_path / "float.tif")

    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


# ---------------------------------------------------------------------------------------------------------
# load_image: bad files


def _zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


def _random_bytes(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _truncated(tmp_path, name, fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = save(Image.fromarray(noise), tmp_path / name, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize(
    "make",
    [
        _zero_bytes,
        _random_bytes,
        lambda tmp_path: _truncated(tmp_path, "cut.png", "PNG"),
        lambda tmp_path: _truncated(tmp_path, "cut.jpg", "JPEG"),
    ],
    ids=["zero-bytes", "random-bytes", "truncated-png", "truncated-jpeg"],
)
def test_bad_file_raises_one_line_naming_it(tmp_path, make):
    path = make(tmp_path)

    with pytest.raises(LoraDBError) as caught:
        load_image(path)

    message = str(caught.value)
    assert path.name in message
    assert "\n" not in message


def test_missing_file_raises(tmp_path):
    with pytest.raises(LoraDBError, match=r"gone\.png"):
        load_image(tmp_path / "gone.png")


def test_image_above_max_pixels_is_refused(tmp_path):
    path = save(Image.new("RGB", (20, 10)), tmp_path / "big.png")

    with pytest.raises(LoraDBError, match=r"big.png is 20 x 10 pixels, above the limit of 100; downscale"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=200).size == (20, 10)


def test_bomb_header_is_refused_before_decoding(tmp_path):
    path = png_with_header_only(tmp_path / "bomb.png", 20_000, 5_000)

    with pytest.raises(LoraDBError, match=r"bomb.png is 20000 x 5000 pixels, above the limit of 64000000"):
        load_image(path)


def test_bomb_beyond_pillow_error_limit_is_refused(tmp_path):
    path = png_with_header_only(tmp_path / "huge.png", 100_000, 100_000)

    with pytest.raises(LoraDBError, match=r"huge.png: .*exceeds limit.*; downscale it"):
        load_image(path)


# ---------------------------------------------------------------------------------------------------------
# find_images


def test_find_images_sorted_case_insensitive_and_not_recursive(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()

    names = [path.name for path in find_images(tmp_path)]

    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda folder: None, "folder not found"),
        (lambda folder: folder.mkdir(), "no jpg"),
        (lambda folder: (folder.mkdir(), (folder / "caption.txt").write_text("hi")), "no jpg"),
        (lambda folder: folder.write_text("not a folder"), "not a folder"),
    ],
    ids=["missing", "empty", "only-txt", "is-a-file"],
)
def test_find_images_errors_name_option_and_folder(tmp_path, setup, reason):
    folder = tmp_path / "photos"
    setup(folder)

    with pytest.raises(LoraDBError) as caught:
        find_images(folder, "--class-dir")

    message = str(caught.value)
    assert message.startswith(f"--class-dir {folder}: ")
    assert reason in message


def test_find_images_allow_empty(tmp_path):
    assert find_images(tmp_path / "missing", allow_empty=True) == []
    assert find_images(tmp_path, allow_empty=True) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraDBError, match="not a folder"):
        find_images(tmp_path / "file", allow_empty=True)


# ---------------------------------------------------------------------------------------------------------
# scan_images


def test_scan_images_reads_captions(tmp_path):
    for name in ["a", "b", "c"]:
        save(Image.new("RGB", (32, 32)), tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a photo of sks toy on a beach\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("   \n", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes("\ufeffcaf\u00e9 toy".encode())

    records = scan_images(tmp_path, "a photo of sks toy")

    assert records == [
        ImageRecord(tmp_path / "a.png", "a photo of sks toy on a beach"),
        ImageRecord(tmp_path / "b.png", "a photo of sks toy"),
        ImageRecord(tmp_path / "c.png", "caf\u00e9 toy"),
    ]


def test_scan_images_bad_image_mentions_skip_flag(tmp_path):
    save(Image.new("RGB", (32, 32)), tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")

    with pytest.raises(LoraDBError, match=r"bad\.jpg.*--skip-bad-images"):
        scan_images(tmp_path, "p")


def test_scan_images_skips_bad_images_with_a_warning(tmp_path, caplog):
    save(Image.new("RGB", (32, 32)), tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")

    with caplog.at_level(logging.WARNING, logger="lora_db"):
        records = scan_images(tmp_path, "p", skip_bad_images=True)

    assert [record.path.name for record in records] == ["good.png"]
    assert any("bad.jpg" in record.getMessage() for record in caplog.records)


def test_scan_images_fails_when_every_image_is_bad(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "empty.png").write_bytes(b"")

    with pytest.raises(LoraDBError, match=rf"--instance-dir {tmp_path}: none of its 2 images"):
        scan_images(tmp_path, "p", skip_bad_images=True)


def test_scan_images_allow_empty_for_missing_class_folder(tmp_path):
    assert scan_images(tmp_path / "class", "p", option="--class-dir", allow_empty=True) == []


def test_scan_images_warns_about_small_and_extreme_images(tmp_path, caplog):
    save(Image.new("RGB", (64, 64)), tmp_path / "fine.png")
    save(Image.new("RGB", (40, 64)), tmp_path / "small.png")
    save(Image.new("RGB", (400, 80)), tmp_path / "wide.png")

    with caplog.at_level(logging.WARNING, logger="lora_db"):
        records = scan_images(tmp_path, "p", resolution=64)

    assert len(records) == 3
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert any("small.png" in m and "upscaled" in m for m in messages)
    assert any("wide.png" in m and "4:1" in m for m in messages)


# ---------------------------------------------------------------------------------------------------------
# prepare_image and to_tensor


def test_prepare_image_center_crops_without_resizing(tmp_path):
    image = bands([RED, GREEN, BLUE], 100, 100)

    prepared = prepare_image(image, 100)

    assert prepared.size == (100, 100)
    assert set(prepared.getdata()) == {GREEN}


@pytest.mark.parametrize("size", [(600, 200), (200, 600), (50, 80), (333, 333)])
def test_prepare_image_resizes_shorter_side_then_crops(size):
    prepared = prepare_image(Image.new("RGB", size, GREEN), 64)

    assert prepared.size == (64, 64)
    assert prepared.mode == "RGB"


def test_prepare_image_center_crop_after_downscale():
    prepared = prepare_image(bands([RED, GREEN, BLUE], 200, 200), 100)  # 600x200 -> 300x100 -> middle third

    assert prepared.size == (100, 100)
    assert close_to(prepared.getpixel((50, 50)), GREEN, tolerance=0)
    assert close_to(prepared.getpixel((3, 50)), GREEN, tolerance=20)
    assert close_to(prepared.getpixel((96, 50)), GREEN, tolerance=20)


def test_prepare_image_random_needs_rng():
    with pytest.raises(ValueError):
        prepare_image(Image.new("RGB", (8, 8)), 8, random_flip=True)


def test_prepare_image_random_is_reproducible_and_varies():
    image = bands([RED, GREEN, BLUE, WHITE], 20, 40)

    def run(seed):
        prepared = prepare_image(image, 40, random_crop=True, random_flip=True, rng=random.Random(seed))
        return prepared.tobytes()

    assert run(1) == run(1)
    assert len({run(seed) for seed in range(20)}) > 2


def test_prepare_image_flip_mirrors():
    image = bands([RED, BLUE], 10, 20)
    outcomes = {prepare_image(image, 20, random_flip=True, rng=random.Random(s)).getpixel((0, 0)) for s in range(20)}

    assert outcomes == {RED, BLUE}


def test_to_tensor_range_and_shape():
    tensor = to_tensor(bands([(0, 0, 0), WHITE], 2, 3))

    assert tensor.shape == (3, 3, 4)
    assert tensor.dtype == torch.float32
    assert tensor[:, :, :2].eq(-1).all()
    assert tensor[:, :, 2:].eq(1).all()


# ---------------------------------------------------------------------------------------------------------
# DreamBoothDataset and collate


@pytest.fixture
def records(tmp_path):
    paths = [
        save(bands([RED, GREEN, BLUE], 30, 60), tmp_path / "a.png"),
        save(bands([BLUE, WHITE], 40, 100), tmp_path / "b.jpg"),
    ]
    return [ImageRecord(paths[0], "a photo of sks toy"), ImageRecord(paths[1], "another sks toy")]


def test_dataset_items(records, clip_processor):
    dataset = DreamBoothDataset(records, 48, clip_processor)

    item = dataset[1]

    assert len(dataset) == 2
    assert item["pixel_values"].shape == (3, 48, 48)
    assert item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["clip_pixel_values"].shape == (3, 32, 32)
    assert item["prompt"] == "another sks toy"
    assert item["index"] == 1


def test_dataset_clip_input_is_the_same_augmented_crop(records, clip_processor):
    dataset = DreamBoothDataset(records, 48, clip_processor, random_crop=True, random_flip=True, seed=3)

    for epoch in range(4):
        dataset.set_epoch(epoch)
        item = dataset[0]
        pixels = ((item["pixel_values"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        expected = clip_processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(item["clip_pixel_values"], expected, atol=1e-5)


def test_dataset_augmentation_is_deterministic_per_seed_epoch_index(records, clip_processor):
    def pixels(seed, epoch):
        dataset = DreamBoothDataset(records, 48, clip_processor, random_crop=True, random_flip=True, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[0]["pixel_values"]

    assert torch.equal(pixels(7, 2), pixels(7, 2))
    assert len({pixels(7, epoch).numpy().tobytes() for epoch in range(8)}) > 1


def test_dataset_without_augmentation_ignores_epoch(records, clip_processor):
    dataset = DreamBoothDataset(records, 48, clip_processor)
    first = dataset[0]["pixel_values"]
    dataset.set_epoch(5)

    assert torch.equal(first, dataset[0]["pixel_values"])


def test_collate_through_dataloader(records, clip_processor):
    dataset = DreamBoothDataset(records, 48, clip_processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)

    batch = next(iter(loader))

    assert batch["pixel_values"].shape == (2, 3, 48, 48)
    assert batch["clip_pixel_values"].shape == (2, 3, 32, 32)
    assert batch["prompts"] == ["a photo of sks toy", "another sks toy"]
    assert batch["indices"] == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# make_demo_images


def test_make_demo_images_are_loadable(tmp_path):
    paths = make_demo_images(tmp_path / "demo", count=3, size=64)

    assert [path.name for path in paths] == ["subject_00.png", "subject_01.png", "subject_02.png"]
    assert sorted(tmp_path.joinpath("demo").iterdir()) == paths
    assert [load_image(path).size for path in paths] == [(64, 64)] * 3
    assert len(scan_images(tmp_path / "demo", "sks toy")) == 3


def test_make_demo_images_are_deterministic_and_seeded(tmp_path):
    first = make_demo_images(tmp_path / "one", count=2, size=64, seed=4)
    second = make_demo_images(tmp_path / "two", count=2, size=64, seed=4)
    other = make_demo_images(tmp_path / "three", count=2, size=64, seed=5)

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert first[0].read_bytes() != first[1].read_bytes()


def test_make_demo_images_show_the_same_subject(tmp_path):
    paths = make_demo_images(tmp_path, count=4, size=96)

    for path in paths:
        pixels = np.asarray(load_image(path)).reshape(-1, 3).astype(int)
        red_body = (np.abs(pixels - (232, 67, 46)).sum(axis=1) < 40).mean()
        teal_head = (np.abs(pixels - (31, 163, 163)).sum(axis=1) < 40).mean()
        assert red_body > 0.04
        assert teal_head > 0.02
