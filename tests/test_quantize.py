"""QLoRA: a 4-bit (NF4) or 8-bit frozen base under fp32 LoRA; nothing idle on the device during the loop.

Merge tolerance. A merged model computes (W + s·B·A)·x and the model trained on a quantized base computes
(deq(Q(W)) + s·B·A)·x: in every quantized layer they differ by exactly the base's own quantization error
(W - deq(Q(W)))·x, and LoRA adds nothing to it. So the merged U-ViT may differ from the QLoRA-trained one by about
as much as the full-precision base differs from the quantized base on the same inputs (measured 0.88x of it on
the tiny model, RMS); the test allows 1.5x, for the error propagating through weights that the adapter changed.
Against the full-precision base with the adapter attached, the merged model matches to fp32 rounding (MERGE_ATOL).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import assert_one_line_error, run_cli, t2i, train_command
from torch import nn

from lora_db.adapters.format import read_adapter
from lora_db.adapters.hotswap import AdapterSet, quantize_for
from lora_db.adapters.layers import linear_layers
from lora_db.adapters.merge import fold_adapters
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.models.quantize import quantization_tensors, quantized_bytes, quantized_layers, storage_bytes
from lora_db.training.loop import optimizer_step, train
from lora_db.training.outputs import run_validation, save_outputs
from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

MERGE_ATOL = 1e-5
QUANTIZATION_ERROR_FACTOR = 1.5  # see the module docstring

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def setup(config: TrainConfig):
    config = check_before_loading(config, torch.device("cpu"))
    return setup_run(config, setup_accelerator(config))


def backbone_linears(model: nn.Module) -> list[nn.Module]:
    """The U-ViT backbone's linear layers (under LoRA: the base layer, not LoRA's own A and B)."""
    return list(linear_layers(model.transformer).values())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_frozen_backbone_is_really_quantized_under_fp32_lora(tiny_config, kind):
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    run = setup(tiny_config(quantize_base=kind, mixed_precision="bf16", train_text_encoder=True))
    unet = run.models.unet
    base_layers = backbone_linears(unet)
    assert base_layers and not [m for m in base_layers if type(m) is nn.Linear], "every backbone layer quantized"
    lora_class = peft_bnb.Linear4bit if kind == "nf4" else peft_bnb.Linear8bitLt
    attention = [m for n, m in unet.named_modules() if n.endswith("attn1.to_q")]
    assert attention and all(isinstance(m, lora_class) for m in attention)  # peft's bitsandbytes LoRA layers
    packed = constants = 0
    for layer in quantized_layers(unet):
        numel = layer.in_features * layer.out_features
        weight = layer.weight.data
        if kind == "nf4":
            assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
            assert weight.dtype == torch.uint8 and weight.numel() == numel // 2  # two 4-bit weights a byte
            state = layer.weight.quant_state
            # Blocks never straddle two rows (the tiny model's rows hold 32 or 128 weights: blocks of 32 or 64).
            blocksize = state.blocksize
            assert blocksize == (64 if layer.in_features % 64 == 0 else 32)
            # Double quantization: one 8-bit absmax per block, itself scaled by fp32 constants per 256 blocks.
            assert state.absmax.dtype == torch.uint8 and state.absmax.numel() == numel // blocksize
            assert state.state2.absmax.dtype == torch.float32
            assert state.state2.absmax.numel() == -(-numel // blocksize // 256)
        else:
            assert isinstance(layer, bnb.nn.Linear8bitLt)
            assert weight.dtype == torch.int8 and weight.numel() == numel
        packed += weight.numel() * weight.element_size()
        constants += quantized_bytes_of(layer) - weight.numel() * weight.element_size()
    assert quantized_bytes(unet) == packed + constants
    # The same 4-bit path for the trained text encoder; LoRA stays fp32 and is all that trains.
    assert quantized_layers(run.models.text_encoder)
    assert all(p.dtype == torch.float32 for p in run.trainable_parameters)
    trainable = {id(p) for p in run.trainable_parameters}
    assert not [t for t in quantization_tensors(unet) if id(t) in trainable or t.requires_grad]


def quantized_bytes_of(layer: nn.Module) -> int:
    holder = nn.Module()
    holder.layer = layer
    return quantized_bytes(holder)


def test_loss_falls_and_only_lora_weights_change(tiny_config):
    run = setup(tiny_config(quantize_base="nf4", learning_rate=1e-2))
    frozen = {k: v.clone() for k, v in run.models.unet.state_dict().items() if "lora_" not in k}
    assert any(k.endswith("weight.absmax") for k in frozen)  # bitsandbytes' state dict holds its constants
    lora = {k: v.clone() for k, v in run.models.unet.state_dict().items() if "lora_" in k}
    losses = [optimizer_step(run, step).item() for step in range(40)]
    assert statistics.mean(losses[-10:]) < 0.9 * statistics.mean(losses[:10])
    after = run.models.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in lora.items() if ".lora_B." in k)


def test_resume_is_exact(tiny_config, tmp_path):
    options = {"quantize_base": "nf4", "train_text_encoder": True, "mixed_precision": "bf16"}
    straight = train(tiny_config(max_train_steps=6, output_dir=tmp_path / "straight", **options))
    first = tiny_config(max_train_steps=3, checkpointing_steps=3, output_dir=tmp_path / "resumed", **options)
    train(first)
    resumed = train(
        tiny_config(max_train_steps=6, output_dir=tmp_path / "resumed", resume_from_checkpoint="latest", **options)
    )
    assert resumed.losses == straight.losses[3:]
    a, b = read_adapter(straight.adapter_path), read_adapter(resumed.adapter_path)
    assert all(torch.equal(a.tensors[c][k], b.tensors[c][k]) for c in a.tensors for k in a.tensors[c])


def uvit_output(unet: nn.Module) -> torch.Tensor:
    """One seeded U-ViT noise prediction (both image outputs), fp32."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    size = config.sample_size
    inputs = (
        torch.randn(2, 4, size, size, generator=generator),
        torch.randn(2, 1, config.clip_img_dim, generator=generator),
        torch.randn(2, 77, config.text_dim, generator=generator),
    )
    with torch.no_grad():
        vae, clip, _ = unet(
            *inputs, timestep_img=torch.tensor([500, 900]), timestep_text=torch.zeros(2, dtype=torch.long), data_type=1
        )
    return torch.cat([vae.flatten(1), clip.flatten(1)], 1).float()


