"""The commands of README.md and docs/*.md, run as written and held to the output the page shows.

- A ```console block holds `$ COMMAND` lines (a trailing backslash continues one) and, below each, what it prints.
  Its commands run in order, in one fresh folder per page, through bash with this interpreter's folder first on
  PATH (so `lora-db` and `python` are this checkout's) and COLUMNS=80. Each line shown must be a line of the
  command's stdout or stderr, spaces aside: `...` (or `…`) stands for any text, a number followed by a time unit
  (`2.30 s`, `229.5 ms`) for any number, and every other number must agree within 2 %. A command that shows an
  `error:` or `Error:` line must fail; every other one must succeed.
- A ```python block whose first line is `# NAME.py` is written to NAME.py in that folder, for a later
  `$ python NAME.py`.
- A ```bash block is shown, not run: each `lora-db` command in it must still parse (every option and value checked,
  the command's config built), so a renamed option cannot hide in a page.
- A command that cannot run here is listed in NOT_RUN with where it is tested instead; any other is an error.
- A page that says `<!-- doc-test: continues README.md -->` starts in a copy of that page's folder, its commands
  done (docs/eval.md scores the README's demo run instead of training its own).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import sys
from pathlib import Path

from processes import run

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NOT_RUN = {
    r"(python3? -m venv|pip install|\. \.venv)": "installs: .ci/run installs into a fresh virtual environment",
    r"(ruff|lint-imports|python -m pytest)\b": "the checks and the tests themselves: .ci/run",
    r"python benchmarks/": "the benchmarks: tests/test_benchmarks.py runs memory.py on the tiny model",
    r"python -m lora_db\.synthetic\.tiny_world build": "a 25-minute build: tests/test_tiny_world.py builds a small one",
    r"python -m lora_db\.synthetic\.tiny_world preview": "docs/tiny-world.png's samples, 2 min of CPU: not tested",
    r"(accelerate launch|torchrun)\b": "several processes: tests/test_cli.py runs torchrun with two CPU processes",
    r"hf download\b": "the hub: tests/test_robustness.py covers a hub that cannot be reached",
    r"benchmarks/gpu_check\.sh": "needs a CUDA GPU",
}

WILDCARD = re.compile(r"\.\.\.|…")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
TIME_UNIT = re.compile(r"\s*(?:s|ms|min)\b")
TOLERANCE = 0.02


@dataclasses.dataclass
class Command:
    text: str  # as the page shows it, continuation lines joined
    expected: list[str]
    page: Path
    line: int

    @property
    def fails(self) -> bool:
        return any(line.lstrip().startswith(("error:", "Error:")) for line in self.expected)


@dataclasses.dataclass
class Block:
    language: str
    lines: list[str]
    line: int  # of the opening fence


def blocks(page: Path) -> list[Block]:
    found, current = [], None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if current is None and line.startswith("```"):
            current = Block(line[3:].strip(), [], number)
        elif current is not None and line.startswith("```"):
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    return found


def console_commands(page: Path) -> list[Command | tuple[str, str]]:
    """The page's console commands in order, with the files its `# NAME.py` python blocks write, as (name, text)."""
    items: list[Command | tuple[str, str]] = []
    for block in blocks(page):
        if block.language == "python" and block.lines and re.fullmatch(r"# [\w.-]+\.py", block.lines[0]):
            items.append((block.lines[0][2:], "\n".join(block.lines[1:]) + "\n"))
        if block.language != "console":
            continue
        command: Command | None = None
        continued = False
        for offset, line in enumerate(block.lines, 1):
            if continued and command is not None:
                command.text += " " + line.strip().removesuffix("\\").strip()
                continued = line.endswith("\\")
            elif line.startswith("$ "):
                command = Command(line[2:].removesuffix("\\").strip(), [], page, block.line + offset)
                continued = line.endswith("\\")
                items.append(command)
            elif command is not None and line.strip():
                command.expected.append(line)
    return items


def shown_commands(page: Path) -> list[Command]:
    """The commands of the page's ```bash blocks (comments dropped, continuation lines joined, `&&` chains split)."""
    found = []
    for block in blocks(page):
        if block.language not in ("bash", "sh"):
            continue
        text = "\n".join(line for line in block.lines if not line.lstrip().startswith("#"))
        text = re.sub(r"\\\n\s*", " ", text)
        for number, line in enumerate(text.splitlines(), 1):
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                found.append(Command(part, [], page, block.line + number))
    return found


