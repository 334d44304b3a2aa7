"""How `lora-db` prints its help and its usage errors: plain text that fits 80 columns, the main options first.

A command whose config names `MAIN_OPTIONS` (lora_db.config) shows those under "Main options" and lists its other
panels by name and size; `--help-all` shows every panel. The panels are the fields' groups, so an option added to a
config lands in its group's panel without touching this module (the one option generator, options.py, puts it
there). Option names are never cut: a long one gets a line of its own with its help below. Switches show no
metavar; an option that takes a value shows what kind (`N`, `X`, `TEXT`, `PATH`, `[a|b]`).

Usage errors (a missing or mistyped option) print the short usage, the one problem, and exit with code 2.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, NoReturn

import typer
import typer.core

MAIN_PANEL = "Main options"
OTHER_PANEL = "Other options"
HELP_ALL = "--help-all"
NAME_COLUMN = 28  # widest option name kept beside its help; a longer one gets a line of its own
INDENT = 2


def usage_error(ctx: typer.Context, message: str) -> NoReturn:
    """What click prints for a usage error, in the same words: the command's usage, where help is, the problem."""
    typer.echo(f"{ctx.get_usage()}\nTry '{ctx.command_path} --help' for help.\n\nError: {message}", err=True)
    raise typer.Exit(2)


def show_all_help(ctx: typer.Context, value: bool) -> None:
    """`--help-all`: every panel of the command's options."""
    if value and not ctx.resilient_parsing:
        ctx.meta[HELP_ALL] = True
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit()


HELP_ALL_OPTION = typer.Option(
    HELP_ALL,
    help="Show every option, in panels.",
    is_eager=True,
    expose_value=False,
    callback=show_all_help,
    hidden=True,
)


class _Wrapper(textwrap.TextWrapper):
    """Lines break at spaces, never at a hyphen or inside a default such as `thu-ml/unidiffuser-v1`; a word wider
    than the line breaks after its slashes (`--instance-dir/--class-dir` lists), and is cut only as a last resort."""

    def _split(self, text: str) -> list[str]:
        return [
            piece
            for chunk in super()._split(text)
            for piece in (re.split(r"(?<=/)(?=\S)", chunk) if len(chunk) > self.width else [chunk])
        ]


def _wrapped(text: str, width: int) -> list[str]:
    return _Wrapper(max(width, 20), break_on_hyphens=False).wrap(text) or [""]


def definition_list(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Two columns, names and their wrapped help; a name wider than NAME_COLUMN gets a line of its own."""
    if not rows:
        return []
    column = min(max(len(name) for name, _ in rows), NAME_COLUMN) + 2
    lines = []
    for name, text in rows:
        wrapped = _wrapped(text, width - INDENT - column)
        if len(name) <= column - 2:
            lines.append(" " * INDENT + name.ljust(column) + wrapped[0])
            wrapped = wrapped[1:]
        else:
            lines.append(" " * INDENT + name)
        lines += [" " * (INDENT + column) + line for line in wrapped if line]
    return lines


def _description(text: str, width: int) -> list[str]:
    """The command's docstring: paragraphs wrapped, indented blocks (examples) kept as written."""
    lines: list[str] = []
    for paragraph in textwrap.dedent(text or "").strip().split("\n\n"):
        if paragraph.startswith(" "):
            lines += [" " * INDENT + line for line in paragraph.splitlines()]
        else:
            lines += [" " * INDENT + line for line in _wrapped(" ".join(paragraph.split()), width - INDENT)]
        lines.append("")
    return lines


def option_name(param: Any) -> str:
    """`--rank N`, `-q, --quiet`, `--random-crop` (a switch: no metavar; its --no- form is in its default note)."""
    names = ", ".join(sorted(param.opts, key=len))
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return names
    return f"{names} {param.metavar or 'VALUE'}"


TAIL = ("--config", "--help", HELP_ALL)  # listed after the first panel's options, whatever the command


def _panel(param: Any) -> str | None:
    return getattr(param, "rich_help_panel", None)


def _help_rows(command: typer.core.TyperCommand, ctx: typer.Context) -> tuple[list, dict[str, list]]:
    """The arguments, and the options by panel in their order: the main options (else all ungrouped ones) first,
    with --config, --help and --help-all at their end."""
    has_main = any(_panel(p) == MAIN_PANEL for p in command.params)
    first = MAIN_PANEL if has_main else "Options"
    arguments, panels, tail = [], {first: []}, []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            arguments.append((param.metavar or param.name.upper(), getattr(param, "help", "") or ""))
        elif not getattr(param, "hidden", False) or HELP_ALL in param.opts:
            row = (option_name(param), param.help or "")
            if param.opts[0] in TAIL:
                tail.append(row)
            else:
                panels.setdefault(_panel(param) or (OTHER_PANEL if has_main else first), []).append(row)
    panels[first] += tail
    return arguments, panels


def format_command_help(command: typer.core.TyperCommand, ctx: typer.Context, width: int) -> str:
    """Usage, description, arguments, then the panels: only the first (with the others named) unless --help-all."""
    arguments, panels = _help_rows(command, ctx)
    folded = any(_panel(p) == MAIN_PANEL for p in command.params) and not ctx.meta.get(HELP_ALL, False)
    lines = [ctx.get_usage(), "", *_description(command.help or "", width)]
    if arguments:
        lines += ["Arguments:", *definition_list(arguments, width), ""]
    names = [name for name, rows in panels.items() if rows]
    shown = names[:1] if folded else names
    for name in shown:
        lines += [f"{name}:", *definition_list(panels[name], width), ""]
    if folded and names[1:]:
        more = ", ".join(f"{name} ({len(panels[name])})" for name in names[1:])
        lines += [*_wrapped(f"More options, shown by {HELP_ALL}: {more}.", width), ""]
    return "\n".join(lines).rstrip() + "\n"


class Command(typer.core.TyperCommand):
    """A lora-db command: help as format_command_help lays it out, arguments in its usage as `FILE` / `[FOLDER]`."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_help(self, ctx: typer.Context, formatter) -> None:
        formatter.write(format_command_help(self, ctx, formatter.width))


class Group(typer.core.TyperGroup):
    """`lora-db --help`: the root options, then every command with the first paragraph of its help."""

    def format_help(self, ctx: typer.Context, formatter) -> None:
        width = formatter.width
        lines = [ctx.get_usage(), "", *_description(self.help or "", width), "Options:"]
        lines += definition_list([(option_name(p), p.help or "") for p in self.get_params(ctx)], width)
        commands = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                commands.append((name, " ".join((command.help or "").strip().split("\n\n")[0].split())))
        lines += ["", "Commands:", *definition_list(commands, width)]
        formatter.write("\n".join(lines) + "\n")
