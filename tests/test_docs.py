"""Every command in docs/*.md runs as written and prints what the page shows (tests/doc_commands.py says how);
README.md's commands run in test_demo.py, beside the check that the demo learns."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from doc_commands import (
    PAGES,
    ROOT,
    Command,
    check_parses,
    console_commands,
    continues,
    not_run_reason,
    run_page,
    shown,
    shown_commands,
)
from processes import run

# Pages whose commands train on tiny-world or trace the real-size architecture: tens of seconds each.
SLOW_PAGES = {"benchmarks.md", "eval.md", "sample-and-merge.md", "training.md"}
RUN_PAGES = [
    page for page in PAGES if page.name != "README.md" and any(isinstance(i, Command) for i in console_commands(page))
]


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, id=page.name, marks=[pytest.mark.slow] if page.name in SLOW_PAGES else [])
        for page in RUN_PAGES
    ],
)
def test_page_commands_run_as_written(page, tmp_path, request):
    done = None
    if continues(page) == ROOT / "README.md":
        folder, done = request.getfixturevalue("readme_run")
        shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    run_page(page, tmp_path, done=done)


def test_every_command_shown_is_run_parsed_or_tested_elsewhere():
    """A console command runs (above); a shown `lora-db` command must parse; anything else names where it is tested."""
    checked = 0
    for page in PAGES:
        for command in shown_commands(page):
            if command.text.startswith("lora-db "):
                check_parses(command)
                checked += 1
            else:
                assert not_run_reason(command.text), (
                    f"{page.name}:{command.line}: {command.text} is neither run nor tested"
                )
        for item in console_commands(page):
            if isinstance(item, Command) and not item.text.startswith(("lora-db ", "python ")):
                assert not_run_reason(item.text), f"{page.name}:{item.line}: {item.text}"
    assert checked >= 3  # the real-model train and estimate of docs/training.md, the diffusers command


def test_a_shown_command_with_a_renamed_option_fails_the_check():
    with pytest.raises(Exception, match="No such option"):
        check_parses(
            Command(
                "lora-db train --model tiny --instance-dir p --instance-prompt x --output-dir o --rnak 4",
                [],
                ROOT / "README.md",
                1,
            )
        )


def test_a_line_the_command_did_not_print_fails_the_check():
    output = "base model load: 5.12 s\nadapter switch: 1.54 ms mean, 2.44 ms max, 3 switches\nparameters    36,864\n"
    assert shown(output, "base model load: 2.30 s")  # a time: any number
    assert shown(output, "adapter switch: 0.9 ms mean, ... 3 switches")
    assert shown(output, "parameters 36,864")  # spaces collapsed
    assert not shown(output, "parameters 38,000")  # other numbers within 2 %
    assert not shown(output, "adapter switch: 1.54 ms mean, 2.44 ms max, 4 switches")
    assert not shown(output, "base model loaded")


def test_the_training_guide_lists_every_option_and_no_other():
    """docs/training.md ends with a table of `lora-db train`'s options: one added, renamed or removed shows here."""
    result = run(["lora-db", "train", "--help-all"], timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr[-2000:]
    names = [re.split(r"\s{2,}", line.strip())[0] for line in result.stdout.splitlines() if line.startswith("  -")]
    options = {word.rstrip(",") for name in names for word in name.split() if word.startswith("--")}
    options -= {"--help", "--help-all", "--config"}
    guide = (ROOT / "docs" / "training.md").read_text()
    listed = {row.split("`")[1].split()[0] for row in guide.splitlines() if row.startswith("| `--")}
    assert not options - listed, f"docs/training.md's option table lacks {sorted(options - listed)}"
    assert not listed - options, f"docs/training.md's option table names {sorted(listed - options)}, not options"
