"""--adapter-type lokr | loha (peft's LyCORIS adapters): trained, hot-swapped, merged, exported, described and
estimated like LoRA; the update lora-db computes for a merge is peft's own; resume is exact."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from lora_helpers import t2i
from resume_helpers import assert_resumed_exactly, run_and_resume

from lora_db.adapters.format import describe_adapter, export_peft, read_adapter
from lora_db.adapters.hotswap import AdapterSet
from lora_db.adapters.kinds import update
from lora_db.adapters.layers import inject_lora, lycoris_modules
from lora_db.adapters.merge import combine_adapters, fold_adapters
from lora_db.adapters.spec import LoraSpec
from lora_db.config.train import UNET_ATTENTION_TARGETS, TrainConfig
from lora_db.errors import LoraDBError

MERGE_ATOL = 1e-5
KINDS = ("lokr", "loha")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("kind", "rank", "width"),
    [("lokr", 4, 32), ("lokr", 2, 64), ("loha", 4, 32)],  # lokr rank 2 of 64: low-rank w2 factors, not full ones
)
def test_the_update_merge_adds_is_peft_own(kind, rank, width):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = torch.nn.Sequential(torch.nn.Linear(width, 48))
    spec = LoraSpec(rank, 3.0, ("0",), kind=kind)
    inject_lora(model, spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    layer.set_scale("default", 0.6)
    from lora_db.adapters.layers import lora_state_dict

    tensors = {key.rpartition(".")[2]: t for key, t in lora_state_dict(model).items()}
    expected = layer.get_delta_weight("default")
    torch.testing.assert_close(update(tensors, kind, 0.6 * spec.scale), expected, rtol=1e-6, atol=1e-6)
    assert expected.abs().max() > 1e-2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, instance_dir):
    """A LoKr and a LoHa run on the tiny model, U-ViT and text encoder, alpha != rank."""
    from lora_db.training.loop import train

    runs = {}
    for kind in KINDS:
        config = TrainConfig(
            model="tiny",
            instance_dir=instance_dir,
            instance_prompt="a photo of sks robot",
            output_dir=tmp_path_factory.mktemp(kind),
            adapter_type=kind,
            rank=4,
            alpha=8.0,
            train_text_encoder=True,
            max_train_steps=4,
            learning_rate=2e-2,
        )
        runs[kind] = train(config).adapter_path
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_training_writes_the_kind_and_info_describes_it(trained, kind):
    adapter = read_adapter(trained[kind])
    assert {spec.kind for spec in adapter.specs.values()} == {kind}
    info = describe_adapter(adapter)
    assert info["components"]["unet"]["variant"] == {"lokr": "LoKr", "loha": "LoHa"}[kind]
    assert info["components"]["unet"]["layers"] == 20  # 5 blocks x 4 attention projections
    names = {key.rpartition(".")[2] for key in adapter.tensors["unet"]}
    assert names == ({"lokr_w1", "lokr_w2"} if kind == "lokr" else {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    # The zero-initialised factor learned: the adapter changes the model.
    assert any(t.abs().max() > 0 for key, t in adapter.tensors["unet"].items() if key.endswith(("w1", "w2_b")))


@pytest.mark.parametrize("kind", KINDS)
def test_hot_swap_scales_as_merge_does(pristine, trained, kind):
    """At weight 0.5, peft's set_scale in hot-swap and lora-db's update in merge agree (weight 1 against training's
    own forward: test_merge.py)."""
    swap = AdapterSet(copy.deepcopy(pristine))
    swap.activate({swap.load(trained[kind]): 0.5})
    half = copy.deepcopy(pristine)
    fold_adapters(half, [(read_adapter(trained[kind]), 0.5)])
    expected = t2i(swap.pipe)
    np.testing.assert_allclose(t2i(half), expected, atol=MERGE_ATOL)
    assert np.abs(expected - t2i(pristine)).max() > 100 * MERGE_ATOL


def test_adapters_of_two_kinds_sum_in_a_merge_but_not_in_one_layer(pristine, trained):
    lokr, loha = read_adapter(trained["lokr"]), read_adapter(trained["loha"])
    swap = AdapterSet(copy.deepcopy(pristine))
    swap.load(lokr)
    with pytest.raises(LoraDBError, match="two kinds into one layer"):
        swap.load(loha)
    pipe = copy.deepcopy(pristine)
    fold_adapters(pipe, [(lokr, 1.0), (loha, -0.5)])
    layer = "transformer.transformer_in_blocks.0.attn1.to_q"
    change = pipe.unet.get_submodule(layer).weight - pristine.unet.get_submodule(layer).weight
    expected = update(lycoris_modules(lokr, "unet")[layer], "lokr", 2.0) - 0.5 * update(
        lycoris_modules(loha, "unet")[layer], "loha", 2.0
    )
    torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraDBError, match="is a LoKr adapter, whose update is no B @ A product"):
        combine_adapters([(lokr, 1.0)])


@pytest.mark.parametrize("kind", KINDS)
def test_export_is_a_peft_folder_stock_peft_loads(pristine, trained, tmp_path, kind):
    from peft import PeftModel

    adapter = read_adapter(trained[kind])
    folders = export_peft(trained[kind], tmp_path / "peft")
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    assert config["peft_type"] == kind.upper() and config["r"] == 4 and config["alpha"] == 8.0
    back = read_adapter(tmp_path / "peft")
    for component, spec in adapter.specs.items():
        found = back.specs[component]
        assert (found.kind, found.rank, found.alpha, set(found.target_modules)) == (
            kind,
            spec.rank,
            spec.alpha,
            set(spec.target_modules),
        )
    for component, part in adapter.tensors.items():
        assert all(torch.equal(part[key], back.tensors[component][key]) for key in part)

    stock = PeftModel.from_pretrained(copy.deepcopy(pristine.unet), str(tmp_path / "peft" / "unet"))
    ours = AdapterSet(copy.deepcopy(pristine))
    ours.activate({ours.load(adapter): 1.0})
    generator = torch.Generator().manual_seed(0)
    size = pristine.unet.config.sample_size
    latents = torch.randn((1, pristine.num_channels_latents, size, size), generator=generator)
    clip = torch.randn((1, 1, pristine.image_encoder_projection_dim), generator=generator)
    text = torch.randn((1, 77, pristine.unet.config.text_dim), generator=generator)
    with torch.no_grad():
        a = stock(latents, clip, text, timestep_img=500, timestep_text=0, data_type=1)[0]
        b = ours.pipe.unet(latents, clip, text, timestep_img=500, timestep_text=0, data_type=1)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_counts_the_adapters_parameters(trained, kind):
    from lora_db.training.estimate import estimate_memory

    estimate = estimate_memory(TrainConfig(model="tiny", adapter_type=kind, rank=4, train_text_encoder=True), "cpu")
    assert estimate.trainable_parameters == read_adapter(trained[kind]).num_parameters()
    unet = estimate.components["unet"]
    assert unet.gradients == 4 * sum(t.numel() for t in read_adapter(trained[kind]).tensors["unet"].values())


@pytest.mark.parametrize("kind", KINDS)
def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path, kind):
    options = {"adapter_type": kind, "max_train_steps": 6, "checkpointing_steps": 3, "train_text_encoder": True}
    from lora_db.training.loop import train

    full, interrupted = run_and_resume(tiny_config, tmp_path, 3, **options)
    assert_resumed_exactly(full, interrupted, 3)
    other = "loha" if kind == "lokr" else "lokr"
    with pytest.raises(LoraDBError, match=rf"--adapter-type {other} \(the checkpoint has {kind}\)"):
        train(tiny_config(output_dir=full, resume_from_checkpoint="latest", **{**options, "adapter_type": other}))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "--use-dora is a LoRA option"),
        ({"loraplus_lr_ratio": 4.0}, "--loraplus-lr-ratio is a LoRA option"),
        ({"lora_dropout": 0.1}, "--lora-dropout is a LoRA option"),
        ({"quantize_base": "nf4", "mixed_precision": "bf16"}, "do not run on a quantized base"),
        ({"method": "full"}, "--adapter-type lokr is an adapter"),
    ],
)
def test_lora_only_options_are_refused(options, message):
    with pytest.raises(LoraDBError, match=message):
        TrainConfig(model="tiny", adapter_type="lokr", **options)


def test_init_adapter_of_another_kind_is_refused(trained, tiny_config):
    from lora_db.training.loop import train

    with pytest.raises(LoraDBError, match="has kind lokr, this run lora; pass --adapter-type lokr"):
        train(tiny_config(init_adapter=trained["lokr"], train_text_encoder=True, max_train_steps=1))


def test_lokr_on_the_real_size_attention_uses_low_rank_factors():
    """At 1536 features and rank 8, LoKr's large factor is two rank-8 matrices (w2_a, w2_b), as LyCORIS does."""
    model = torch.nn.Sequential(torch.nn.Linear(1536, 1536))
    inject_lora(model, LoraSpec(8, 8.0, ("0",), kind="lokr"))
    names = {name.rpartition(".")[0].rpartition(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert names == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert UNET_ATTENTION_TARGETS  # the targets LoKr takes by default are LoRA's
