"""The command line people already type: fast --help and usage errors, and diffusers' DreamBooth flag names."""

import sys

import pytest
from processes import run

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "PIL")


def imported_modules(*args: str) -> tuple[int, set[str]]:
    """`lora-db ARGS` under `python -X importtime`: exit code and the top-level modules it imported."""
    result = run([sys.executable, "-X", "importtime", "-m", "lora_db.cli", *args], timeout=60)
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result.returncode, {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["sample", "--help"], 0),
        (["merge", "--help"], 0),
        (["estimate", "--help"], 0),
        (["info", "--help"], 0),
        (["train", "--rank", "four"], 2),
        (["sample", "--out", "x", "--num-images", "many"], 2),
    ],
)
def test_help_and_usage_errors_import_no_heavy_library(args, code):
    """torch and diffusers took ~2 s to import before --help printed; now they load only when a command runs."""
    returncode, modules = imported_modules(*args)
    assert returncode == code
    assert "lora_db" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
