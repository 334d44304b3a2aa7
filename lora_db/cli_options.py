"""Typer options generated from the config dataclasses, shared by `lora-db train` and `lora-db estimate`.

Each dataclass field becomes one option (`rank` -> `--rank`, booleans get `--x/--no-x`) with the field's help text
and default; the option's own default is None, so only what the user typed overrides a `--config` file.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from .config import TrainConfig, field_types, option_type


def _split_commas(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def help_with_default(f: dataclasses.Field) -> str:
    """The field's help text and its default, escaped so that typer's rich markup shows `[default: X]` as text."""
    from rich.markup import escape

    help_text = f.metadata.get("help", "")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None:
        return help_text
    if isinstance(default, bool):
        shown = "--" + ("" if default else "no-") + f.name.replace("_", "-")
    else:
        shown = ",".join(default) if isinstance(default, list) else str(default)
    return f"{help_text} {escape(f'[default: {shown}]')}"


def dataclass_options(cls: type) -> list[inspect.Parameter]:
    """One typer option per dataclass field, default None so only what the user typed overrides."""
    hints = field_types(cls)
    params = []
    for f in dataclasses.fields(cls):
        base, choices, _ = option_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        # Paths arrive as text: typer would turn "" into Path("."), the current folder, before any check saw it.
        annotation_type = list[str] if base is list else Literal[choices] if choices else str if base is Path else base
        option = typer.Option(
            *names,
            help=help_with_default(f),
            rich_help_panel=f.metadata.get("group"),
            show_default=False,
        )
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[annotation_type | None, option],
            )
        )
    return params


def with_dataclass_options(cls: type):
    """Give a command `fn(config_file, **values)` the options of `cls` (the single source of their help)."""

    def decorate(fn):
        own = [
            p
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        params = own + dataclass_options(cls)
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


def build_train_config(config_file: Path | None, values: dict[str, Any]) -> TrainConfig:
    values = dict(values)
    values["target_modules"] = _split_commas(values.get("target_modules"))
    return TrainConfig.from_sources(config_file, **values)


ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML file of options (same names); the command line wins.")
]