def not_run_reason(command: str) -> str | None:
    for pattern, reason in NOT_RUN.items():
        if re.match(pattern, command):
            return reason
    return None


def _pattern(expected: str) -> tuple[re.Pattern, list[float | None]]:
    """A regex for one shown line (spaces collapsed), and per captured number its value (None: any number)."""
    parts, values = [], []
    for piece_number, piece in enumerate(WILDCARD.split(" ".join(expected.split()))):
        if piece_number:
            parts.append(".*")
        position = 0
        for match in NUMBER.finditer(piece):
            parts.append(re.escape(piece[position : match.start()]))
            parts.append(f"({NUMBER.pattern})")
            timed = TIME_UNIT.match(piece, match.end()) is not None
            values.append(None if timed else _value(match.group()))
            position = match.end()
        parts.append(re.escape(piece[position:]))
    return re.compile("".join(parts)), values


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def shown(output: str, expected: str) -> bool:
    """Whether `output` has a line that `expected` (a line the page shows) describes."""
    pattern, values = _pattern(expected)
    for line in re.split(r"[\r\n]+", output):
        match = pattern.fullmatch(" ".join(line.split()))
        if match and all(
            value is None or math.isclose(_value(got), value, rel_tol=TOLERANCE, abs_tol=1e-9)
            for got, value in zip(match.groups(), values, strict=True)
        ):
            return True
    return False


def environment() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("LORA_DB_DEBUG", "LORA_DB_QUIET_LIBRARIES"):
        env.pop(name, None)  # what a user's shell has, not what this test process set
    return env


CONTINUES = re.compile(r"<!-- doc-test: continues ([\w./-]+) -->")


def continues(page: Path) -> Path | None:
    """The page whose folder this page's commands start in (`<!-- doc-test: continues README.md -->`), if any."""
    match = CONTINUES.search(page.read_text(encoding="utf-8"))
    return ROOT / match.group(1) if match else None


def run_page(page: Path, folder: Path, timeout: float = 900, done: dict[str, str] | None = None) -> dict[str, str]:
    """Run every console command of `page` in `folder`, checking each as the module docstring says; returns each
    command's output (stdout + stderr) by its text. A command in `done` (run there already, by the page this one
    continues) is checked against that output instead of being run again."""
    outputs: dict[str, str] = dict(done or {})
    env = environment()
    for item in console_commands(page):
        if isinstance(item, tuple):
            (folder / item[0]).write_text(item[1])
            continue
        where = f"{page.relative_to(ROOT)}:{item.line}: $ {item.text}"
        if not_run_reason(item.text):
            continue
        if item.text in outputs:
            output = outputs[item.text]
        else:
            result = run(["bash", "-c", item.text], cwd=folder, env=env, timeout=timeout)
            output = result.stdout + "\n" + result.stderr
            assert (result.returncode != 0) == item.fails, f"{where}\nexit {result.returncode}\n{output[-3000:]}"
        missing = [line for line in item.expected if not shown(output, line)]
        assert not missing, f"{where}\nthe page shows lines it did not print: {missing}\nit printed:\n{output[-4000:]}"
        outputs[item.text] = output
    return outputs


def check_parses(command: Command) -> None:
    """A shown `lora-db ...` command: its options parse and its config is built, as the command itself does first."""
    from lora_db.cli import app
    from lora_db.cli.options import build_config, build_train_config
    from lora_db.config import commands, evaluate

    configs = {
        "sample": commands.SampleConfig, "merge": commands.MergeConfig, "info": commands.InfoConfig,
        "export": commands.ExportConfig, "demo-images": commands.DemoImagesConfig, "demo": commands.DemoConfig,
        "eval": evaluate.EvalConfig,
    }  # fmt: skip
    import typer
    import typer.main

    words = shlex.split(command.text)
    assert words[0] == "lora-db", command
    args = words[1:]
    while args and args[0].startswith("-"):  # the root's switches: --verbose, --debug, --quiet
        args.pop(0)
    name, *rest = args
    group = typer.main.get_command(app)
    parent = typer.Context(group, info_name="lora-db")
    sub = group.get_command(parent, name)
    assert sub is not None, f"{command.page.name}:{command.line}: no command {name}"
    params = sub.make_context(name, rest, parent=parent).params
    values = {key: None if value in ((), []) else value for key, value in params.items()}  # as typer passes them
    if name in ("train", "estimate"):
        built = build_train_config(values.get("config_file"), values)
        assert name == "estimate" or not built.missing_run_inputs(), command
    elif name in configs:
        build_config(configs[name], values)
