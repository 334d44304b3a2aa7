"""Hot-swapping adapters on one loaded pipeline, the Python API and `lora-db sample` (tiny model, few steps)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import PROMPT, assert_one_line_error, make_adapter, run_cli, t2i
from PIL import Image, ImageDraw, ImageFont
from processes import run
from safetensors.torch import save_file

import lora_db
from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet
from lora_db.adapters.sample import Row, plan_rows
from lora_db.config.commands import WeightedAdapter
from lora_db.errors import LoraDBError
from lora_db.logs import quiet_library_logs
from lora_db.models.random import build_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    quiet_library_logs()
    folder = tmp_path_factory.mktemp("adapters")
    pristine = build_random_pipeline("tiny")
    return {
        "a": make_adapter(pristine, folder / "a.safetensors", seed=1),
        "b": make_adapter(pristine, folder / "b.safetensors", seed=2, text_encoder=True),
    }


@pytest.fixture(scope="module")
def swap(files) -> AdapterSet:
    """One tiny pipeline with adapters a and b loaded side by side."""
    adapters = AdapterSet(build_random_pipeline("tiny"))
    for path in files.values():
        adapters.load(path)
    return adapters


def sample_with(adapters: AdapterSet, weights: dict[str, float]) -> np.ndarray:
    adapters.activate(weights)
    return t2i(adapters.pipe)


def test_each_adapter_changes_the_output(swap):
    base = sample_with(swap, {})
    a, b = sample_with(swap, {"a": 1.0}), sample_with(swap, {"b": 1.0})
    assert np.abs(a - base).max() > 1e-2
    assert np.abs(b - base).max() > 1e-2
    assert np.abs(a - b).max() > 1e-2


def test_switching_a_b_a_gives_a_bitwise(swap):
    first = sample_with(swap, {"a": 1.0})
    sample_with(swap, {"b": 1.0})
    sample_with(swap, {})
    assert np.array_equal(sample_with(swap, {"a": 1.0}), first)


def test_weight_zero_is_the_base_model(swap):
    assert np.array_equal(sample_with(swap, {"a": 0.0, "b": 0.0}), sample_with(swap, {}))


def test_weight_scales_the_update_linearly(swap):
    """A layer's output at weight w is base + w x (adapter - base), so weight 2 lies on the same line."""
    layer = next(m for m in swap.pipe.unet.modules() if hasattr(m, "lora_A") and "a" in m.lora_A)
    x = np.random.default_rng(0).standard_normal((3, layer.in_features)).astype(np.float32)

    def out(weights):
        swap.activate(weights)
        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    base, one, two = out({}), out({"a": 1.0}), out({"a": 2.0})
    np.testing.assert_allclose(two - base, 2 * (one - base), rtol=1e-4, atol=1e-6)


def test_unknown_name_and_bad_weight_are_refused(swap):
    with pytest.raises(LoraDBError, match="no adapter named c"):
        swap.activate({"c": 1.0})
    with pytest.raises(LoraDBError, match="finite"):
        swap.activate({"a": math.nan})


def test_load_pipeline_api(files):
    pipe = lora_db.load_pipeline("tiny", adapters=[files["a"], f"{files['b']}:0.5"])
    assert pipe.lora_adapters.names == ["a", "b"]
    assert pipe.lora_adapters.active == {"a": 1.0, "b": 0.5}
    combined = t2i(pipe)
    pipe.lora_adapters.activate({})
    assert np.abs(combined - t2i(pipe)).max() > 1e-2


def test_import_lora_db_stays_light():
    code = "import sys, lora_db; assert lora_db.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    run([sys.executable, "-c", code], timeout=300, check=True)


@pytest.mark.parametrize(
    ("text", "path", "weight"),
    [("a.safetensors", "a.safetensors", 1.0), ("a.safetensors:0.7", "a.safetensors", 0.7), ("none", None, 1.0)],
)
def test_adapter_argument(text, path, weight):
    assert WeightedAdapter.parse(text) == WeightedAdapter(Path(path) if path else None, weight)


def test_combine_plans_one_row_plus_the_base():
    a, b = WeightedAdapter(Path("a.safetensors"), 0.7), WeightedAdapter(Path("b.safetensors"), 0.5)
    names = {a.path: "a", b.path: "b"}
    rows = plan_rows([WeightedAdapter(None), a, b], names, combine=True)
    assert [r.label for r in rows] == ["base", "a:0.7 + b:0.5"]
    assert rows[1].weights == {"a": 0.7, "b": 0.5}
    assert plan_rows([a, b], names, combine=False) == [Row((("a", a),)), Row((("b", b),))]


