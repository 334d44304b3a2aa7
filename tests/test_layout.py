"""The package's shape: every command keeps its options, each built from its config; the Python API runs a workflow.

`lint-imports` (run by .ci/run) holds the layering and the absence of import cycles; these tests hold the rest.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import click
import pytest
import typer.main
from lora_helpers import help_entries

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_db"
MAX_MODULE_LINES = 600


def command_params() -> dict[str, list[click.Parameter]]:
    from lora_db.cli import app

    group = typer.main.get_command(app)
    context = click.Context(group)
    return {name: group.get_command(context, name).params for name in group.list_commands(context)}


def test_every_option_the_commands_took_before_the_package_moved_is_still_taken():
    """tests/data/cli_options_before_layout.json: every command's parameters as the flat package declared them."""
    before = json.loads((Path(__file__).parent / "data" / "cli_options_before_layout.json").read_text())
    now = command_params()
    assert set(before) <= set(now)
    for command, params in before.items():
        taken = {(flag, p.param_type_name, bool(getattr(p, "hidden", False))) for p in now[command] for flag in p.opts}
        taken |= {(flag, p.param_type_name, False) for p in now[command] for flag in p.secondary_opts}
        for param in params:
            for flag in param["flags"]:
                assert (flag, param["kind"], param["hidden"]) in taken, f"lora-db {command}: {flag} is gone"


def test_every_visible_option_is_generated_from_a_config_field_with_its_help():
    """One generator: each command's visible parameters are exactly its config dataclasses' fields."""
    from lora_db.config.commands import (
        CaptionConfig,
        DemoConfig,
        DemoImagesConfig,
        ExportConfig,
        InfoConfig,
        MergeConfig,
        SampleConfig,
    )
    from lora_db.config.evaluate import EstimateConfig, EvalConfig
    from lora_db.config.fields import flag_name
    from lora_db.config.train import TrainConfig
    from lora_db.config.ui import UiConfig

    configs = {
        "train": [TrainConfig],
        "estimate": [EstimateConfig, TrainConfig],
        "sample": [SampleConfig],
        "merge": [MergeConfig],
        "eval": [EvalConfig],
        "info": [InfoConfig],
        "export": [ExportConfig],
        "demo-images": [DemoImagesConfig],
        "ui": [UiConfig],
        "demo": [DemoConfig],
        "caption": [CaptionConfig],
    }
    params = command_params()
    assert set(configs) == set(params)
    for command, classes in configs.items():
        fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
        visible = {p.name: p for p in params[command] if not getattr(p, "hidden", False) and p.name != "config_file"}
        assert set(visible) == set(fields), command
        for name, param in visible.items():
            field = fields[name]
            if field.metadata.get("argument"):
                assert param.param_type_name == "argument"
            else:
                assert "--" + flag_name(field) in param.opts
                assert param.help.startswith(field.metadata["help"]), (command, name)
                assert param.required == field.metadata.get("required", False), (command, name)


def test_help_shows_default_and_range_the_same_way_in_every_command(monkeypatch, capsys):
    from lora_db.cli import main

    for command, flag, shown in [
        ("train", "--rank", "[default: 4] [at least 1]"),
        ("sample", "--num-images", "[default: 1] [at least 1]"),
        ("eval", "--num-images", "[default: 4] [at least 2]"),
        ("demo-images", "--count", "[default: 5] [in [1, 10000]]"),
    ]:
        monkeypatch.setattr("sys.argv", ["lora-db", command, "--help"])
        with pytest.raises(SystemExit):
            main()
        entry = help_entries(capsys.readouterr().out).get(flag, "")
        assert shown in entry, (command, flag, entry)


def test_no_module_is_long_without_saying_why():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        if len(lines) > MAX_MODULE_LINES:
            assert "Long because" in doc, f"{path.relative_to(ROOT)}: {len(lines)} lines and no reason at its top"


def test_every_package_says_what_it_holds_and_exports_what_it_names():
    import importlib

    for init in PACKAGE.glob("*/__init__.py"):
        module = importlib.import_module(f"lora_db.{init.parent.name}")
        assert module.__doc__ and len(module.__doc__.strip().splitlines()) >= 2, init
        for name in getattr(module, "__all__", []):
            assert getattr(module, name) is not None


def test_no_package_name_hides_one_of_its_modules():
    """`from lora_db.adapters import sample` must be the module: a function of that name in __init__ would hide it
    (and break `monkeypatch.setattr(lora_db.adapters.sample, ...)`)."""
    import importlib
    import pkgutil

    for init in PACKAGE.glob("*/__init__.py"):
        package = importlib.import_module(f"lora_db.{init.parent.name}")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == "__main__":
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            assert getattr(package, info.name) is module, f"{package.__name__}.{info.name} is not the module"


@pytest.mark.slow
def test_the_python_api_runs_a_whole_workflow_on_the_tiny_model(tmp_path, one_thread):
    """README's notebook example: photos, train, sample, merge, evaluate and estimate from `import lora_db`."""
    from diffusers import UniDiffuserPipeline

    import lora_db
    from lora_db import (
        EvalConfig,
        MergeConfig,
        SampleConfig,
        TrainConfig,
        estimate_memory,
        evaluate,
        load_pipeline,
        make_demo_images,
        merge,
        read_adapter,
        sample,
        train,
    )

    assert set(lora_db.__all__) >= {"TrainConfig", "train", "sample", "merge", "evaluate", "estimate_memory"}
    make_demo_images(tmp_path / "photos", count=3, size=64)
    config = TrainConfig(
        model="tiny",
        instance_dir=tmp_path / "photos",
        instance_prompt="a photo of sks robot",
        output_dir=tmp_path / "run",
        max_train_steps=4,
        learning_rate=5e-3,
    )
    result = train(config)
    assert result.steps == 4 and len(result.losses) == 4
    adapter = read_adapter(result.adapter_path)
    assert adapter.specs["unet"].rank == config.rank

    samples = sample(
        SampleConfig(
            model="tiny",
            adapters=["none", str(result.adapter_path)],
            prompts=["a photo of sks robot"],
            out=tmp_path / "s",
        )
    )
    assert len(samples.images) == 2 and samples.grid.is_file()

    merged = merge(MergeConfig(adapters=[str(result.adapter_path)], out=tmp_path / "merged"))
    assert merged.layers > 0
    assert isinstance(UniDiffuserPipeline.from_pretrained(tmp_path / "merged"), UniDiffuserPipeline)

    scores = evaluate(
        EvalConfig(
            out=tmp_path / "eval",
            instance_dir=tmp_path / "photos",
            adapters=[str(result.adapter_path)],
            prompts=["a photo of sks robot"],
            num_images=2,
            num_inference_steps=2,
        )
    )
    assert len(scores.rows) == 2

    estimate = estimate_memory(TrainConfig(model="tiny"), device="cpu")
    assert estimate.peak_bytes > 0

    pipe = load_pipeline("tiny", adapters=[result.adapter_path])
    assert pipe.lora_adapters.names == ["run"]
