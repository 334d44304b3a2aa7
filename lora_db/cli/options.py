"""The one option generator: every command's typer options come from its config dataclasses' fields.

Each field declared with `lora_db.config.fields.option` becomes one option (`rank` -> `--rank`; booleans get
`--x/--no-x`; a list is repeatable; `flag=` renames it, `argument=True` makes it positional) with the field's help
text, its default and its range shown the same way in every command, in the --help panel its group names, or
under "Main options" when its config lists it in MAIN_OPTIONS (cli/help.py lays the panels out).
An option's own default is None, so only what the user typed overrides the dataclass default (or, for `train`
and `estimate`, a `--config` file). `train` and `estimate` also take diffusers' flag names as hidden options
(lora_db/cli/aliases.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from lora_db.cli.aliases import REFUSED, RENAMED, REQUIRES, apply_aliases, check_required, underscore_aliases
from lora_db.cli.help import HELP_ALL_OPTION, MAIN_PANEL
from lora_db.config.fields import field_default, field_types, flag_name, from_sources, option_type, range_text
from lora_db.config.train import TrainConfig

ALIAS_PREFIX = "alias__"

ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", metavar="PATH", help="TOML file of options (same names); the command line wins."),
]


def help_text(f: dataclasses.Field, base: type, choices: tuple[str, ...] | None = None) -> str:
    """The field's help, then `[default: X]`, `[range]`, and the choices when the metavar is too long to hold them."""
    default = field_default(f)
    notes = []
    if choices and len(_choices_metavar(choices)) > MAX_METAVAR:
        notes.append("one of: " + ", ".join(choices))
    if isinstance(default, bool):
        notes.append("default: --" + ("" if default else "no-") + flag_name(f))
    elif default not in (None, []):
        notes.append(f"default: {','.join(default) if isinstance(default, list) else default}")
    if base in (int, float) and any(key in f.metadata for key in ("minimum", "maximum", "above", "below")):
        notes.append(range_text(f.metadata, base))
    return " ".join([f.metadata.get("help", ""), *(f"[{note}]" for note in notes)])


MAX_METAVAR = 30  # longer choice lists are named NAME in the option's column and listed in its help


def _choices_metavar(choices: tuple[str, ...]) -> str:
    return "[" + "|".join(choices) + "]"


def _metavar(base: type, choices: tuple[str, ...] | None) -> str:
    """What an option's value is, in --help: `[lora|full]`, `NAME` (one of many), `N` (an integer), `X` (a number),
    `PATH` or `TEXT`."""
    if choices:
        return _choices_metavar(choices) if len(_choices_metavar(choices)) <= MAX_METAVAR else "NAME"
    return {int: "N", float: "X", Path: "PATH"}.get(base, "TEXT")


def _annotation(base: type, choices: tuple[str, ...] | None) -> Any:
    # Paths arrive as text: typer would turn "" into Path("."), the current folder, before any check saw it.
    if base is list:
        return list[str]
    if choices:
        return Literal[choices]
    return str if base is Path else base


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One typer parameter per dataclass field; the fields the class names in MAIN_OPTIONS go in the first panel."""
    hints = field_types(cls)
    main = getattr(cls, "MAIN_OPTIONS", ())
    params = []
    for f in dataclasses.fields(cls):
        base, choices, _ = option_type(hints[f.name])
        required = f.metadata.get("required", False)
        if f.metadata.get("argument"):
            spec = typer.Argument(help=help_text(f, base, choices), show_default=False, metavar=f.name.upper())
            annotation = _annotation(base, choices)
        else:
            flag = "--" + flag_name(f)
            names = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
            spec = typer.Option(
                *names,
                help=help_text(f, base, choices),
                rich_help_panel=MAIN_PANEL if f.name in main else f.metadata.get("group"),
                show_default=False,
                metavar=None if base is bool else _metavar(base, choices),
            )
            annotation = _annotation(base, choices)
        hint = Annotated[annotation if required else annotation | None, spec]
        default = inspect.Parameter.empty if required else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint))
    return params


def alias_parameters(cls: type) -> list[inspect.Parameter]:
    """Hidden options for diffusers' flag names: renamed, underscore spellings, switches checked later, refused."""
    hints = field_types(cls)
    types = {f.name: option_type(hints[f.name]) for f in dataclasses.fields(cls)}
    is_bool = {name: base is bool for name, (base, _, _) in types.items()}
    flags: list[tuple[str, Any]] = []  # (flag, annotation of its value)
    for alias in (*RENAMED, *underscore_aliases(list(types), is_bool)):
        base, choices, _ = types[alias.field]
        flags.append((alias.flag, bool if alias.switch_value is not None else _annotation(base, choices)))
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


def with_config_options(*classes: type):
    """Give a command `fn(..., **values)` the options of each config class (the single source of their help);
    TrainConfig brings its diffusers aliases along."""

    def decorate(fn):
        own = [
            p
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = [p for cls in classes for p in config_parameters(cls)]
        # Positional arguments first, in field order; then required options, then the rest (Python's order rule).
        generated.sort(key=lambda p: p.default is not inspect.Parameter.empty)
        aliases = alias_parameters(TrainConfig) if TrainConfig in classes else []
        if any(getattr(cls, "MAIN_OPTIONS", ()) for cls in classes):  # --help shows those; --help-all every option
            hint = Annotated[bool, HELP_ALL_OPTION]
            keyword = inspect.Parameter.KEYWORD_ONLY
            aliases.append(inspect.Parameter("help_all", keyword, default=False, annotation=hint))
        params = own + generated + aliases
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


def build_config(cls: type, values: dict[str, Any]):
    """`cls` from the values the user gave (None: not given, the field's default stands)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def _split_commas(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def build_train_config(config_file: Path | None, values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from defaults, `--config`, the options and diffusers' aliases, in that order of precedence."""
    given = {
        "--" + k.removeprefix(ALIAS_PREFIX): v
        for k, v in values.items()
        if k.startswith(ALIAS_PREFIX) and v is not None and v is not False  # 0 is a value, False an unused switch
    }
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in values.items() if k in names}
    required = apply_aliases(values, given)
    values["target_modules"] = _split_commas(values.get("target_modules"))
    config = from_sources(TrainConfig, config_file, **values)
    check_required(required, config)
    return config
