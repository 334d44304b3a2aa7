"""Training on the tiny model: the loss falls, only LoRA weights move, options combine, resume is exact."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
from safetensors import safe_open

from lora_db.adapters.format import read_adapter
from lora_db.errors import LoraDBError
from lora_db.layout import list_checkpoints
from lora_db.models.memory import uvit_blocks
from lora_db.training.data import batch_indices
from lora_db.training.loop import micro_batch_loss, optimizer_step, train
from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_complete(tiny_config):
    config = tiny_config(max_train_steps=40, learning_rate=1e-2)
    result = train(config)
    losses = result.losses
    assert len(losses) == 40
    assert statistics.mean(losses[-10:]) < 0.9 * statistics.mean(losses[:10])

    rows = metrics(config.output_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all({"step", "loss", "lr", "peak_memory_bytes"} <= set(r) for r in rows)
    assert all(r["peak_memory_bytes"] > 0 for r in rows)

    adapter = read_adapter(result.adapter_path)
    assert set(adapter.tensors) == {"unet"}
    assert adapter.specs["unet"].rank == 4 and adapter.specs["unet"].alpha == 4.0
    assert adapter.specs["unet"].target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    meta = adapter.metadata
    assert meta["base_model"] == "tiny"
    assert meta["instance_prompt"] == "a photo of sks robot"
    assert meta["steps"] == "40"
    assert meta["lora_db_version"]
    # 5 blocks x 4 projections x (A, B)
    assert len(adapter.tensors["unet"]) == 40
    assert all(k.startswith("transformer.") for k in adapter.tensors["unet"])

    resolved = json.loads((config.output_dir / "config.json").read_text())
    assert resolved["resolution"] == 64 and resolved["alpha"] == 4.0
    assert not [p for p in config.output_dir.iterdir() if p.name.endswith(".tmp")]


def test_pinned_first_step_loss(tiny_config):
    first = train(tiny_config(max_train_steps=1)).losses[0]
    assert first == pytest.approx(1.5667528, abs=1e-4)


def _frozen_state(run):
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name in ("unet", "text_encoder", "vae", "image_encoder", "text_decoder")
        for key, tensor in getattr(run.models.pipe, name).state_dict().items()
        if "lora_" not in key and tensor.device.type != "meta"  # released modules (meta) hold no weights
    }


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_only_lora_weights_change(tiny_config, train_text_encoder):
    config = check_before_loading(
        tiny_config(train_text_encoder=train_text_encoder, learning_rate=1e-2), torch.device("cpu")
    )
    run = setup_run(config, setup_accelerator(config))
    frozen = _frozen_state(run)
    lora_before = {k: v.detach().clone() for k, v in run.models.unet.named_parameters() if "lora_" in k}
    for step in range(3):
        optimizer_step(run, step)
    after = _frozen_state(run)
    assert frozen.keys() == after.keys()
    changed = [k for k in frozen if not torch.equal(frozen[k], after[k])]
    assert changed == []
    lora_after = dict(run.models.unet.named_parameters())
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_text_encoder_lora_learns(tiny_config):
    config = tiny_config(train_text_encoder=True, max_train_steps=5, learning_rate=1e-2)
    adapter = read_adapter(train(config).adapter_path)
    assert set(adapter.tensors) == {"unet", "text_encoder"}
    assert adapter.specs["text_encoder"].target_modules == ("q_proj", "k_proj", "v_proj", "out_proj")
    # lora_B starts at zero: a non-zero B means gradients reached the text encoder through text_decoder.encode.
    b_norms = [t.abs().sum().item() for k, t in adapter.tensors["text_encoder"].items() if "lora_B" in k]
    assert b_norms and all(n > 0 for n in b_norms)


MEMORY_OPTIONS = {
    "checkpointing": {"gradient_checkpointing": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "bf16": {"mixed_precision": "bf16"},
    "cache": {"cache_latents": True},
    "text_encoder": {"train_text_encoder": True},
    "prior": {"class_prompt": "a photo of a robot", "num_class_images": 3, "class_generation_steps": 2},
}


@pytest.mark.parametrize("name", [*MEMORY_OPTIONS, "all"])
def test_memory_options_alone_and_together(tiny_config, tmp_path, name):
    options = (
        {k: v for opts in MEMORY_OPTIONS.values() for k, v in opts.items()} if name == "all" else MEMORY_OPTIONS[name]
    )
    if "class_prompt" in options:
        options = {**options, "class_dir": tmp_path / "class"}
    config = tiny_config(max_train_steps=30, learning_rate=1e-2, **options)
    result = train(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert statistics.mean(result.losses[-10:]) < statistics.mean(result.losses[:10])
    assert result.adapter_path.is_file()


def one_backward(config):
    """Bytes saved for backward, block forwards run during backward, and the gradients of one micro-batch."""
    run = setup(config)
    calls = []
    for block in uvit_blocks(run.models.unet):  # attn1 runs inside each block's forward and its recomputation
        block.attn1.register_forward_hook(lambda *_: calls.append(1))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = micro_batch_loss(run, 0)
    forward_calls = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.models.unet.named_parameters() if p.requires_grad}
    return sum(saved), len(calls) - forward_calls, grads


def test_gradient_checkpointing_recomputes_blocks_saves_less_and_keeps_the_gradients(tiny_config):
    options = {"lora_dropout": 0.3, "max_train_steps": 1}  # dropout: the recomputation must replay the same masks
    plain_bytes, plain_recomputed, plain_grads = one_backward(tiny_config(**options))
    ckpt_bytes, ckpt_recomputed, ckpt_grads = one_backward(tiny_config(gradient_checkpointing=True, **options))
    blocks = 5
    assert plain_recomputed == 0 and ckpt_recomputed == blocks
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def setup(config):
    config = check_before_loading(config, torch.device("cpu"))
    return setup_run(config, setup_accelerator(config))


def test_bf16_stores_frozen_weights_in_bf16_and_lora_in_fp32(tiny_config):
    run = setup(tiny_config(mixed_precision="bf16", train_text_encoder=True))
    pipe = run.models.pipe
    for component in ("unet", "text_encoder", "vae", "image_encoder", "text_decoder"):
        dtypes = {p.dtype for n, p in getattr(pipe, component).named_parameters() if "lora_" not in n}
        assert dtypes == {torch.bfloat16}, component
    assert {p.dtype for p in run.trainable_parameters} == {torch.float32}


def test_adamw8bit_keeps_8bit_moments(tiny_config):
    # bitsandbytes keeps tensors under 4096 elements in 32-bit state: rank 32 on the MLP's 128-wide side is the
    # first that counts (lora_A of ff.net.2 and lora_B of ff.net.0.proj, 32 x 128).
    run = setup(tiny_config(optimizer="adamw8bit", rank=32, target_modules=["ff.net.0.proj", "ff.net.2"]))
    optimizer_step(run, 0)
    states = [run.optimizer.state[p] for p in run.trainable_parameters]
    large = [s for p, s in zip(run.trainable_parameters, states, strict=True) if p.numel() >= 4096]
    assert large and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in large)
    assert all(s["state1"].numel() == p.numel() for p, s in zip(run.trainable_parameters, states, strict=True))


def test_a_step_calls_the_optimizer_itself_unless_accelerate_s_wrapper_adds_to_it(tiny_config):
    """accelerate's optimizer wrapper costs tiny-world's CPU step 0.3 ms and adds nothing without a gradient scaler
    (benchmarks/README.md, Speed): the step goes to the torch optimizer inside, which still trains the adapter."""
    from accelerate.optimizer import AcceleratedOptimizer

    from lora_db.training.optimizers import stepped_optimizer

    run = setup(tiny_config())
    assert isinstance(run.optimizer, AcceleratedOptimizer) and run.step_optimizer is run.optimizer.optimizer
    before = [p.detach().clone() for p in run.trainable_parameters]
    optimizer_step(run, 0)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.trainable_parameters, strict=True))
    assert all(p.grad is None for p in run.trainable_parameters)  # zeroed by the optimizer stepped
    run.optimizer.scaler = object()  # fp16's gradient scaler lives in the wrapper: then the wrapper is stepped
    assert stepped_optimizer(run.optimizer) is run.optimizer


def test_gradients_are_clipped_by_torch_itself_unless_a_gradient_scaler_must_unscale_them_first(tiny_config):
    """accelerate's clip_grad_norm_ cost tiny-world's CPU step 0.1 ms more than torch's (benchmarks/README.md,
    Speed): torch's clips where accelerate adds nothing, and still clips."""
    from lora_db.training.optimizers import gradient_clipper

    run = setup(tiny_config())
    assert run.clip_gradients is torch.nn.utils.clip_grad_norm_
    micro_batch_loss(run, 0).backward()
    run.clip_gradients(run.trainable_parameters, 1e-6)
    grads = [p.grad for p in run.trainable_parameters if p.grad is not None]
    assert grads and float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 1.001e-6
    run.accelerator.scaler = object()  # fp16: accelerate unscales the gradients before it clips them
    assert gradient_clipper(run.accelerator) == run.accelerator.clip_grad_norm_