def rms(tensor: torch.Tensor) -> float:
    return tensor.pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, instance_dir):
    """An adapter trained on the NF4 base, and the trained model's own outputs (U-ViT and a t2i sample)."""
    config = TrainConfig(
        model="tiny",
        instance_dir=instance_dir,
        instance_prompt="a photo of sks robot",
        output_dir=tmp_path_factory.mktemp("qlora"),
        rank=4,
        alpha=8.0,  # != rank: a merge or sample ignoring the scale would not match
        learning_rate=5e-2,
        quantize_base="nf4",
        validation_prompt="a photo of sks robot",  # keeps the text encoder at hand for the t2i sample below
    )
    run = setup(config)
    for step in range(5):
        optimizer_step(run, step)
    path = save_outputs(run.config, run.models, 5)
    run.models.unet.eval()
    outputs = uvit_output(run.models.unet), t2i(run.models.pipe)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return path, *outputs


def test_merged_full_precision_model_matches_base_plus_adapter(pristine, qlora_adapter):
    path, trained, _ = qlora_adapter
    adapter = read_adapter(path)
    merged = copy.deepcopy(pristine)
    fold_adapters(merged, [(adapter, 1.0)])
    swap = AdapterSet(copy.deepcopy(pristine))
    swap.activate({swap.load(adapter): 1.0})
    np.testing.assert_allclose(uvit_output(merged.unet), uvit_output(swap.pipe.unet), rtol=0, atol=MERGE_ATOL)

    quantized_base = copy.deepcopy(pristine)
    quantize_for(quantized_base, [adapter], "nf4", torch.float32, torch.device("cpu"))
    quantization_error = rms(uvit_output(pristine.unet) - uvit_output(quantized_base.unet))
    tolerance = QUANTIZATION_ERROR_FACTOR * quantization_error
    assert rms(uvit_output(merged.unet) - trained) <= tolerance
    adapter_effect = rms(trained - uvit_output(quantized_base.unet))
    assert adapter_effect > 3 * tolerance, "the adapter must matter at this tolerance, so the test can fail"


