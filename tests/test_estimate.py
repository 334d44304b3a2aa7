"""`lora-db estimate`: exact figures where memory is a matter of counting, the training set-up followed, the CLI."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from processes import run

from lora_db.config.evaluate import parse_memory
from lora_db.config.train import TrainConfig
from lora_db.models.memory import weight_dtype
from lora_db.training.estimate import GiB, estimate_memory

COMPONENTS = ("unet", "text_encoder", "text_decoder", "vae", "image_encoder")


def tensor_bytes(module) -> int:
    """Bytes of a module's tensors that are held (released ones sit on the meta device)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def trained_pipeline(config: TrainConfig):
    """The tiny pipeline as training holds it in the loop (set up, idle modules released), with real tensors."""
    from lora_db.models.loading import load_pipeline
    from lora_db.training.setup import release_idle_modules, setup_models

    torch.manual_seed(config.seed)
    pipe = load_pipeline("tiny", torch_dtype=weight_dtype(config.mixed_precision))
    pipe = setup_models(config, pipe, weight_dtype(config.mixed_precision), torch.device("cpu")).pipe
    release_idle_modules(config, pipe)
    return pipe


@pytest.fixture(scope="module")
def lora():
    config = TrainConfig(model="tiny")
    return config, estimate_memory(config, device="cpu")