@pytest.mark.parametrize("validation", [False, True])
def test_cached_latents_release_the_vae_and_image_encoder(tiny_config, validation):
    prompt = "a photo of sks robot" if validation else None
    run = setup(tiny_config(cache_latents=True, validation_prompt=prompt))
    # Dropped when nothing samples later; kept off the device (here: the CPU itself) when validation needs them.
    expected = "cpu" if validation else "meta"
    for component in ("vae", "image_encoder", "text_encoder"):
        assert {p.device.type for p in getattr(run.models.pipe, component).parameters()} == {expected}, component
    assert all(source.cache is not None for source in run.sources)
    optimizer_step(run, 0)  # the loop needs none of them


def test_class_images_are_generated_once_and_reused(tiny_config, tmp_path):
    class_dir = tmp_path / "class"
    options = {"class_prompt": "a photo of a robot", "class_dir": class_dir, "num_class_images": 3}
    train(tiny_config(output_dir=tmp_path / "a", max_train_steps=2, class_generation_steps=2, **options))
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 3
    stamps = [p.stat().st_mtime_ns for p in images]
    train(tiny_config(output_dir=tmp_path / "b", max_train_steps=2, class_generation_steps=2, **options))
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps


def test_every_process_restores_its_own_rng_row():
    """A checkpoint holds one row of RNG state per process; rank 1's row must restore rank 1's generators
    exactly (a view of that row was refused by torch, so no multi-process run could resume)."""
    from lora_db.training.checkpoint import restore_rng_state

    states = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 10)
        states.append({"noise": generator.get_state(), "torch": torch.get_rng_state()})
    gathered = {name: torch.stack([state[name] for state in states]) for name in ("noise", "torch")}
    for rank, state in enumerate(states):
        generator = torch.Generator()
        restore_rng_state(gathered, generator, rank)
        assert torch.equal(generator.get_state(), state["noise"]) and torch.equal(torch.get_rng_state(), state["torch"])