def test_merged_onto_the_dequantized_base_computes_what_training_did(
    pristine, qlora_adapter, tmp_path, monkeypatch, capsys
):
    """`merge --dequantized-base` folds the adapter into the weights training computed with (NF4, dequantized):
    the merged model matches the QLoRA-trained one to fp32 rounding, where the full-precision merge differs by the
    base's quantization error, and it is a plain fp32 diffusers pipeline."""
    from diffusers import UniDiffuserPipeline

    from lora_db.adapters.merge import dequantize_base_as_trained, quantization_trained_on

    path, trained, _ = qlora_adapter
    adapter = read_adapter(path)
    assert quantization_trained_on([(adapter, 1.0)]) == ("nf4", "no")
    merged = copy.deepcopy(pristine)
    dequantize_base_as_trained(merged, [(adapter, 1.0)], "nf4", "no")
    assert not quantized_layers(merged.unet) and not merged.unet.is_loaded_in_4bit
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in backbone_linears(merged.unet))
    fold_adapters(merged, [(adapter, 1.0)])
    exact = rms(uvit_output(merged.unet) - trained)
    full_precision = copy.deepcopy(pristine)
    fold_adapters(full_precision, [(adapter, 1.0)])
    quantization_error = rms(uvit_output(full_precision.unet) - trained)
    assert exact <= MERGE_ATOL and quantization_error > 100 * exact, (exact, quantization_error)

    out = tmp_path / "merged"
    code, printed, err = run_cli(monkeypatch, capsys, "merge", "--adapter", path, "--dequantized-base", "--out", out)
    assert code == 0, err
    assert "onto the nf4 base dequantized" in printed
    assert json.loads((out / "lora_db_merge.json").read_text())["dequantized_base"] == "nf4"
    stock = UniDiffuserPipeline.from_pretrained(out)
    np.testing.assert_allclose(uvit_output(stock.unet), trained, rtol=0, atol=MERGE_ATOL)


def test_dequantized_base_refusals_come_before_the_base_loads(qlora_adapter, tmp_path, monkeypatch, capsys):
    import importlib.util

    import lora_db.adapters.merge
    from lora_db.adapters.format import save_adapter

    adapter = read_adapter(qlora_adapter[0])

    def variant(name: str, **metadata) -> Path:
        metadata = {**adapter.metadata, **metadata}
        return save_adapter(tmp_path / f"{name}.safetensors", adapter.tensors, adapter.specs, metadata)

    def no_loading(*args, **kwargs):
        raise AssertionError("the base must not load")

    monkeypatch.setattr(lora_db.adapters.merge, "load_pipeline", no_loading)
    int8 = variant("int8", quantize_base="int8")
    odd = variant("odd", quantize_base="fp3")
    fp5 = variant("fp5", mixed_precision="fp5")

    def merge(*adapters):
        args = [part for a in adapters for part in ("--adapter", a)]
        return run_cli(monkeypatch, capsys, "merge", *args, "--dequantized-base", "--out", tmp_path / "m")

    assert_one_line_error(merge(qlora_adapter[0], int8), "differently quantized bases", "int8", "nf4")
    assert_one_line_error(merge(odd), "'fp3'", "without --dequantized-base")
    assert_one_line_error(merge(fp5), "'fp5'", "without --dequantized-base")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    no_bitsandbytes = merge(qlora_adapter[0])
    assert_one_line_error(no_bitsandbytes, "--dequantized-base nf4 needs bitsandbytes", "drop --dequantized-base")
    assert not (tmp_path / "m").exists()


def test_sampling_on_a_4bit_base_reproduces_the_trained_model(qlora_adapter, tmp_path, monkeypatch, capsys):
    import lora_db

    path, _, trained_sample = qlora_adapter
    pipe = lora_db.load_pipeline("tiny", [path], quantize_base="nf4")
    np.testing.assert_allclose(t2i(pipe), trained_sample, rtol=0, atol=MERGE_ATOL)

    out = tmp_path / "samples"
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", "--adapter", path, "--quantize-base", "nf4", "--prompt", "a photo of sks robot",
        "--num-inference-steps", "2", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "sample.json").read_text())["quantize_base"] == "nf4"
    assert read_adapter(path).metadata["quantize_base"] == "nf4"
    code, printed, _ = run_cli(monkeypatch, capsys, "info", path)
    assert code == 0 and "nf4-quantized base" in printed
    code, printed, _ = run_cli(monkeypatch, capsys, "info", "--json", path)
    assert json.loads(printed)["quantize_base"] == "nf4"


