"""Typer options generated from the config dataclasses, shared by `lora-db train` and `lora-db estimate`.

Each dataclass field becomes one option (`rank` -> `--rank`, booleans get `--x/--no-x`) with the field's help text
and default; the option's own default is None, so only what the user typed overrides a `--config` file.
`lora-db train` and `estimate` also take diffusers' flag names as hidden options (lora_db/aliases.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from .aliases import REFUSED, RENAMED, REQUIRES, apply_aliases, check_required, underscore_aliases
from .config import TrainConfig, field_types, option_type

ALIAS_PREFIX = "alias__"


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


def alias_options(cls: type) -> list[inspect.Parameter]:
    """Hidden options for diffusers' flag names: renamed, underscore spellings, switches checked later, refused."""
    hints = field_types(cls)
    types = {f.name: option_type(hints[f.name]) for f in dataclasses.fields(cls)}
    is_bool = {name: base is bool for name, (base, _, _) in types.items()}
    flags: list[tuple[str, Any]] = []  # (flag, annotation of its value)
    for alias in (*RENAMED, *underscore_aliases(list(types), is_bool)):
        base, choices, _ = types[alias.field]
        if alias.switch_value is not None:
            flags.append((alias.flag, bool))
        else:
            flags.append((alias.flag, list[str] if base is list else Literal[choices] if choices else base))
    flags += [(flag, bool) for flag in REQUIRES]
    flags += [(flag, str if takes_value else bool) for flag, (takes_value, _) in REFUSED.items()]
    params = []
    for flag, annotation in flags:
        option = typer.Option(flag, hidden=True, show_default=False)
        default = False if annotation is bool else None
        hint = annotation if annotation is bool else annotation | None
        params.append(
            inspect.Parameter(
                ALIAS_PREFIX + flag[2:],
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[hint, option],
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
        params = own + dataclass_options(cls) + (alias_options(cls) if cls is TrainConfig else [])
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


def build_train_config(config_file: Path | None, values: dict[str, Any]) -> TrainConfig:
    given = {
        "--" + k.removeprefix(ALIAS_PREFIX): v
        for k, v in values.items()
        if k.startswith(ALIAS_PREFIX) and v is not None and v is not False  # 0 is a value, False an unused switch
    }
    values = {k: v for k, v in values.items() if not k.startswith(ALIAS_PREFIX)}
    required = apply_aliases(values, given)
    values["target_modules"] = _split_commas(values.get("target_modules"))
    config = TrainConfig.from_sources(config_file, **values)
    check_required(required, config)
    return config


ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML file of options (same names); the command line wins.")
]
