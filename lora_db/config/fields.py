"""How a config field is declared, checked and read from a TOML file: the one place every command's options come from.

Every option of every command is a dataclass field declared with `option(...)`: its default, its help text, the
--help panel it is listed in, its flag (when it differs from the field name), whether it is a positional argument,
and its numeric range. `lora_db.cli.options` turns these fields into typer options; `check_numbers` enforces the
ranges in each config's `__post_init__`; `read_toml` reads `--config FILE.toml` against the same fields.
Nothing here imports torch, so the CLI prints --help and usage errors in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lora_db.errors import LoraDBError
from lora_db.logs import escape_controls, printable

MixedPrecision = Literal["no", "fp16", "bf16"]
Quantization = Literal["none", "nf4", "int8"]

MAX_SEED = 2**32 - 1  # numpy and the data order take 32-bit seeds
RANGE_KEYS = ("minimum", "maximum", "above", "below")


def option(
    default: Any,
    help: str,
    group: str | None = None,
    *,
    flag: str | None = None,
    argument: bool = False,
    required: bool = False,
    **limits: float,
) -> Any:
    """A config field: `default` (a callable builds a fresh one: `list`), `help`, the --help `group`, the CLI `flag`
    when it is not the field name (`adapters` -> `--adapter`), `argument` for a positional one, `required` for an
    option the command cannot run without, and the range: `minimum`/`maximum` (inclusive), `above`/`below`."""
    unknown = set(limits) - set(RANGE_KEYS)
    if unknown:
        raise TypeError(f"option(): unknown range keys {sorted(unknown)}")
    factory = {"default_factory": default} if callable(default) else {"default": default}
    metadata = {"help": help, "group": group, "flag": flag, "argument": argument, "required": required, **limits}
    return dataclasses.field(**factory, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    """The field's command-line flag without dashes: `adapters` -> `adapter`, `num_images` -> `num-images`."""
    return (f.metadata.get("flag") or f.name).replace("_", "-")


def cli_flag(name: str) -> str:
    """`num_images` -> `--num-images`."""
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_text(options: Any) -> None:
    """Every text value of a config dataclass (paths, prompts, list items): never empty (an empty path would quietly
    mean the current folder) and valid UTF-8 (a name with other bytes cannot be written into the run's records)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        flag = f.name.upper() if f.metadata.get("argument") else "--" + flag_name(f)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str | Path):
                continue
            text = str(item)
            if not text.strip():
                raise LoraDBError(f'{flag} is empty; give it a value (a path: "." for the current folder)')
            if any("\udc80" <= ch <= "\udcff" for ch in text):
                raise LoraDBError(
                    f"{flag} {escape_controls(text)} is not valid UTF-8 (bytes shown as \\xNN); rename it with UTF-8 "
                    "characters, or choose another"
                )


def check_numbers(options: Any) -> None:
    """Every numeric field of a config dataclass: a number, finite, and inside the range its metadata declares.

    Range keys: `minimum` / `maximum` (inclusive), `above` / `below` (exclusive). None stands for the default.
    """
    hints = field_types(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        base, _, _ = option_type(hints[f.name])
        if value is None or base not in (int, float):
            continue
        flag = "--" + flag_name(f)
        if isinstance(value, bool) or not isinstance(value, int | float) or (base is int and isinstance(value, float)):
            raise LoraDBError(f"{flag} must be {'an integer' if base is int else 'a number'} (got {value!r})")
        low = f.metadata.get("minimum", f.metadata.get("above"))
        high = f.metadata.get("maximum", f.metadata.get("below"))
        inside = math.isfinite(value) and (
            (low is None or value > low or (value == low and "minimum" in f.metadata))
            and (high is None or value < high or (value == high and "maximum" in f.metadata))
        )
        if not inside:
            raise LoraDBError(f"{flag} must be {range_text(f.metadata, base)} (got {value})")


def range_text(meta: Mapping[str, Any], base: type) -> str:
    low = meta.get("minimum", meta.get("above"))
    high = meta.get("maximum", meta.get("below"))
    finite = "a finite number" if base is float else "an integer"
    if low is not None and high is not None:
        return f"in {'[' if 'minimum' in meta else '('}{low}, {high}{']' if 'maximum' in meta else ')'}"
    if low == 0 and "above" in meta:
        return f"a positive {finite.removeprefix('a ').removeprefix('an ')}"
    if low is not None:
        return f"at least {low}" if base is int else f"{finite} of at least {low}"
    return finite


def plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def option_type(annotation: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """(base type, allowed choices, is optional) of a field annotation."""
    hint = annotation
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str, tuple(typing.get_args(hint)), optional
    if typing.get_origin(hint) is list:
        return list, None, optional
    return hint, None, optional


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def toml_table(path: Path, option: str) -> dict[str, Any]:
    """A TOML file's table; a missing, unreadable or invalid file is one line naming `option` and the file."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraDBError(f"{option} {path}: file not found") from None
    except IsADirectoryError:
        raise LoraDBError(f"{option} {path}: is a folder; pass a TOML file") from None
    except OSError as err:
        raise LoraDBError(f"{option} {path}: cannot read it ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LoraDBError(f"{option} {path}: not valid TOML ({err})") from None


def read_toml(path: Path, cls: type) -> dict[str, Any]:
    """Read a TOML file of option values, checking every key and type against the dataclass."""
    path = Path(path)
    raw = toml_table(path, "--config")
    hints = field_types(cls)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in hints:
            known = ", ".join(sorted(n.replace("_", "-") for n in hints))
            raise LoraDBError(f"--config {path}: unknown key {printable(key)!r}; known keys: {known}")
        if name in spelled:
            raise LoraDBError(
                f"--config {path}: {spelled[name]!r} and {key!r} are the same option, given twice; keep one"
            )
        spelled[name] = key
        values[name] = _coerce(path, key, value, hints[name])
        if isinstance(values[name], str) and (option_type(hints[name])[0] is Path or name in PATH_TEXT):
            values[name] = expand_path(values[name], f"--config {path}: {key}")
    return values


PATH_TEXT = ("model", "resume_from_checkpoint")  # text options that may name a folder: expanded like paths
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_path(text: str, where: str) -> str:
    """`~`, `~user`, `$NAME` and `${NAME}` expanded as a shell expands them on the command line; an unset
    variable is an error (the shell would leave an empty string, Python the text "$NAME")."""

    def variable(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise LoraDBError(f"{where}: ${name} is not set in the environment; set it, or write the path out")
        return os.environ[name]

    return os.path.expanduser(_VARIABLE.sub(variable, text))


def _coerce(path: Path, key: str, value: Any, annotation: Any) -> Any:
    base, choices, _ = option_type(annotation)

    def wrong(expected: str) -> LoraDBError:
        return LoraDBError(f"--config {path}: {key} must be {expected}, not {value!r}")

    if base is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if base is list:
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise wrong("a list of strings")
        return value
    if not isinstance(value, str):
        raise wrong("a string")
    if choices is not None and value not in choices:
        raise wrong("one of " + ", ".join(choices))
    return value  # paths stay text here: __post_init__ refuses an empty one before it could become "."


def from_sources(cls: type, config_file: Path | None = None, **overrides: Any) -> Any:
    """`cls` from its defaults, then the TOML file's keys, then the non-None overrides (the command line)."""
    values = read_toml(config_file, cls) if config_file is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_dict(options: Any) -> dict[str, Any]:
    """A config as plain JSON values (paths as text), in field order."""
    return {f.name: plain(getattr(options, f.name)) for f in dataclasses.fields(options)}