def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path):
    options = {
        "max_train_steps": 8,
        "checkpointing_steps": 4,
        "gradient_accumulation_steps": 2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "lora_dropout": 0.1,
        "uncond_prob": 0.3,
        "random_flip": True,
        "optimizer": "adamw8bit",
        "train_text_encoder": True,
    }
    full = tmp_path / "full"
    train(tiny_config(output_dir=full, **options))
    expected = metrics(full)

    # An interrupted run: everything after the step-4 checkpoint is lost.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-4", interrupted / "checkpoint-4")
    (interrupted / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:5]))
    result = train(tiny_config(output_dir=interrupted, resume_from_checkpoint="latest", **options))
    resumed = metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    with safe_open(str(result.adapter_path), "pt") as a, safe_open(str(full / "adapter.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_resuming_with_another_process_count_continues_and_says_what_differs(tiny_config, tmp_path, caplog):
    """A checkpoint two processes wrote, resumed by one: that process takes its own (rank 0) row and the run
    continues, with one warning; a process without a row seeds itself instead of failing."""
    import logging

    from safetensors.torch import load_file, save_file

    from lora_db.training.checkpoint import restore_rng_state

    options = {"max_train_steps": 6, "checkpointing_steps": 3, "lora_dropout": 0.1}
    full = tmp_path / "full"
    train(tiny_config(output_dir=full, **options))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(full)[:3]))
    rng_file = resumed / "checkpoint-3" / "rng.safetensors"
    rng = load_file(str(rng_file))
    save_file({name: torch.cat([rows, rows.flip(-1)]) for name, rows in rng.items()}, str(rng_file))  # 2 rows
    with caplog.at_level(logging.WARNING, logger="lora_db"):
        train(tiny_config(output_dir=resumed, resume_from_checkpoint="latest", **options))
    assert "written by 2 process(es), resumed by 1" in caplog.text
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(full)]  # rank 0's row, as before

    generators = []
    for rank in (1, 2):  # more processes than rows: seeded by rank, not refused
        generator = torch.Generator()
        restore_rng_state(rng, generator, rank, reseed=5)
        generators.append(generator.get_state())
    assert not torch.equal(*generators)


