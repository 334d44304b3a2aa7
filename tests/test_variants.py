"""DoRA, rsLoRA and LoRA+ (peft does the math), --init-adapter, and the loss options min-SNR and noise offset.

Every path that applies an adapter must agree with peft's own forward for every variant: hot-swap (peft's
`set_scale`), merge into the base (DoRA's magnitude included), `--combine` / `--into-adapter` (DoRA refused).
"""

import copy
import math

import pytest
import torch
from lora_helpers import assert_close, assert_one_line_error, make_variant_adapter, run_cli, uvit_and_text_outputs

from lora_db.adapters.format import read_adapter, save_adapter
from lora_db.adapters.hotswap import AdapterSet, lora_layers
from lora_db.adapters.layers import lora_scale, lora_state_dict
from lora_db.adapters.merge import combine_adapters, fold_adapters
from lora_db.errors import LoraDBError
from lora_db.models.objective import dreambooth_loss, min_snr_weights
from lora_db.models.random import build_random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora+rslora": {"use_dora": True, "use_rslora": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hot_swap_and_merge_match_peft_forward(variant, pristine, tmp_path):
    path = make_variant_adapter(pristine, tmp_path / f"{variant}.safetensors", seed=3, **VARIANTS[variant])
    adapter = read_adapter(path)
    assert adapter.specs["unet"].variant == {"lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA"}.get(
        variant, "DoRA + rsLoRA"
    )
    swap = AdapterSet(copy.deepcopy(pristine))
    name = swap.load(adapter)
    base = uvit_and_text_outputs(pristine)
    for weight in (1.0, 0.6):
        swap.activate({name: weight})
        for component in ("unet", "text_encoder"):
            for layer in lora_layers(getattr(swap.pipe, component)):
                # peft's set_scale and lora-db's lora_scale are one definition of the scale
                assert math.isclose(layer.scaling[name], lora_scale(adapter.specs[component], weight), rel_tol=1e-12)
        swapped = uvit_and_text_outputs(swap.pipe)
        merged_pipe = copy.deepcopy(pristine)
        fold_adapters(merged_pipe, [(adapter, weight)])
        assert_close(uvit_and_text_outputs(merged_pipe), swapped)
        assert min((swapped[i] - base[i]).abs().max() for i in range(3)) > 1e-3  # both components change it
    swap.activate({})
    assert_close(uvit_and_text_outputs(swap.pipe), base, atol=0)


def test_merge_uses_the_dora_magnitude(pristine, tmp_path):
    """A fold that ignored the magnitude (plain LoRA delta) would miss peft's DoRA forward."""
    dora = read_adapter(make_variant_adapter(pristine, tmp_path / "d.safetensors", seed=4, use_dora=True))
    plain = read_adapter(make_variant_adapter(pristine, tmp_path / "p.safetensors", seed=4))
    merged_dora, merged_plain = copy.deepcopy(pristine), copy.deepcopy(pristine)
    fold_adapters(merged_dora, [(dora, 1.0)])
    fold_adapters(merged_plain, [(plain, 1.0)])
    difference = (uvit_and_text_outputs(merged_dora)[1] - uvit_and_text_outputs(merged_plain)[1]).abs().max()
    assert difference > 1e-3


def test_dora_is_never_summed_with_other_adapters(pristine, tmp_path, monkeypatch, capsys):
    dora = make_variant_adapter(pristine, tmp_path / "dora.safetensors", seed=5, use_dora=True)
    plain = make_variant_adapter(pristine, tmp_path / "plain.safetensors", seed=6, use_rslora=True)
    files = [read_adapter(dora), read_adapter(plain)]
    swap = AdapterSet(copy.deepcopy(pristine))
    names = [swap.load(f) for f in files]
    with pytest.raises(LoraDBError, match="DoRA adapter, which cannot be combined"):
        swap.activate(dict.fromkeys(names, 0.5))
    with pytest.raises(LoraDBError, match="DoRA adapter, which cannot be combined"):
        fold_adapters(copy.deepcopy(pristine), [(f, 0.5) for f in files])
    with pytest.raises(LoraDBError, match="DoRA adapter"):
        combine_adapters([(files[0], 1.0)])
    into = run_cli(
        monkeypatch,
        capsys,
        "merge",
        "--adapter",
        dora,
        "--adapter",
        plain,
        "--into-adapter",
        tmp_path / "x.safetensors",
    )
    assert_one_line_error(into, "DoRA adapter", "merge it with --out instead")
    out = tmp_path / "samples"
    combine = run_cli(
        monkeypatch, capsys, "sample", "--adapter", dora, "--adapter", plain, "--combine", "--prompt", "p", "--out", out
    )
    assert_one_line_error(combine, "DoRA adapter", "apply it alone")
    assert not out.exists()


