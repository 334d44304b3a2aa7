"""Redraw docs/ui.png and docs/ui-eval.png: a tiny-world run from `lora-db ui`, in Debian's chromium.

    python docs/ui_screenshots.py            # about 6 min on a 2-core CPU; needs pip install -e ".[ui]" and chromium

It starts `lora-db ui` on a fresh workspace, uploads five photos of the held-out heart, types tiny-world's
recommended setting over the page's starting values (rank 8 on attention and MLP, 1200 steps at lr 2e-3, a
checkpoint and validation images every 300 steps), presses Start, waits for the run to finish, takes the Train tab,
then scores the checkpoints on the Evaluate tab and takes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
VIEWPORT = {"width": 1280, "height": 1080}
TYPED = {  # field: value, over the page's starting values
    "rank": 8,
    "learning_rate": 2e-3,
    "max_train_steps": 1200,
    "checkpointing_steps": 300,
    "validation_steps": 300,
}
ADVANCED = {"target_modules": "to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(page, selector: str, test, timeout: float) -> str:
    """The text of `selector` once `test(text)` holds; an error naming the last text seen if it never does."""
    deadline = time.time() + timeout
    while True:
        text = page.inner_text(selector) if page.locator(selector).count() else ""
        if test(text):
            return text
        if time.time() > deadline:
            raise SystemExit(f"{selector} still reads {text!r} after {timeout:.0f} s")
        time.sleep(0.5)


def fill(page, field: str, value) -> None:
    """A TrainConfig field of the page (a textbox or a number)."""
    box = page.locator(f"#field-{field} textarea, #field-{field} input").first
    box.fill(str(value))
    box.blur()


def main() -> None:
    from playwright.sync_api import sync_playwright

    from lora_db.synthetic.subjects import write_subject_photos

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="lora-db-shots-") as tmp:
        workspace = Path(tmp) / "ws-shot"
        workspace.mkdir()
        photos = write_subject_photos("heart", Path(tmp) / "heart", 5, 64, 0)
        port = free_port()
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "lora_db.cli", "ui", "--workspace", str(workspace), "--port", str(port)]
        server = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
        try:
            deadline = time.time() + 120
            while not listening(port):
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("lora-db ui did not start")
                time.sleep(0.3)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("#photo-upload input[type=file]", [str(p) for p in photos])
                wait_for(page, "#photos-message .status", lambda text: text.startswith("added 5 photo"), 60)
                page.get_by_role("tab", name="2. Train").click()
                page.get_by_text("Advanced: every other option").click()
                for field, value in ADVANCED.items():  # typed key by key, as a user does
                    box = page.locator(f"#field-{field} textarea").first
                    box.click()
                    box.press("Control+a")
                    box.press_sequentially(value, delay=20)
                page.get_by_text("Advanced: every other option").click()  # folded again for the picture
                for field, value in TYPED.items():
                    fill(page, field, value)
                # the estimate of the typed setting (rank 8 on attention and MLP) before Start
                wait_for(page, "#estimate", lambda text: "165,888 trained parameters" in text, 120)
                page.click("#start")
                wait_for(page, "#train-status .status", lambda text: text.endswith(": finished"), 900)
                page.wait_for_selector("#validation img", timeout=60_000)
                time.sleep(2)  # the last validation images and the loss plot render
                page.screenshot(path=str(DOCS / "ui.png"), full_page=True)
                page.get_by_role("tab", name="3. Evaluate").click()
                page.click("#evaluate")
                wait_for(page, "#eval-status .status", lambda text: text.endswith(": finished"), 1200)
                page.wait_for_selector("#eval-plot img", timeout=60_000)
                time.sleep(2)
                page.screenshot(path=str(DOCS / "ui-eval.png"), full_page=True)
                print(wait_for(page, "#eval-table", bool, 10))
                browser.close()
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the page and any command it started
            server.wait(30)
    print(f"wrote {DOCS / 'ui.png'} and {DOCS / 'ui-eval.png'}")


if __name__ == "__main__":
    main()