def test_eval_on_a_quantized_base_samples_as_sampling_on_it_does(qlora_adapter, instance_dir, tmp_path, caplog):
    """`lora-db eval --quantize-base nf4` scores a QLoRA adapter on the base it was trained on: its samples are
    those `lora-db sample --quantize-base nf4` makes, not those of the full-precision base."""
    import lora_db
    from lora_db.config.evaluate import EvalConfig
    from lora_db.evaluation.evaluate import evaluate
    from lora_db.images import load_image
    from lora_db.models.sampling import generate_images

    path = qlora_adapter[0]
    prompt = "a photo of sks robot"
    outputs = {}
    for kind in ("nf4", "none"):
        config = EvalConfig(
            out=tmp_path / kind, instance_dir=instance_dir, model="tiny", adapters=[str(path)], prompts=[prompt],
            num_images=2, num_inference_steps=2, quantize_base=kind,
        )  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lora_db"):
            evaluate(config)
        hinted = "was trained on an nf4 base; --quantize-base nf4 samples it on the base it was trained on"
        assert (hinted in caplog.text) == (kind == "none")
        (sample,) = [p for p in (tmp_path / kind / "samples").glob("*_p00_seed0.png") if not p.name.startswith("base")]
        outputs[kind] = np.asarray(load_image(sample))
        assert json.loads((tmp_path / kind / "eval.json").read_text())["settings"]["quantize_base"] == kind
    pipe = lora_db.load_pipeline("tiny", [path], quantize_base="nf4")
    pipe.set_progress_bar_config(disable=True)
    # As eval generates: both seeds in one batch (a batch of one sums in another order on some CPUs).
    expected = np.asarray(generate_images(pipe, prompt, 2, seed=0, num_inference_steps=2, guidance_scale=8.0)[0])
    np.testing.assert_array_equal(outputs["nf4"], expected)
    assert not np.array_equal(outputs["none"], expected)


@pytest.mark.slow
def test_estimate_counts_packed_weights_and_constants_as_training_holds_them(tiny_config):
    from lora_db.training.estimate import estimate_memory

    config = TrainConfig(model="tiny", quantize_base="nf4", mixed_precision="bf16", cache_latents=True)
    estimate = estimate_memory(config, device="cpu")
    run = setup(tiny_config(**{k: getattr(config, k) for k in ("quantize_base", "mixed_precision", "cache_latents")}))
    unet = run.models.unet
    held = storage_bytes([*unet.parameters(), *unet.buffers(), *quantization_tensors(unet)])
    assert estimate.components["unet"].weights == held
    plain = TrainConfig(model="tiny", mixed_precision="bf16", cache_latents=True)
    assert held < estimate_memory(plain, device="cpu").components["unet"].weights


@pytest.mark.parametrize("validation", [False, True])
def test_nothing_idle_on_the_device(tiny_config, validation):
    """GPT-2 dropped (only the prefix projection stays); the text encoder released once prompts are encoded."""
    prompt = "a photo of sks robot" if validation else None
    run = setup(tiny_config(validation_prompt=prompt, num_validation_images=1, validation_inference_steps=2))
    pipe = run.models.pipe

    def devices(module):
        return {p.device.type for p in module.parameters()}

    assert devices(pipe.text_decoder.transformer) == devices(pipe.text_decoder.decode_prefix) == {"meta"}
    assert devices(pipe.text_decoder.encode_prefix) == {"cpu"}
    assert devices(pipe.text_encoder) == {"cpu" if validation else "meta"}  # kept off the device for validation
    assert devices(pipe.vae) == devices(pipe.image_encoder) == {"cpu"}  # no cached latents: the loop encodes
    optimizer_step(run, 0)
    if validation:
        run_validation(run.config, run.models, run.accelerator, 1)
        assert devices(pipe.text_decoder.transformer) == {"meta"}


