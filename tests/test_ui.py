"""`lora-db ui` in a real browser: Debian's chromium, headless, driven by playwright's Python API.

The page is started as users start it (`lora-db ui --workspace W --port P`) and used as they use it: upload photos,
edit a caption, start a run on the tiny model, watch it, reload the page, stop it, resume it, sample the adapter at
weight 0.5. A second test holds that the page's run is `lora-db train` itself: same options and seed, same adapter
bytes. Chromium comes from Debian (`apt-get install chromium`, done by .ci/run); playwright never downloads one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from processes import run, spawn
from test_cli import free_port
from test_flags import HEAVY, imported_modules

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Skipped only where chromium is absent and this is not CI: .ci/run installs it, so CI never skips.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)",
)
CLI = [sys.executable, "-m", "lora_db.cli"]
# One thread per process: the page, its run and the test share two cores, where spinning threads crawl.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROMPT = "a photo of sks robot"
STEPS = 200


def test_ui_help_imports_neither_gradio_nor_torch():
    code, modules = imported_modules("ui", "--help")
    assert code == 0
    assert not modules & {*HEAVY, "gradio", "pandas"}, sorted(modules & {*HEAVY, "gradio", "pandas"})


# -- the page in a browser ------------------------------------------------------------------------------------------


@pytest.fixture
def page_server(tmp_path):
    """`lora-db ui` on a free port, its workspace, and the log of its output; its whole process tree killed after."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    port = free_port()
    log = tmp_path / "ui.log"
    with (
        open(log, "wb") as output,
        spawn(
            [*CLI, "ui", "--workspace", str(workspace), "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=ENV,
        ) as process,
    ):
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "lora-db ui did not listen within 120 s: " + log.read_text()[-3000:]
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/", workspace, log


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "no chromium on PATH: .ci/run installs Debian's (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def text_of(page, selector: str) -> str:
    return page.inner_text(selector) if page.locator(selector).count() else ""


def wait_for_text(page, selector: str, test, timeout: float = 240) -> str:
    """The text of `selector` once `test(text)` holds; the last text seen if it never does."""
    deadline = time.time() + timeout
    while True:
        text = text_of(page, selector)
        if test(text):
            return text
        assert time.time() < deadline, f"{selector}: {text!r}"
        time.sleep(0.2)


def wait_until(read, expected, timeout: float = 60):
    """Poll `read()` until it returns `expected` (the page updates a table or grid in more than one render)."""
    deadline = time.time() + timeout
    while (seen := read()) != expected:
        assert time.time() < deadline, f"expected {expected!r}, still {seen!r} after {timeout:.0f} s"
        time.sleep(0.2)


def press(page, button: str, answer_in: str, start: str, timeout: float = 60) -> str:
    """Click `button`; its one-line answer (the .status element in `answer_in`) once it starts with `start`, or the
    new error line it shows instead."""
    before = text_of(page, f"{answer_in} .status")
    page.click(button)
    text = wait_for_text(
        page,
        f"{answer_in} .status",
        lambda text: text.startswith(start) or (text.startswith("error: ") and text != before),
        timeout,
    )
    assert text.startswith(start), text
    return text


def edit_caption(page, row: int, text: str) -> None:
    """Type `text` into the caption cell of photo `row` (0-based) and leave the cell, as a user does."""
    cell = page.locator(f"#captions [data-testid='cell-{row}-1']")
    cell.click()
    cell.press("Enter")
    cell.locator("textarea").fill(text)
    cell.locator("textarea").press("Enter")
    wait_for_text(page, f"#captions [data-testid='cell-{row}-1']", lambda shown: text in shown)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def fill(page, field: str, value) -> None:
    """A TrainConfig field of the page (a textbox or a number)."""
    box = page.locator(f"#field-{field} textarea, #field-{field} input").first
    box.fill(str(value))
    box.blur()


@needs_chromium
@pytest.mark.slow
def test_the_page_trains_stops_resumes_and_samples_in_a_browser(page_server, browser, tmp_path):
    from lora_db.synthetic.demo import make_demo_images
    from lora_db.ui.app import REFRESH_S

    url, workspace, log = page_server
    photos = make_demo_images(tmp_path / "demo", count=5, size=96)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)

    # Photos: five uploaded into the workspace, shown, one caption edited and saved as NAME.txt.
    page.set_input_files("#photo-upload input[type=file]", [str(p) for p in photos])
    assert wait_for_text(page, "#photos-message .status", bool, 60) == "added 5 photo(s) to photos"
    wait_for_text(page, "#captions", lambda text: "subject_01.png" in text)
    wait_until(lambda: page.get_attribute("#captions [role=grid]", "aria-rowcount"), "6")  # a header, five photos
    wait_until(lambda: page.locator("#photo-grid img").count(), 5)
    assert sorted(p.name for p in (workspace / "photos").iterdir()) == [p.name for p in photos]
    edit_caption(page, 1, f"{PROMPT} by a window")  # subject_01.png's caption
    press(page, "#save-captions", "#photos-message", "saved 1 caption(s)")
    assert (workspace / "photos" / "subject_01.txt").read_text() == f"{PROMPT} by a window\n"
    # An edit made after a save survives the page's refresh ticks (the save changed the folder's files; the page
    # once sent the table again from disk a tick later, over the unsaved edit).
    edit_caption(page, 2, f"{PROMPT} on a shelf")
    time.sleep(4 * REFRESH_S)  # four of the page's refresh ticks
    assert "on a shelf" in text_of(page, "#captions [data-testid='cell-2-1']")
    press(page, "#save-captions", "#photos-message", "saved 2 caption(s)")
    assert (workspace / "photos" / "subject_02.txt").read_text() == f"{PROMPT} on a shelf\n"

    # Train: the memory estimate, then paths that leave the workspace are refused with one line, nothing started.
    open_tab(page, "2. Train")
    assert wait_for_text(page, "#estimate .status", lambda text: text.startswith("fits in 8 GB: peak "))
    for typed, why in [("../outside", "`..` is not allowed"), ("/tmp", "is outside the workspace")]:
        fill(page, "output_dir", typed)
        page.click("#start")
        refusal = wait_for_text(page, "#train-message .status", lambda text, why=why: why in text, 30)
        assert refusal.startswith("error: Output folder") and "Traceback" not in refusal
    assert not (workspace / ".lora-db-ui").exists()

    for field, value in [
        ("model", "tiny"), ("instance_prompt", PROMPT), ("output_dir", "runs/robot"), ("max_train_steps", STEPS),
        ("learning_rate", 5e-3), ("validation_prompt", PROMPT), ("validation_steps", 10), ("checkpointing_steps", 0),
    ]:  # fmt: skip
        fill(page, field, value)
    page.get_by_text("Advanced: every other option").click()
    fill(page, "validation_inference_steps", 2)
    fill(page, "num_validation_images", 1)
    press(page, "#start", "#train-message", "started: lora-db train --model tiny")
    out = workspace / "runs" / "robot"

    # A reloaded page re-attaches to the run in progress: its fields, its progress and its validation images.
    page.reload()
    open_tab(page, "2. Train")
    wait_for_text(page, "#train-progress", lambda text: re.search(rf"step [1-9]\d* of {STEPS}", text))
    wait_until(lambda: page.input_value("#field-output_dir textarea"), "runs/robot")
    page.wait_for_selector("#validation img", timeout=120_000)
    wait_until(lambda: page.locator("#loss-plot canvas, #loss-plot svg").count() > 0, True)

    # Stop: SIGTERM, the step finishes and a checkpoint is saved; then Resume runs on to the end.
    press(page, "#stop", "#train-message", "stopping: the step in progress finishes and a checkpoint is saved")
    stopped = wait_for_text(page, "#train-status .status", lambda text: "stopped by" in text)
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", stopped).group(1))
    assert 0 < stopped_at < STEPS, stopped
    assert (out / f"checkpoint-{stopped_at}" / "state.json").is_file()
    assert not (out / "adapter.safetensors").exists()
    assert press(page, "#resume", "#train-message", "resumed: ").endswith("--resume-from-checkpoint latest")
    wait_for_text(page, "#train-status .status", lambda text: text == "runs/robot: finished", 300)
    assert f"step {STEPS} of {STEPS}" in text_of(page, "#train-progress")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))

    # Sample the adapter at weight 0.5: the image `lora-db sample --adapter FILE:0.5` draws, not the one at 1.0.
    open_tab(page, "4. Sample")
    page.click("#find-adapters")
    adapter = out / "adapter.safetensors"
    shown = "runs/robot/adapter.safetensors"  # the newest adapter in the workspace, chosen for the first slot
    wait_for_text(page, "#adapter-0", lambda _: page.input_value("#adapter-0 input") == shown)
    weight = page.locator("#weight-0 input[type=number]")
    weight.fill("0.5")
    weight.press("Enter")
    for field, value in [("sample-prompt", PROMPT), ("sample-count", 1), ("sample-steps", 2), ("sample-seed", 3)]:
        page.locator(f"#{field} textarea, #{field} input").first.fill(str(value))
    press(page, "#generate", "#sample-message", "robot:0.5: 1 image(s)", 120)
    page.wait_for_selector("#samples img")
    (sampled,) = (workspace / "samples").glob("*/00_seed3.png")
    reference = tmp_path / "reference"
    result = run(
        [*CLI, "sample", "--model", "tiny", "--adapter", f"{adapter}:0.5", "--adapter", str(adapter),
         "--prompt", PROMPT, "--num-images", "1", "--num-inference-steps", "2", "--seed", "3", "--out", str(reference)],
        env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    half, full = json.loads((reference / "sample.json").read_text())["images"]
    pixels = np.asarray(Image.open(sampled))
    assert np.array_equal(pixels, np.asarray(Image.open(reference / half)))
    assert not np.array_equal(pixels, np.asarray(Image.open(reference / full)))
    assert "Traceback" not in log.read_text()


# -- the page's run is the CLI's run -------------------------------------------------------------------------------


def safetensors_parts(path) -> tuple[dict, bytes]:
    """A safetensors file as its header (names, dtypes, shapes, offsets, metadata) and its tensors' bytes. The
    header's JSON lists the metadata in an order that changes from process to process (a Rust HashMap), so two
    identical runs write the same tensor bytes and the same header, but not always the same file bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


@pytest.fixture
def page_in_process(instance_dir, tmp_path, monkeypatch):
    """The page's logic without the page, on a workspace holding the demo photos; each job's process group (the
    jobs run in sessions of their own) is killed after the test, however it ended."""
    from lora_db.ui.page import Page

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, ENV[name])  # inherited by the page's jobs
    shutil.copytree(instance_dir, tmp_path / "workspace" / "photos")
    page = Page(tmp_path / "workspace")
    yield page
    for job in page.jobs.all():
        if job.state() == "running":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.record["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_a_run_started_from_the_page_is_the_cli_run_with_the_same_options(page_in_process, tmp_path):
    """Same options and seed: the page's adapter and the CLI's hold the same bytes. A run into a folder that another
    run writes is refused at once: with the CLI's lock message, or, for a run of the page itself, its own."""
    page = page_in_process
    workspace = page.workspace.root
    options = {
        "--rank": "2", "--alpha": "3", "--seed": "7", "--learning-rate": "0.004", "--lora-dropout": "0.1",
        "--max-train-steps": "6", "--target-modules": "to_q,to_v", "--lr-scheduler": "cosine",
    }  # fmt: skip
    cli_out = workspace / "runs" / "cli"
    typed = ["train", "--model", "tiny", "--instance-dir", str(workspace / "photos"), "--instance-prompt", PROMPT]
    with spawn(
        [*CLI, *typed, "--output-dir", str(cli_out), *[part for pair in options.items() for part in pair]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    ) as cli:
        deadline = time.time() + 300
        while not (cli_out / "config.json").exists():  # written once the run holds its output's lock
            assert cli.poll() is None and time.time() < deadline, cli.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        values = {
            "model": "tiny", "instance_dir": "photos", "instance_prompt": PROMPT, "rank": 2, "alpha": 3.0, "seed": 7,
            "learning_rate": 0.004, "lora_dropout": 0.1, "max_train_steps": 6, "target_modules": "to_q, to_v",
            "lr_scheduler": "cosine",
        }  # fmt: skip
        refused = page.start({**values, "output_dir": "runs/cli"})
        assert refused.startswith(f"error: --output-dir {cli_out} is in use by process {cli.pid}"), refused
        started = page.start({**values, "output_dir": "runs/page"})  # trains beside the CLI's run
        assert started.startswith("started: lora-db train"), started
        again = page.start({**values, "output_dir": "runs/page"})
        assert again.startswith(f"error: --output-dir {workspace / 'runs' / 'page'} is in use by train job"), again
        assert cli.wait(timeout=300) == 0, cli.stderr.read().decode()[-3000:]

    job = page.train_job()
    deadline = time.time() + 300
    while job.state() == "running":
        assert time.time() < deadline, job.lines()
        time.sleep(0.1)
    assert job.state() == "finished", job.lines()
    page_header, page_tensors = safetensors_parts(workspace / "runs" / "page" / "adapter.safetensors")
    cli_header, cli_tensors = safetensors_parts(cli_out / "adapter.safetensors")
    assert page_tensors == cli_tensors and len(page_tensors) > 1000
    assert page_header == cli_header

    # A bad value fails before anything starts, as the CLI's own line; a path out of the workspace too.
    assert page.start({**values, "output_dir": "runs/x", "rank": 0}) == "error: --rank must be at least 1 (got 0)"
    escape = workspace / "photos" / "escape"
    escape.symlink_to(tmp_path)
    outside = page.start({**values, "output_dir": "photos/escape/run"})
    assert outside.startswith("error: Output folder photos/escape/run is outside the workspace"), outside
    assert len(page.jobs.all()) == 1

    # A command that fails shows its own error line as the run's state, never a traceback.
    (workspace / "empty").mkdir()
    assert page.start({**values, "instance_dir": "empty", "output_dir": "runs/empty"}).startswith("started: ")
    failed, deadline = page.train_job(), time.time() + 300
    while failed.state() == "running":
        assert time.time() < deadline, failed.lines()
        time.sleep(0.1)
    status = page.train_view().status
    assert status.startswith(f"runs/empty: error: --instance-dir {workspace / 'empty'}: no jpg/jpeg/png"), status
    assert not any("Traceback" in line for line in failed.lines(200))


def test_the_page_command_line_builds_the_config_it_was_made_from(tmp_path, monkeypatch):
    """The arguments the page runs, given to `lora-db train`, build the very TrainConfig the page checked."""
    import lora_db.training.loop
    from lora_db.cli import main
    from lora_db.ui import forms
    from lora_db.ui.workspace import Workspace

    workspace = Workspace(tmp_path)
    (tmp_path / "photos").mkdir()
    values = {field.name: field.start for field in forms.train_fields()}
    values |= {
        "model": "tiny", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
        "rank": 8.0, "alpha": 16, "random_flip": True, "target_modules": "to_q, to_k, ff.net.2",
        "train_text_encoder": True, "report_to": "none", "seed": 9, "lr_scheduler": "cosine", "strict": False,
    }  # fmt: skip
    args, config = forms.train_command(workspace, values)
    assert "--class-dir" in args and str(tmp_path / "class-images") in args
    assert "--strict" not in args and "--no-strict" not in args  # defaults are left to the config

    parsed = []
    monkeypatch.setattr(
        lora_db.training.loop,
        "train",
        lambda config: parsed.append(config) or SimpleNamespace(adapter_path=None, validation_dir=None),
    )
    monkeypatch.setattr("sys.argv", ["lora-db", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert parsed[0].to_dict() == config.to_dict()
    assert config.rank == 8 and config.target_modules == ["to_q", "to_k", "ff.net.2"]
