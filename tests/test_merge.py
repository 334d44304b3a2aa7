"""Merging adapters into the base weights, combining adapters into one file, and `lora-db merge` / `lora-db info`.

Tolerance: a merged model computes (W + s·B·A)·x where the adapter model computes W·x + s·B·(A·x); in fp32 the
two round differently, so after two sampling steps and the VAE, outputs in [0, 1] agree to MERGE_ATOL.
"""

import copy
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import assert_one_line_error, initial_latents, make_adapter, run_cli, t2i
from processes import run
from safetensors import safe_open

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet
from lora_db.adapters.layers import lora_delta, lora_pairs, lora_scale
from lora_db.adapters.merge import combine_adapters, fold_adapters, untie_caption_decoder
from lora_db.adapters.spec import AdapterFile
from lora_db.errors import LoraDBError

MERGE_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(pristine, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(pristine, folder / "a.safetensors", seed=1),
        "b": make_adapter(pristine, folder / "b.safetensors", seed=2, text_encoder=True),
    }


@pytest.fixture(scope="module")
def swap(pristine, files) -> AdapterSet:
    adapters = AdapterSet(copy.deepcopy(pristine))
    for path in files.values():
        adapters.load(path)
    return adapters


def adapter_output(swap: AdapterSet, weights: dict[str, float]) -> np.ndarray:
    swap.activate(weights)
    return t2i(swap.pipe)


def merged_output(pristine, files, weights: dict[str, float]) -> np.ndarray:
    pipe = copy.deepcopy(pristine)
    fold_adapters(pipe, [(read_adapter(files[name]), weight) for name, weight in weights.items()])
    return t2i(pipe)


def test_merged_model_equals_base_plus_adapter(pristine, files, swap):
    with_adapter = adapter_output(swap, {"a": 1.0})
    assert np.abs(with_adapter - t2i(pristine)).max() > 1e-2  # the adapter matters, so the test can fail
    np.testing.assert_allclose(merged_output(pristine, files, {"a": 1.0}), with_adapter, rtol=0, atol=MERGE_ATOL)


def test_weighted_sum_of_two_adapters_equals_merging_both(pristine, files, swap):
    weights = {"a": 0.7, "b": -0.4}  # b also holds text-encoder LoRA
    expected = adapter_output(swap, weights)
    assert np.abs(expected - adapter_output(swap, {"a": 0.7})).max() > 1e-2
    np.testing.assert_allclose(merged_output(pristine, files, weights), expected, rtol=0, atol=MERGE_ATOL)


def test_merging_at_weight_zero_changes_nothing(pristine, files):
    pipe = copy.deepcopy(pristine)
    fold_adapters(pipe, [(read_adapter(files["a"]), 0.0)])
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, pristine.unet.state_dict()[name]), name


def test_non_finite_merge_is_refused(pristine, tmp_path):
    adapter = make_adapter(pristine, tmp_path / "a.safetensors", seed=3)
    with pytest.raises(LoraDBError, match="non-finite"):
        fold_adapters(copy.deepcopy(pristine), [(read_adapter(adapter), 1e300)])  # the sum overflows, not the file


def test_a_tied_caption_decoder_is_untied_so_it_can_be_saved(pristine, tmp_path):
    from diffusers import UniDiffuserTextDecoder

    pipe = copy.deepcopy(pristine)
    decoder = pipe.text_decoder.transformer
    decoder.lm_head.weight = decoder.get_input_embeddings().weight  # tied, as in thu-ml/unidiffuser-v1
    untie_caption_decoder(pipe)
    pipe.text_decoder.save_pretrained(tmp_path / "text_decoder", safe_serialization=True)
    loaded = UniDiffuserTextDecoder.from_pretrained(tmp_path / "text_decoder")
    assert torch.equal(loaded.transformer.lm_head.weight, decoder.get_input_embeddings().weight)


STOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from diffusers import UniDiffuserPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    folder, latents, out = sys.argv[1:]
    pipe = UniDiffuserPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    start = load_file(latents)
    images = pipe(
        prompt="a photo of sks robot",
        vae_latents=start["vae"],
        clip_latents=start["clip"],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert not any(name.startswith("lora_db") for name in sys.modules), "lora_db was imported"
    np.save(out, images)
    """
)


def test_merged_folder_loads_in_stock_diffusers_and_matches(files, swap, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    out = tmp_path / "merged"
    args = ("merge", "--adapter", files["a"], "--adapter", f"{files['b']}:0.5", "--out", out)
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "merged 28 layers" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left
    assert json.loads((out / "lora_db_merge.json").read_text())["base_model"] == "tiny"
    vae, clip = initial_latents(swap.pipe, seed=0)
    save_file({"vae": vae, "clip": clip}, str(tmp_path / "latents.safetensors"))
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    # -I: isolated, so neither the working directory nor PYTHONPATH can bring lora_db in.
    command = [sys.executable, "-I", str(script), str(out), str(tmp_path / "latents.safetensors")]
    run([*command, str(tmp_path / "stock.npy")], timeout=300, check=True)
    expected = adapter_output(swap, {"a": 1.0, "b": 0.5})
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), expected, rtol=0, atol=MERGE_ATOL)


def test_save_dtype_and_overwrite(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    args = ("merge", "--adapter", files["a"], "--out", out, "--save-dtype", "bf16")
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    weights = next((out / "unet").glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), "already exists")
    assert run_cli(monkeypatch, capsys, *args[:-2], "--overwrite")[0] == 0  # an earlier merge is replaced


def test_fp16_overflow_is_refused(pristine, tmp_path, monkeypatch, capsys):
    big = make_adapter(pristine, tmp_path / "big.safetensors", seed=4, magnitude=300.0)
    out = tmp_path / "merged"
    args = ("merge", "--adapter", big, "--out", out, "--save-dtype", "fp16")
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), "not finite in torch.float16", "--save-dtype")
    assert not out.exists()


# -- combining adapters into one file -------------------------------------------------------------------------------


def weighted_deltas(files, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """component.module -> sum of weight x scale x B @ A, from full matrices (the reference)."""
    total: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        adapter = read_adapter(files[name])
        for component, spec in adapter.specs.items():
            for module, (lora_a, lora_b) in lora_pairs(adapter, component).items():
                delta = lora_delta(lora_a, lora_b, lora_scale(spec, weight))
                key = f"{component}.{module}"
                total[key] = total[key] + delta if key in total else delta
    return total


def combined_deltas(combined) -> dict[str, torch.Tensor]:
    adapter = AdapterFile(Path("combined.safetensors"), combined.tensors, combined.specs)
    return {
        f"{component}.{module}": lora_delta(lora_a, lora_b, spec.scale)
        for component, spec in combined.specs.items()
        for module, (lora_a, lora_b) in lora_pairs(adapter, component).items()
    }


def test_concatenation_is_exact(files):
    adapters = [(read_adapter(files["a"]), 0.6), (read_adapter(files["b"]), 0.4)]
    combined = combine_adapters(adapters)
    assert {c: s.rank for c, s in combined.specs.items()} == {"unet": 8, "text_encoder": 2}
    assert all(s.alpha == s.rank for s in combined.specs.values())
    expected = weighted_deltas(files, {"a": 0.6, "b": 0.4})
    got = combined_deltas(combined)
    assert got.keys() == expected.keys()
    for key, delta in expected.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-6, atol=1e-7)
    assert combined.relative_error == 0.0


def test_svd_to_a_lower_rank_reports_its_error(files):
    adapters = [(read_adapter(files["a"]), 0.6), (read_adapter(files["b"]), 0.4)]
    combined = combine_adapters(adapters, rank=3)
    assert {c: s.rank for c, s in combined.specs.items()} == {"unet": 3, "text_encoder": 2}  # no zero padding
    expected = weighted_deltas(files, {"a": 0.6, "b": 0.4})
    got = combined_deltas(combined)
    lost = sum((got[k] - d).double().pow(2).sum() for k, d in expected.items())
    norm = sum(d.double().pow(2).sum() for d in expected.values())
    assert combined.relative_error > 0.05
    assert combined.relative_error == pytest.approx(float((lost / norm).sqrt()), rel=1e-4)
    # The text encoder (rank 2 in b) fits in rank 3: kept exact at its own rank 2.
    for key in (k for k in expected if k.startswith("text_encoder.")):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert combine_adapters(adapters, rank=8).relative_error < 1e-6


def test_into_adapter_file_hot_swaps_like_both(files, swap, tmp_path, monkeypatch, capsys):
    path = tmp_path / "ab.safetensors"
    args = ("merge", "--adapter", f"{files['a']}:0.6", "--adapter", f"{files['b']}:0.4", "--into-adapter", path)
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "exact" in stdout
    expected = adapter_output(swap, {"a": 0.6, "b": 0.4})
    name = swap.load(path, name="ab")
    np.testing.assert_allclose(adapter_output(swap, {name: 1.0}), expected, rtol=0, atol=MERGE_ATOL)
    code, stdout, _ = run_cli(monkeypatch, capsys, *args[:-1], tmp_path / "ab3.safetensors", "--rank", "3")
    assert code == 0 and "SVD to rank 3: relative error" in stdout
    assert_one_line_error(run_cli(monkeypatch, capsys, *args), "already exists")


# -- lora-db info and errors ------------------------------------------------------------------------------------


def test_info_reads_metadata_without_loading_a_model(files, monkeypatch, capsys):
    import lora_db.models.loading

    def no_model(*args, **kwargs):
        raise AssertionError("info loaded a model")

    monkeypatch.setattr(lora_db.models.loading, "load_pipeline", no_model)
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", files["b"])
    assert code == 0
    assert "base model    tiny" in stdout
    assert "trained       0 steps on 'a photo of sks robot'" in stdout
    assert "unet          rank 4, alpha 8 (scale 2), 20 layers (to_q, to_k, to_v, to_out.0), 5,120 parameters" in stdout
    assert "text_encoder  rank 2, alpha 1 (scale 0.5), 8 layers" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", files["a"], "--json")
    assert json.loads(stdout)["components"]["unet"]["layers"] == 20


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--adapter", "{a}:nan", "--out", "{tmp}/m"), ["{a}:nan", "finite"]),
        (("--adapter", "{tmp}/x.pt", "--out", "{tmp}/m"), ["x.pt", "pickle"]),
        (("--adapter", "{a}", "--out", "{tmp}/m", "--rank", "2"), ["--rank goes with --into-adapter"]),
        (("--adapter", "{a}"), ["give one of --out"]),
        (("--adapter", "{a}", "--into-adapter", "{tmp}/x.bin"), ["end in .safetensors"]),
        (("--adapter", "{a}", "--out", "{tmp}"), ["already exists"]),
        (("--adapter", "{a}", "--out", "{tmp}", "--overwrite"), ["did not write", "will not be replaced"]),
        (("--adapter", "{a}", "--out", "{tmp}/m", "--dequantized-base"), ["{a}", "full-precision base"]),
        (("--adapter", "{a}", "--into-adapter", "{tmp}/x.safetensors", "--dequantized-base"), ["goes with --out"]),
    ],
    ids=[
        "nan-weight",
        "pickle",
        "rank-without-into",
        "no-output",
        "into-pickle",
        "out-exists",
        "foreign-overwrite",
        "dequantized-base-of-a-plain-adapter",
        "dequantized-base-into-adapter",
    ],
)
def test_merge_errors(extra, fragments, files, tmp_path, monkeypatch, capsys):
    (tmp_path / "x.pt").write_bytes(b"\x80\x04K\x01.")
    (tmp_path / "notes.txt").write_text("keep me")
    fill = {"a": files["a"], "tmp": tmp_path}
    result = run_cli(monkeypatch, capsys, "merge", *(part.format(**fill) for part in extra))
    assert_one_line_error(result, *(fragment.format(**fill) for fragment in fragments))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "x.pt"]


@pytest.mark.parametrize("adapter_type", ["lora", "lokr", "loha"])
def test_hot_swap_and_merge_reproduce_the_trained_models_own_forward(pristine, tiny_config, tmp_path, adapter_type):
    """Tie both paths to training itself: peft's scaling in the trained model, not lora-db's own scale formula
    (for LoKr and LoHa: peft's update, not lora-db's own in adapters/kinds.py)."""
    from lora_db.training.loop import optimizer_step
    from lora_db.training.outputs import save_outputs
    from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

    options = {"rank": 4, "alpha": 8.0, "learning_rate": 5e-2, "train_text_encoder": True, "adapter_type": adapter_type}
    config = check_before_loading(tiny_config(**options), torch.device("cpu"))
    run = setup_run(config, setup_accelerator(config))
    for step in range(3):
        optimizer_step(run, step)
    path = save_outputs(config, run.models, 3)
    for module in run.models.trained.values():
        module.eval()
    trained = t2i(run.models.pipe)

    swap = AdapterSet(copy.deepcopy(pristine))
    name = swap.load(path)
    swap.activate({name: 1.0})
    np.testing.assert_allclose(t2i(swap.pipe), trained, atol=MERGE_ATOL)
    swap.activate({})
    assert np.abs(t2i(swap.pipe) - trained).max() > 100 * MERGE_ATOL, "the adapter must matter at this tolerance"

    merged = copy.deepcopy(pristine)
    fold_adapters(merged, [(read_adapter(path), 1.0)])
    np.testing.assert_allclose(t2i(merged), trained, atol=MERGE_ATOL)