def test_parse_memory_reads_card_sizes_in_binary_units():
    assert parse_memory("24GB") == 24 * GiB
    assert parse_memory("24 GiB") == 24 * GiB
    assert parse_memory("11.5g") == int(11.5 * GiB)
    assert parse_memory("16000MB") == 16000 * 2**20
    assert parse_memory("80") == 80 * GiB
    for bad in ("lots", "24 GB RAM", "", "-3GB"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_weights_are_those_training_sets_up(lora):
    config, estimate = lora
    pipe = trained_pipeline(config)
    for name in COMPONENTS:
        assert estimate.components[name].weights == tensor_bytes(getattr(pipe, name)), name


def test_gradients_and_adam_states_are_counted_exactly(lora):
    config, estimate = lora
    pipe = trained_pipeline(config)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    unet = estimate.components["unet"]
    assert estimate.trainable_parameters == count
    assert unet.gradients == 4 * count
    # AdamW: two fp32 moments per weight and a 4-byte step counter per tensor.
    assert unet.optimizer == 8 * count + 4 * len(trainable)
    assert unet.saved_activations > 0
    for name in ("text_encoder", "text_decoder", "vae", "image_encoder"):
        assert estimate.components[name].gradients == estimate.components[name].optimizer == 0


def test_peak_holds_weights_optimizer_and_activations(lora):
    _, estimate = lora
    weights = sum(part.weights for part in estimate.components.values())
    assert estimate.at_peak["weights"] == weights
    assert estimate.at_peak["activations"] > 0
    assert estimate.peak_bytes == sum(estimate.at_peak.values())
    assert weights <= estimate.setup_bytes < estimate.peak_bytes


def test_full_fine_tuning_pays_for_every_unet_weight(lora):
    _, lora_estimate = lora
    estimate = estimate_memory(TrainConfig(model="tiny", method="full"), device="cpu")
    unet = estimate.components["unet"]
    assert unet.gradients == unet.weights  # fp32 weights, fp32 gradients
    # Two fp32 moments per weight, less the few weights the t2i forward never uses (no gradient, no state).
    assert 1.9 * unet.weights < unet.optimizer <= 2 * unet.weights + 4 * 1000
    assert estimate.peak_bytes > lora_estimate.peak_bytes


@pytest.mark.slow
def test_the_shipped_tiny_world_is_estimated_from_its_folder(monkeypatch):
    """`--model tiny-world` names the folder in the package, for the estimate as for training: no hub lookup."""
    import lora_db.models.loading
    from lora_db.models.loading import tiny_world_dir as asset_dir

    def no_hub(model):
        raise AssertionError(f"{model} looked up on the hub")

    monkeypatch.setattr(lora_db.models.loading, "hub_load_options", no_hub)
    named = estimate_memory(TrainConfig(model="tiny-world", cache_latents=True), device="cpu")
    folder = estimate_memory(TrainConfig(model=str(asset_dir()), cache_latents=True), device="cpu")
    assert named.peak_bytes == folder.peak_bytes > 0 and named.components == folder.components
    assert named.resolution == 64  # tiny-world's own, not a default


@pytest.mark.slow
def test_cached_latents_release_the_encoders():
    estimate = estimate_memory(TrainConfig(model="tiny", cache_latents=True), device="cpu")
    for name in ("vae", "image_encoder", "text_encoder"):
        assert not estimate.components[name].resident, name
    assert estimate.components["unet"].resident and estimate.components["text_decoder"].resident
    with_text_encoder = estimate_memory(
        TrainConfig(model="tiny", cache_latents=True, train_text_encoder=True), device="cpu"
    )
    text_encoder = with_text_encoder.components["text_encoder"]
    assert text_encoder.resident and text_encoder.gradients > 0 and text_encoder.saved_activations > 0


@pytest.mark.slow
def test_bf16_halves_frozen_weights_and_keeps_lora_in_fp32(lora):
    _, fp32 = lora
    bf16 = estimate_memory(TrainConfig(model="tiny", mixed_precision="bf16"), device="cpu")
    assert bf16.components["vae"].weights * 2 == fp32.components["vae"].weights
    assert bf16.components["unet"].gradients == fp32.components["unet"].gradients


@pytest.mark.slow
def test_prior_preservation_doubles_the_batch(lora, tmp_path):
    from lora_db.synthetic.demo import make_demo_images

    _, alone = lora
    make_demo_images(tmp_path / "class", count=2, size=64)
    config = TrainConfig(model="tiny", class_prompt="a photo of a robot", class_dir=tmp_path / "class")
    estimate = estimate_memory(config, device="cpu")
    assert (alone.batch, estimate.batch) == (1, 2)
    assert estimate.components["unet"].saved_activations > alone.components["unet"].saved_activations


@pytest.mark.slow
def test_cuda_estimate_adds_the_context_and_foreach_adam():
    cpu = estimate_memory(TrainConfig(model="tiny", method="full"), device="cpu")
    cuda = estimate_memory(TrainConfig(model="tiny", method="full"), device="cuda")
    assert cuda.context_bytes == GiB // 2 and cpu.context_bytes == 0
    assert cuda.total_bytes == cuda.peak_bytes + cuda.context_bytes
    # foreach AdamW holds a temporary as large as the trained weights during its update.
    assert cuda.peak_bytes >= cpu.peak_bytes


def test_compile_on_a_cpu_counts_the_compiled_graphs_and_says_what_it_leaves_out(lora):
    from lora_db.training.estimate import COMPILED_GRAPHS_BYTES

    compiled = estimate_memory(TrainConfig(model="tiny", compile=True), device="cpu")
    assert any(note.startswith("--compile: the compiled graphs") for note in compiled.notes)
    assert compiled.peak_bytes == lora[1].peak_bytes  # the same tensors: compiled blocks change no shapes
    assert compiled.process_bytes == lora[1].process_bytes + COMPILED_GRAPHS_BYTES
    assert compiled.total_bytes == lora[1].total_bytes + COMPILED_GRAPHS_BYTES
    assert not any("--compile" in note for note in lora[1].notes)
    cuda = estimate_memory(TrainConfig(model="tiny", compile=True), device="cuda")
    assert not any("--compile" in note for note in cuda.notes)  # on a GPU that memory is the host's, not counted


def test_training_still_runs_after_an_estimate(lora, tiny_config):
    from lora_db.training.data import batch_indices
    from lora_db.training.loop import train

    assert all(isinstance(i, int) for pair in batch_indices(1, 1, 0, 0) for i in pair)
    result = train(tiny_config(max_train_steps=2))
    assert result.steps == 2


def test_format_says_whether_it_fits(lora):
    _, estimate = lora
    assert "fits in 1.00 GiB" in estimate.format(GiB)
    assert "does NOT fit" in estimate.format(estimate.total_bytes - 1)


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lora_db.cli", "estimate", *args]
    return run(command, env=env, timeout=300)


@pytest.mark.slow
def test_cli_prints_the_breakdown_and_verdict():
    result = run_cli("--model", "tiny", "--cache-latents", "--gpu-memory", "1GB")
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("unet", "not resident", "peak of the step", "CUDA context", "fits in 1.00 GiB"):
        assert text in result.stdout


@pytest.mark.slow
def test_cli_refuses_bad_values():
    usage = run_cli("--model", "tiny", "--gpu-memory", "lots")
    assert usage.returncode == 2 and "not a memory size" in usage.stderr
    error = run_cli("--model", "tiny", "--device", "cpu", "--mixed-precision", "fp16")
    assert error.returncode == 1
    assert [line for line in error.stderr.splitlines() if line.startswith("error:")] == [
        "error: --mixed-precision fp16 needs a GPU (CPU autocast has no fp16 support); "
        "use --mixed-precision bf16 on the CPU"
    ]