def test_rslora_adapters_combine_exactly(pristine, tmp_path):
    files = [
        read_adapter(make_variant_adapter(pristine, tmp_path / f"{i}.safetensors", seed=i, use_rslora=rs))
        for i, rs in ((7, True), (8, False))
    ]
    combined = combine_adapters([(files[0], 0.7), (files[1], 0.4)])
    path = save_adapter(tmp_path / "both.safetensors", combined.tensors, combined.specs, {"base_model": "tiny"})
    expected, actual = copy.deepcopy(pristine), copy.deepcopy(pristine)
    fold_adapters(expected, [(files[0], 0.7), (files[1], 0.4)])
    fold_adapters(actual, [(read_adapter(path), 1.0)])
    assert_close(uvit_and_text_outputs(actual), uvit_and_text_outputs(expected))


def test_damaged_dora_files_are_refused(pristine, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = make_variant_adapter(pristine, tmp_path / "d.safetensors", seed=9, use_dora=True, text_encoder=False)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    without = {k: v for k, v in tensors.items() if k != key}
    save_file(without, str(tmp_path / "missing.safetensors"), metadata=metadata)
    swap = AdapterSet(copy.deepcopy(pristine))
    with pytest.raises(LoraDBError, match="has no DoRA magnitude"):
        swap.load(tmp_path / "missing.safetensors")
    plain_meta = dict(
        metadata,
        **{"lora_db.components": metadata["lora_db.components"].replace('"use_dora": true', '"use_dora": false')},
    )
    save_file(tensors, str(tmp_path / "lying.safetensors"), metadata=plain_meta)
    with pytest.raises(LoraDBError, match="DoRA magnitude but the metadata says plain LoRA"):
        read_adapter(tmp_path / "lying.safetensors")
    save_file(dict(tensors, **{key: tensors[key][:-1]}), str(tmp_path / "short.safetensors"), metadata=metadata)
    with pytest.raises(LoraDBError, match="DoRA magnitude has 31 values for 32 output features"):
        swap.load(tmp_path / "short.safetensors")


# -- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor", "lion8bit", "schedulefree-adamw"])
def test_loraplus_puts_b_matrices_at_ratio_times_the_rate(tiny_config, optimizer):
    from lora_db.training.optimizers import setup_optimizer
    from lora_db.training.setup import setup_models

    config = tiny_config(
        loraplus_lr_ratio=16.0,
        optimizer=optimizer,
        use_dora=True,
        train_text_encoder=True,
        text_encoder_learning_rate=1e-3,
    )
    models = setup_models(config, build_random_pipeline("tiny"), torch.float32, torch.device("cpu"))
    optimizer_, _ = setup_optimizer(config, models)
    rate = {id(p): g["lr"] for g in optimizer_.param_groups for p in g["params"]}
    for component, base in (("unet", config.learning_rate), ("text_encoder", 1e-3)):
        for name, param in models.trained[component].named_parameters():
            if not param.requires_grad:
                continue
            expected = base * 16 if ("lora_B" in name or "magnitude" in name) else base
            assert rate[id(param)] == pytest.approx(expected), name
    trainable = [p for m in models.trained.values() for p in m.parameters() if p.requires_grad]
    assert len(rate) == len(trainable)


def test_training_with_every_variant_and_loss_option_then_continuing_it(tiny_config, tmp_path):
    from lora_db.training.loop import train
    from lora_db.training.setup import setup_models

    options = {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 4.0, "snr_gamma": 5.0}
    first = train(tiny_config(max_train_steps=2, train_text_encoder=True, noise_offset=0.1, **options))
    assert all(math.isfinite(loss) for loss in first.losses)
    adapter = read_adapter(first.adapter_path)
    assert adapter.specs["unet"].use_dora and adapter.specs["text_encoder"].use_rslora
    assert any(k.endswith("lora_magnitude_vector") for k in adapter.tensors["unet"])

    config = tiny_config(
        init_adapter=first.adapter_path, train_text_encoder=True, output_dir=tmp_path / "two", **options
    )
    models = setup_models(config, build_random_pipeline("tiny"), torch.float32, torch.device("cpu"))
    for component, module in models.trained.items():
        state = lora_state_dict(module)
        assert state.keys() == adapter.tensors[component].keys()
        for key, tensor in state.items():
            torch.testing.assert_close(tensor, adapter.tensors[component][key], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"rank": 8}, "has rank 4, this run 8; pass --rank 4"),
        ({"use_dora": False}, "pass --use-dora"),
        ({"target_modules": ["to_q"]}, "pass --target-modules to_q,to_k,to_v,to_out.0"),
        ({"train_text_encoder": False}, "add --train-text-encoder"),
    ],
)
def test_init_adapter_mismatches_are_named(options, fragment, tiny_config, pristine, tmp_path):
    from lora_db.training.setup import setup_models

    path = make_variant_adapter(pristine, tmp_path / "init.safetensors", seed=10, use_dora=True)
    values = {"init_adapter": path, "use_dora": True, "alpha": 8.0, "train_text_encoder": True} | options
    config = tiny_config(**values)
    with pytest.raises(LoraDBError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        setup_models(config, copy.deepcopy(pristine), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"method": "full", "use_dora": True}, "--use-dora is a LoRA option"),
        ({"loraplus_lr_ratio": 0.0}, "--loraplus-lr-ratio must be a positive"),
        ({"snr_gamma": float("nan")}, "--snr-gamma must be a positive"),
        ({"noise_offset": -0.1}, "--noise-offset must be a finite number of at least 0"),
    ],
)
def test_bad_variant_and_loss_options(options, fragment, tiny_config):
    with pytest.raises(LoraDBError, match=fragment):
        tiny_config(**options)