def test_impossible_quantizations_fail_before_loading(tiny_config, monkeypatch, capsys, tmp_path, instance_dir):
    import importlib.util

    import lora_db.training.setup

    with pytest.raises(LoraDBError, match="--method full"):
        tiny_config(method="full", quantize_base="nf4")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(lora_db.training.setup, "load_pipeline", no_loading)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    args = train_command(instance_dir, tmp_path / "o", prompt="sks")
    assert_one_line_error(run_cli(monkeypatch, capsys, *args, "--quantize-base", "nf4"), "needs bitsandbytes")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert_one_line_error(
        run_cli(monkeypatch, capsys, *args, "--quantize-base", "int8", "--method", "full"), "--method lora"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes a device this machine lacks")
def test_a_device_bitsandbytes_cannot_use_is_one_line():
    from lora_db.models.quantize import check_quantization

    with pytest.raises(LoraDBError) as err:
        check_quantization("nf4", torch.device("cuda"), torch.bfloat16)
    message = str(err.value)
    assert "\n" not in message and "cannot run it on cuda" in message and "drop --quantize-base" in message


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return ((output.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("in_features", [32, 96, 128, 192, 384])
def test_nf4_layers_compute_within_the_formats_error_whatever_the_row_width(in_features):
    """NF4 with Gaussian weights returns them with about 9% RMS error. bitsandbytes' CPU kernel decodes blocks row
    by row, so a block spanning two rows (a 96-wide layer at the default block size 64) came back 27% off: the
    blocks are chosen to fit the rows, and this holds for every width a UniDiffuser U-ViT or tiny model has."""
    from lora_db.models.quantize import _quantized_layer

    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, 48, bias=False)
    linear.weight.data = torch.randn(48, in_features, generator=generator)
    inputs = torch.randn(16, in_features, generator=generator)
    expected = linear(inputs)
    layer = _quantized_layer(linear, "nf4", torch.float32, torch.device("cpu"))
    assert in_features % layer.weight.blocksize == 0
    weight_error = relative_error(quantized_weight(layer), linear.weight.data)
    assert 0.05 < weight_error < 0.1, weight_error  # really 4-bit, and decoded with the right scales
    assert relative_error(layer(inputs), expected) < 0.12


def quantized_weight(layer: nn.Module) -> torch.Tensor:
    from lora_db.models.quantize import dequantized_weight

    return dequantized_weight(layer)


def test_tiny_world_backbone_survives_nf4(one_thread):
    """Every linear layer of tiny-world's pretrained U-ViT, quantized, stays within NF4's own error of its
    full-precision output (measured: at most 0.10 relative RMS; 0.17-0.27 with blocks straddling its 96-wide rows,
    which is what had cost tiny-world most of its pretraining under --quantize-base nf4)."""
    from lora_db.models.loading import load_pipeline
    from lora_db.models.quantize import _quantized_layer

    unet = load_pipeline("tiny-world").unet.float()
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, linear in linear_layers(unet.transformer).items():
        inputs = torch.randn(16, linear.in_features, generator=generator)
        layer = _quantized_layer(copy.deepcopy(linear), "nf4", torch.float32, torch.device("cpu"))
        errors[name] = relative_error(layer(inputs), linear(inputs))
    assert len(errors) >= 45 and max(errors.values()) < 0.12, max(errors.items(), key=lambda item: item[1])


def test_layers_nf4_cannot_block_by_row_keep_full_precision(caplog):
    """A 48-wide U-ViT: its attention and first feed-forward layers read 48 numbers a row (no whole 32-weight
    blocks) and stay full precision, named in the log; the 192- and 96-wide rows are quantized."""
    import logging

    import bitsandbytes as bnb

    from lora_db.models.quantize import quantize_model
    from lora_db.models.random import uvit

    unet = uvit(text_dim=8, clip_img_dim=16, num_text_tokens=4, heads=2, head_dim=24, layers=3, sample_size=4)
    with caplog.at_level(logging.INFO, logger="lora_db"):
        count = quantize_model(unet, "nf4", torch.float32, torch.device("cpu"))
    layers = linear_layers(unet.transformer)
    kept = {n for n, m in layers.items() if type(m) is nn.Linear}
    quantized = {n for n, m in layers.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert kept == {n for n, m in layers.items() if m.in_features == 48} and len(quantized) == count > 0
    assert {layers[n].in_features for n in quantized} == {96, 192}
    assert "keep full precision" in caplog.text and "to_q (48 wide)" in caplog.text
    assert unet.is_loaded_in_4bit


def test_a_library_that_computes_wrongly_is_refused_before_loading(monkeypatch):
    """A kernel that runs but returns the wrong numbers (as a block misdecoded) fails the probe in one line."""
    import bitsandbytes.functional as F

    from lora_db.models.quantize import check_quantization

    check_quantization("nf4", torch.device("cpu"), torch.bfloat16)  # the installed library computes it well
    quantize = F.quantize_4bit

    def wrong_scales(*args, **kwargs):  # every block's scale 30% off, as a kernel reading the wrong one
        packed, state = quantize(*args, **kwargs)
        state.state2.absmax.mul_(1.3)  # double quantization: absmax = code(8-bit) * state2.absmax + offset
        state.offset.mul_(1.3)
        return packed, state

    monkeypatch.setattr(F, "quantize_4bit", wrong_scales)
    with pytest.raises(LoraDBError) as err:
        check_quantization("nf4", torch.device("cpu"), torch.bfloat16)
    message = str(err.value)
    assert "\n" not in message and "computes it wrongly on cpu" in message and "drop --quantize-base" in message