def test_grid_enlarges_small_cells_and_wraps_labels():
    from lora_db.images import LABEL_MAX_LINES, _wrap, image_grid

    cell = Image.new("RGB", (64, 64), "red")
    assert image_grid([[cell, cell]]).size == (128, 64)  # unlabelled, as validation during training uses it
    long = "a photo of sks robot on a beach at sunset, highly detailed, 35mm (seed 0)"
    grid = image_grid([[cell], [cell]], ["base", "robot"], [long], min_cell_size=128)
    assert grid.height > 2 * 128 and grid.width > 128
    assert np.asarray(grid)[-1, -1].tolist() == [255, 0, 0]  # the enlarged cell reaches the corner
    font = ImageFont.load_default(size=13)
    lines = _wrap(long, 120, font, ImageDraw.Draw(grid).textlength)
    assert len(lines) == LABEL_MAX_LINES and lines[-1].endswith("...")


# -- lora-db sample ---------------------------------------------------------------------------------------------


def test_sample_writes_a_labelled_grid_and_tagged_pngs(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        *("sample", "--adapter", "none", "--adapter", files["a"], "--adapter", f"{files['b']}:0.5"),
        *("--adapter", files["a"], "--prompt", PROMPT, "--num-images", "2", "--num-inference-steps", "2"),
        *("--out", out),
    )
    assert code == 0
    grid = Image.open(out / "grid.png")
    rows = json.loads(grid.text["rows"])
    assert rows == ["base", "a", "b:0.5", "a"]
    assert grid.text["title"] == PROMPT and json.loads(grid.text["columns"]) == ["seed 0", "seed 1"]
    assert grid.height >= 4 * 128 and grid.width >= 2 * 128
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 8
    text = Image.open(out / "02-b_0.5_p00_seed1.png").text
    assert (text["prompt"], text["seed"], text["adapter"], text["weight"]) == (PROMPT, "1", str(files["b"]), "0.5")
    assert Image.open(out / "00-base_p00_seed0.png").text["adapter"] == "none"
    # Same seed, same adapter, same image, even after switching to b and back.
    for seed in (0, 1):
        first = (out / f"01-a_p00_seed{seed}.png").read_bytes()
        assert first == (out / f"03-a_p00_seed{seed}.png").read_bytes()
    assert (out / "00-base_p00_seed0.png").read_bytes() != (out / "01-a_p00_seed0.png").read_bytes()
    assert "base model load:" in stdout and "adapter switch:" in stdout
    record = json.loads((out / "sample.json").read_text())
    assert len(record["timings_s"]["switches"]) == 4


def test_sample_combine_is_the_weighted_sum(files, swap, tmp_path, monkeypatch, capsys):
    from lora_db.models.sampling import generate_images

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na photo of a dog\n")
    out = tmp_path / "samples"
    args = ("sample", "--adapter", "none", "--adapter", f"{files['a']}:0.7", "--adapter", f"{files['b']}:0.5")
    code, _, _ = run_cli(
        monkeypatch, capsys, *args, "--combine", "--prompts-file", prompts, "--num-inference-steps", "2", "--out", out
    )
    assert code == 0
    grid = Image.open(out / "grid.png")
    assert json.loads(grid.text["rows"]) == ["base", "a:0.7 + b:0.5"]
    assert json.loads(grid.text["columns"]) == [f"{PROMPT} (seed 0)", "a photo of a dog (seed 0)"]
    assert grid.text["title"] == f"{PROMPT}; a photo of a dog"
    combined = Image.open(out / "01-a_0.7+b_0.5_p00_seed0.png")
    assert (combined.text["adapter"], combined.text["weight"]) == (f"{files['a']} + {files['b']}", "0.7 + 0.5")
    swap.activate({"a": 0.7, "b": 0.5})
    expected = generate_images(swap.pipe, PROMPT, 1, seed=0, num_inference_steps=2)[0]
    assert np.array_equal(np.asarray(combined), np.asarray(expected))


def test_a_training_run_folder_is_its_final_adapter_for_sample_and_info(files, tmp_path, monkeypatch, capsys):
    """`info RUN` and `sample --adapter RUN` take the folder `lora-db train` wrote, as eval does."""
    run_folder = tmp_path / "robot"
    run_folder.mkdir()
    (run_folder / "adapter.safetensors").write_bytes(files["b"].read_bytes())
    (run_folder / "config.json").write_text(json.dumps({"method": "lora", "model": "tiny"}))
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", run_folder)
    assert code == 0, stdout
    final = run_folder / "adapter.safetensors"
    assert f"file          {final}" in stdout
    assert f"run folder    adapters at steps 0 (eval scores each); this is {final}" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", run_folder, "--json")
    assert code == 0 and json.loads(stdout)["run"]["steps"] == [0]
    out = tmp_path / "samples"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "sample", "--adapter", run_folder, "--prompt", PROMPT, "--num-inference-steps", "1",
        "--out", out,
    )  # fmt: skip
    assert code == 0 and "(1 row: robot)" in stdout
    assert read_adapter(run_folder).path == final


def test_sample_i2t_writes_captions(files, tmp_path, monkeypatch, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (96, 80), "teal").save(image)
    out = tmp_path / "captions"
    args = ("sample", "--mode", "i2t", "--image", image, "--adapter", files["a"], "--num-inference-steps", "1")
    code, stdout, _ = run_cli(monkeypatch, capsys, *args, "--out", out)
    assert code == 0
    captions = json.loads((out / "captions.json").read_text())
    assert [(c["row"], c["seed"]) for c in captions] == [("a", 0)]
    assert (out / "captions.txt").read_text().startswith("a\tseed 0\t")
    assert "a (seed 0): " in stdout