# -- loss options ---------------------------------------------------------------------------------------------------


def zero_unet(latents, clip, prompt, **kwargs):
    """Predicts zero noise: the loss is then the mean square of the target noise itself."""
    return torch.zeros_like(latents), torch.zeros_like(clip), prompt


def test_min_snr_weights_follow_the_schedule(pristine):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pristine.scheduler.config)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), torch.clamp(snr, max=5.0) / snr)
    latents, clip, prompt = torch.randn(5, 4, 8, 8), torch.randn(5, 1, 16), torch.randn(5, 77, 8)

    def loss(**options):
        generator = torch.Generator().manual_seed(0)
        return dreambooth_loss(zero_unet, latents, clip, prompt, scheduler, generator, timesteps=timesteps, **options)

    torch.testing.assert_close(loss(snr_gamma=5.0), loss() * min_snr_weights(scheduler, timesteps, 5.0))
    assert loss(snr_gamma=5.0)[-1] == loss()[-1]  # SNR < gamma at t=999: weight 1


def test_noise_offset_shifts_only_the_latent_noise_per_channel(pristine):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pristine.scheduler.config)
    batch = 256
    latents, clip, prompt = torch.zeros(batch, 4, 8, 8), torch.zeros(batch, 1, 64), torch.randn(batch, 77, 8)
    timesteps = torch.full((batch,), 500)

    def loss(offset):
        generator = torch.Generator().manual_seed(0)
        return dreambooth_loss(
            zero_unet, latents, clip, prompt, scheduler, generator, timesteps=timesteps, noise_offset=offset
        ).mean()

    # target noise: latent part (256 of 320 values per example) gains offset^2 of variance, CLIP part none
    assert float(loss(0.0)) == pytest.approx(1.0, abs=0.02)
    assert float(loss(1.0)) == pytest.approx(1.0 + 256 / 320, abs=0.1)


@pytest.mark.slow
def test_resume_with_dora_loraplus_and_loss_options_reproduces_the_run(tiny_config, tmp_path):
    import json
    import shutil

    from lora_db.training.loop import train

    options = {
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "use_dora": True,
        "use_rslora": True,
        "loraplus_lr_ratio": 8.0,
        "optimizer": "adamw8bit",
        "snr_gamma": 5.0,
        "noise_offset": 0.1,
        "train_text_encoder": True,
        "report_to": "none",
    }
    full = train(tiny_config(output_dir=tmp_path / "full", **options))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full.output_dir / "checkpoint-2", interrupted / "checkpoint-2")
    resumed = train(tiny_config(output_dir=interrupted, resume_from_checkpoint="latest", **options))
    assert resumed.losses == full.losses[2:]
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 4]
    expected, actual = read_adapter(full.adapter_path).tensors, read_adapter(resumed.adapter_path).tensors
    for component, part in expected.items():
        assert actual[component].keys() == part.keys()
        assert all(torch.equal(actual[component][key], tensor) for key, tensor in part.items())


def test_estimate_takes_the_variant_options(pristine, tiny_config, tmp_path):
    from lora_db.training.estimate import estimate_memory

    init = make_variant_adapter(pristine, tmp_path / "init.safetensors", seed=12, use_dora=True, text_encoder=False)
    options = {"use_dora": True, "alpha": 8.0, "loraplus_lr_ratio": 16.0, "snr_gamma": 5.0, "noise_offset": 0.1}
    estimate = estimate_memory(tiny_config(init_adapter=init, **options), device="cpu")
    plain = estimate_memory(tiny_config(), device="cpu")
    magnitudes = sum(p.numel() for k, p in read_adapter(init).tensors["unet"].items() if "magnitude" in k)
    assert estimate.trainable_parameters == plain.trainable_parameters + magnitudes  # one per output feature