def test_checkpoint_pruning_keeps_the_newest(tiny_config):
    config = tiny_config(max_train_steps=10, checkpointing_steps=2, checkpoints_total_limit=2)
    train(config)
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["checkpoint-8", "checkpoint-10"]


def test_an_output_folder_holding_a_run_is_refused(tiny_config):
    config = tiny_config(max_train_steps=1)
    train(config)
    (config.output_dir / "notes.txt").write_text("mine")
    with pytest.raises(LoraDBError, match="already holds a run"):
        train(config)
    train(tiny_config(max_train_steps=1, overwrite=True))
    assert (config.output_dir / "notes.txt").read_text() == "mine"


def test_resolution_other_than_native_is_refused(tiny_config):
    with pytest.raises(LoraDBError, match="use --resolution 64"):
        train(tiny_config(resolution=128))


def test_unknown_target_module_lists_the_available_ones(tiny_config):
    with pytest.raises(LoraDBError, match=r"no linear layer named to_x.*available: .*to_q"):
        train(tiny_config(target_modules=["to_x"]))


def test_feed_forward_targets(tiny_config):
    result = train(tiny_config(max_train_steps=2, target_modules=["to_q", "ff.net.0.proj", "ff.net.2"]))
    keys = read_adapter(result.adapter_path).tensors["unet"]
    assert any("ff.net.2.lora_A" in k for k in keys) and not any("to_k" in k for k in keys)


def test_full_fine_tuning_writes_a_unet_folder(tiny_config):
    result = train(tiny_config(method="full", max_train_steps=3, learning_rate=1e-4))
    from diffusers import UniDiffuserModel

    unet = UniDiffuserModel.from_pretrained(result.output_dir / "unet")
    assert sum(p.numel() for p in unet.parameters()) > 50_000


def test_batch_indices_cover_every_item_once_per_epoch_and_split_across_processes():
    seen = [batch_indices(5, 1, step, seed=3) for step in range(5)]
    assert sorted(index for ((epoch, index),) in seen) == list(range(5))
    rank0 = batch_indices(6, 2, 0, seed=1, rank=0, world_size=2)
    rank1 = batch_indices(6, 2, 0, seed=1, rank=1, world_size=2)
    assert not {i for _, i in rank0} & {i for _, i in rank1}
    assert batch_indices(6, 2, 7, seed=1) == batch_indices(6, 2, 7, seed=1)


def test_fp16_loss_scale_and_growth_tracker_survive_a_checkpoint(tmp_path):
    from types import SimpleNamespace

    from lora_db.training.checkpoint import (
        TrainingState,
        load_checkpoint,
        restore_scaler,
        save_checkpoint,
        scaler_state,
    )

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    for gradient in (float("inf"), 1.0, 1.0):  # one overflow halves the scale, two good steps count towards growth
        optimizer.zero_grad()
        scaler.scale((weight * gradient).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    state = scaler_state(SimpleNamespace(scaler=scaler))
    assert state["scale"] == 2.0**9 and state["_growth_tracker"] == 2

    path = save_checkpoint(tmp_path, TrainingState(3, {"w": weight.detach()}, optimizer.state_dict(), {}, {}, state))
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=5)
    restore_scaler(load_checkpoint(path).scaler, SimpleNamespace(scaler=resumed), path)
    assert resumed.state_dict() == scaler.state_dict()