def test_sample_failure_leaves_nothing(files, tmp_path, monkeypatch):
    import lora_db.adapters.sample
    from lora_db.adapters.sample import sample
    from lora_db.config.commands import SampleConfig

    def fail(*args, **kwargs):
        raise LoraDBError("simulated failure while sampling")

    monkeypatch.setattr(lora_db.adapters.sample, "generate_images", fail)
    with pytest.raises(LoraDBError, match="simulated"):
        sample(SampleConfig(out=tmp_path / "out", adapters=[str(files["a"])], prompts=[PROMPT], num_inference_steps=1))
    assert list(tmp_path.iterdir()) == []


def test_sample_overwrite_rules(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    args = ("sample", "--adapter", files["a"], "--prompt", PROMPT, "--num-inference-steps", "1", "--out", out)
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), "already exists", "--overwrite")
    assert run_cli(monkeypatch, capsys, *args, "--overwrite")[0] == 0  # an earlier sample output is replaced whole
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(monkeypatch, capsys, *args, "--overwrite"), "notes.txt", "lora-db did not write")
    assert (out / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("keep me")
    result = run_cli(monkeypatch, capsys, *args[:-1], theirs, "--overwrite")
    assert_one_line_error(result, "did not write", "will not be replaced")
    assert (theirs / "thesis.tex").read_text() == "keep me"


# -- errors: one line, exit code 1, nothing written ------------------------------------------------------------------


def _other_architecture(files, folder: Path) -> Path:
    """Same keys as adapter a, but 48-wide layers: trained for another model size."""
    adapter = read_adapter(files["a"])
    flat = {}
    for key, tensor in adapter.tensors["unet"].items():
        shape = (4, 48) if ".lora_A." in key else (48, 4)
        flat[f"unet.{key}"] = tensor.new_zeros(shape)
    path = folder / "wide.safetensors"
    save_file(flat, str(path), metadata=adapter.metadata)
    return path


def _unknown_keys(files, folder: Path) -> Path:
    adapter = read_adapter(files["a"])
    renamed = {k.replace("transformer_in_blocks", "encoder_blocks"): t for k, t in adapter.tensors["unet"].items()}
    flat = {f"unet.{k}": t for k, t in renamed.items()}
    path = folder / "renamed.safetensors"
    save_file(flat, str(path), metadata=adapter.metadata)
    return path


def _no_metadata(files, folder: Path) -> Path:
    adapter = read_adapter(files["a"])
    path = folder / "bare.safetensors"
    save_file({f"unet.{k}": t for k, t in adapter.tensors["unet"].items()}, str(path))
    return path


def _truncated(files, folder: Path) -> Path:
    path = folder / "cut.safetensors"
    data = files["a"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pickle(files, folder: Path) -> Path:
    path = folder / "adapter.bin"
    path.write_bytes(b"\x80\x04K\x01.")
    return path


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (_other_architecture, ["wide.safetensors", "48", "another model size"]),
        (_unknown_keys, ["renamed.safetensors", "no linear layer", "another architecture"]),
        (_no_metadata, ["bare.safetensors", "no lora-db metadata"]),
        (_truncated, ["cut.safetensors", "truncated or corrupt"]),
        (_pickle, ["adapter.bin", "pickle"]),
    ],
    ids=["other-architecture", "unknown-keys", "no-metadata", "truncated", "pickle"],
)
def test_sample_refuses_bad_adapter_files(make, fragments, files, tmp_path, monkeypatch, capsys):
    bad = make(files, tmp_path)
    out = tmp_path / "out"
    args = ("sample", "--model", "tiny", "--adapter", files["a"], "--adapter", bad, "--prompt", PROMPT)
    assert_one_line_error(run_cli(monkeypatch, capsys, *args, "--out", out), *fragments)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


@pytest.mark.parametrize("weight", ["abc", "nan", "inf", "-inf", ""])
def test_sample_refuses_weights_that_are_not_numbers(weight, files, tmp_path, monkeypatch, capsys):
    args = ("sample", "--adapter", f"{files['a']}:{weight}", "--prompt", PROMPT, "--out", tmp_path / "out")
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), f"--adapter {files['a']}:{weight}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--height", "512"), "--height 512"),
        (("--mode", "i2t"), "--prompt and --prompts-file are for --mode t2i"),
        (("--adapter", "missing.safetensors"), "not found"),
        (("--num-images", "0"), "--num-images must be at least 1"),
    ],
)
def test_sample_refuses_bad_options(extra, fragment, files, tmp_path, monkeypatch, capsys):
    args = ("sample", "--adapter", files["a"], "--prompt", PROMPT, "--out", tmp_path / "out", *extra)
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), fragment)
