"""`lora-db export --format peft`: folders peft's own loaders apply exactly as lora-db does, and read back."""

import copy
import json

import pytest
import torch
from lora_helpers import assert_close, assert_one_line_error, make_variant_adapter, run_cli, uvit_and_text_outputs
from safetensors.torch import load_file

from lora_db.adapters.format import export_peft, read_adapter
from lora_db.adapters.hotswap import AdapterSet
from lora_db.errors import LoraDBError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(pristine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    source = make_variant_adapter(pristine, folder / "a.safetensors", seed=11, use_dora=True, use_rslora=True)
    export_peft(source, folder / "peft")
    return source, folder / "peft"


def lora_db_outputs(pipe, adapter) -> list[torch.Tensor]:
    swap = AdapterSet(copy.deepcopy(pipe))
    swap.activate({swap.load(adapter): 1.0})
    return uvit_and_text_outputs(swap.pipe)


def test_peft_from_pretrained_applies_the_export_like_lora_db(pristine, exported):
    from peft import PeftModel

    source, folder = exported
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pipe = copy.deepcopy(pristine)
    for component in ("unet", "text_encoder"):
        wrapped = PeftModel.from_pretrained(getattr(pipe, component), str(folder / component))
        setattr(pipe, component, wrapped.base_model.model)  # PeftModel injects into the module it wraps
    expected = lora_db_outputs(pristine, source)
    assert_close(uvit_and_text_outputs(pipe), expected)
    base = uvit_and_text_outputs(pristine)
    assert min((expected[i] - base[i]).abs().max() for i in range(3)) > 1e-3  # both components do change it


def test_inject_adapter_in_model_loads_the_export(pristine, exported):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    source, folder = exported
    pipe = copy.deepcopy(pristine)
    for component in ("unet", "text_encoder"):
        config = LoraConfig.from_pretrained(str(folder / component))
        assert config.use_dora and config.use_rslora
        module = inject_adapter_in_model(config, getattr(pipe, component))
        result = set_peft_model_state_dict(module, load_file(str(folder / component / "adapter_model.safetensors")))
        assert not result.unexpected_keys
    assert_close(uvit_and_text_outputs(pipe), lora_db_outputs(pristine, source))


def test_lora_db_reads_the_folder_back_exactly(pristine, exported, monkeypatch, capsys):
    source, folder = exported
    original, again = read_adapter(source), read_adapter(folder)
    assert again.metadata["base_model"] == "tiny" and again.metadata["instance_prompt"] == "p"
    for component, spec in original.specs.items():
        back = again.specs[component]
        assert (back.rank, back.alpha, back.use_dora, back.use_rslora) == (spec.rank, spec.alpha, True, True)
        assert set(back.target_modules) == set(spec.target_modules)
        assert again.tensors[component].keys() == original.tensors[component].keys()
        for key, tensor in original.tensors[component].items():
            assert torch.equal(again.tensors[component][key], tensor)
    assert_close(lora_db_outputs(pristine, folder), lora_db_outputs(pristine, source), atol=0)
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", folder)
    assert code == 0 and "DoRA + rsLoRA" in stdout


def test_export_command_and_its_refusals(exported, tmp_path, monkeypatch, capsys):
    source, _ = exported
    out = tmp_path / "peft"
    code, stdout, _ = run_cli(monkeypatch, capsys, "export", source, "--format", "peft", out)
    assert code == 0 and f"peft: {out / 'unet'}" in stdout
    assert_one_line_error(run_cli(monkeypatch, capsys, "export", source, out), "already exists", "--overwrite")
    assert run_cli(monkeypatch, capsys, "export", source, out, "--overwrite")[0] == 0
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("x")
    assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", source, foreign, "--overwrite"), "lora-db did not write"
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"rank_pattern": {"to_q": 8}}, r"rank_pattern \(per-layer ranks\) cannot be applied exactly"),
        ({"bias": "all"}, "trained biases cannot be applied exactly"),
        ({"target_modules": ".*to_q"}, "target_modules must be a list"),
        ({"peft_type": "IA3"}, "a IA3 adapter; lora-db applies LoRA .and DoRA., LoKr and LoHa only"),
    ],
)
def test_peft_folders_lora_db_cannot_apply_exactly_are_refused(change, fragment, exported, tmp_path):
    import shutil

    _, folder = exported
    copy_ = tmp_path / "copy"
    shutil.copytree(folder / "unet", copy_)
    config = json.loads((copy_ / "adapter_config.json").read_text()) | change
    (copy_ / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraDBError, match=fragment):
        read_adapter(copy_)


def test_a_pickled_peft_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(LoraDBError, match=r"adapter_model\.bin is a pickle"):
        read_adapter(folder)
