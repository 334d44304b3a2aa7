"""Pivotal tuning (--train-token sks --init-token robot): a new CLIP token whose input embedding trains with the
LoRA, saved in the adapter file and put back by sample (hot-swap), merge (a stock diffusers folder), eval of
checkpoints and export; resume is exact."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from lora_helpers import initial_latents, t2i
from processes import run as run_process
from resume_helpers import assert_resumed_exactly, run_and_resume
from safetensors.torch import load_file, save_file
from test_merge import MERGE_ATOL, STOCK_SCRIPT

from lora_db.adapters.format import export_peft, read_adapter
from lora_db.adapters.hotswap import AdapterSet
from lora_db.adapters.tokens import TokenEmbedding
from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = {"train_token": "sks", "init_token": "robot"}


def test_the_embedding_reads_the_table_below_the_vocabulary_and_trains_only_the_new_row():
    base = torch.nn.Embedding(10, 4).requires_grad_(False)
    embedding = TokenEmbedding(base, torch.ones(2, 4))
    ids = torch.tensor([[3, 10, 11, 9]])
    out = embedding(ids)
    assert torch.equal(out[0, 0], base.weight[3]) and torch.equal(out[0, 3], base.weight[9])
    assert torch.equal(out[0, 1], torch.ones(4))
    (out[0, 1] * torch.arange(4.0)).sum().backward()
    assert torch.equal(embedding.added.grad, torch.stack([torch.arange(4.0), torch.zeros(4)]))


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory, instance_dir):
    """Three steps of pivotal tuning with U-ViT LoRA, the run itself (for its own forward) and the adapter file."""
    from lora_db.training.loop import optimizer_step
    from lora_db.training.outputs import save_outputs
    from lora_db.training.setup import check_before_loading, setup_accelerator, setup_run

    config = TrainConfig(
        model="tiny",
        instance_dir=instance_dir,
        instance_prompt="a photo of sks robot",
        output_dir=tmp_path_factory.mktemp("pivotal"),
        learning_rate=5e-2,
        **TOKEN,
    )
    config = check_before_loading(config, torch.device("cpu"))
    run = setup_run(config, setup_accelerator(config))
    table = run.models.text_encoder.get_input_embeddings().base.weight.detach().clone()
    start = run.models.text_encoder.get_input_embeddings().added.detach().clone()
    for step in range(3):
        optimizer_step(run, step)
    path = save_outputs(config, run.models, 3)
    for module in run.models.trained.values():
        module.eval()
    return run, path, table, start


def test_the_adapter_holds_the_learned_token_and_the_vocabulary_is_untouched(pivotal, pristine):
    run, path, table, start = pivotal
    adapter = read_adapter(path)
    assert set(adapter.specs) == {"unet"} and list(adapter.tokens) == ["sks"]
    robot = pristine.text_encoder.get_input_embeddings().weight[
        pristine.clip_tokenizer("robot", add_special_tokens=False).input_ids
    ]
    torch.testing.assert_close(start[0], robot.mean(0))  # it started at the init token's embedding
    assert not torch.equal(adapter.tokens["sks"], start[0])  # and learned
    assert torch.equal(run.models.text_encoder.get_input_embeddings().base.weight, table)
    assert adapter.num_parameters() == sum(p.numel() for p in run.trainable_parameters)


@pytest.mark.slow
def test_hot_swap_and_merge_reproduce_the_trained_model(pivotal, pristine, tmp_path):
    run, path, _, _ = pivotal
    expected = t2i(run.models.pipe)
    swap = AdapterSet(copy.deepcopy(pristine))
    swap.activate({swap.load(path): 1.0})
    np.testing.assert_allclose(t2i(swap.pipe), expected, atol=MERGE_ATOL)
    assert np.abs(t2i(pristine) - expected).max() > 100 * MERGE_ATOL

    from lora_db.adapters.merge import merge
    from lora_db.config.commands import MergeConfig

    out = tmp_path / "merged"
    merge(MergeConfig(adapters=[str(path)], out=out, model="tiny"))
    vae, clip = initial_latents(pristine, seed=0)
    save_file({"vae": vae, "clip": clip}, str(tmp_path / "latents.safetensors"))
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    command = [sys.executable, "-I", str(script), str(out), str(tmp_path / "latents.safetensors")]
    run_process([*command, str(tmp_path / "stock.npy")], timeout=300, check=True)
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), expected, rtol=0, atol=MERGE_ATOL)


def test_info_lists_the_token(pivotal, monkeypatch, capsys):
    from lora_helpers import run_cli

    code, out, _ = run_cli(monkeypatch, capsys, "info", pivotal[1])
    assert code == 0 and "tokens        sks (pivotal tuning: their embeddings)" in out


def test_export_keeps_the_token_beside_the_peft_folders(pivotal, tmp_path):
    _, path, _, _ = pivotal
    export_peft(path, tmp_path / "peft")
    assert load_file(str(tmp_path / "peft" / "tokens.safetensors")).keys() == {"sks"}
    back = read_adapter(tmp_path / "peft")
    assert torch.equal(back.tokens["sks"], read_adapter(path).tokens["sks"])


def test_the_token_switches_with_its_adapter(pivotal, pristine, tmp_path):
    """While the adapter is off, the base (and any other adapter) reads "sks" as the base vocabulary splits it; two
    adapters that learned "sks" differently are refused only when both are on."""
    from lora_db.adapters.format import save_adapter

    _, path, _, _ = pivotal
    adapter = read_adapter(path)
    other = tmp_path / "other.safetensors"
    save_adapter(other, adapter.tensors, adapter.specs, adapter.metadata, {"sks": adapter.tokens["sks"] + 1})
    swap = AdapterSet(copy.deepcopy(pristine))
    first, second = swap.load(path), swap.load(other)
    base_ids = pristine.clip_tokenizer("a photo of sks robot").input_ids
    swap.activate({})
    assert swap.pipe.clip_tokenizer("a photo of sks robot").input_ids == base_ids
    np.testing.assert_array_equal(t2i(swap.pipe), t2i(pristine))
    swap.activate({first: 1.0})
    assert swap.pipe.clip_tokenizer("a photo of sks robot").input_ids != base_ids
    swap.activate({second: 1.0})
    with pytest.raises(LoraDBError, match="both learned the token 'sks', differently"):
        swap.activate({first: 1.0, second: 1.0})
    assert swap.active == {second: 1.0}  # a refused switch changes nothing


def test_resume_is_exact_and_checkpoints_are_evaluated_with_their_token(tiny_config, tmp_path):
    from lora_db.evaluation.evaluate import checkpoint_adapter

    options = {"max_train_steps": 6, "checkpointing_steps": 3, "train_text_encoder": True, **TOKEN}
    full, interrupted = run_and_resume(tiny_config, tmp_path, 3, **options)
    assert_resumed_exactly(full, interrupted, 3)
    a, b = read_adapter(interrupted / "adapter.safetensors"), read_adapter(full / "adapter.safetensors")
    assert torch.equal(a.tokens["sks"], b.tokens["sks"])
    assert set(a.specs) == {"unet", "text_encoder"}

    at_six = checkpoint_adapter(full / "checkpoint-6", json.loads((full / "config.json").read_text()))
    assert torch.equal(at_six.tokens["sks"], b.tokens["sks"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_token": "sks"}, "--train-token needs --init-token too"),
        ({"init_token": "toy"}, "--init-token needs --train-token too"),
        ({"train_token": "sks dog", "init_token": "dog"}, "--train-token 'sks dog' must be one word"),
        ({"train_token": "sks", "init_token": "toy", "method": "full"}, "--train-token is a LoRA option"),
    ],
)
def test_bad_token_options_are_refused_before_loading(options, message):
    with pytest.raises(LoraDBError, match=message):
        TrainConfig(model="tiny", **options)


def test_a_token_in_no_prompt_is_refused(tiny_config):
    from lora_db.training.loop import train

    with pytest.raises(LoraDBError, match="--train-token zwx is in no training prompt"):
        train(tiny_config(train_token="zwx", init_token="robot", max_train_steps=1))


def test_estimate_counts_the_token(pivotal):
    from lora_db.training.estimate import estimate_memory

    _, path, _, _ = pivotal
    estimate = estimate_memory(TrainConfig(model="tiny", **TOKEN), device="cpu")
    assert estimate.trainable_parameters == read_adapter(path).num_parameters()
    assert estimate.components["text_encoder"].gradients == 4 * 32  # one fp32 row of the 32-wide tiny table
