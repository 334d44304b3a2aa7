"""`python -m lora_db.ui.runner RECORD.json`: one `lora-db` command started from the page, outliving the page.

The page starts this runner in a session of its own; the runner starts `lora-db ARGS` with its output in the job's
log, waits for it and writes its exit code into the job's exit file. So a reloaded or restarted page finds the
command's output and how it ended in the workspace, whatever happened to the page in between. Stop sends SIGTERM to
the session: the command takes it as on a terminal (training finishes the step and saves a checkpoint); the runner
only waits on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lora_db.io import atomic_write_json


def _keep_waiting(signum, frame) -> None:
    """A Python handler, not SIG_IGN: the command must not inherit an ignored SIGTERM."""


def main(record_path: Path) -> int:
    record = json.loads(record_path.read_text(encoding="utf-8"))
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), _keep_waiting)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(record["log"], "ab") as log:
        command = subprocess.Popen(
            [sys.executable, "-m", "lora_db.cli", *record["args"]],
            cwd=record["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        returncode = command.wait()
    atomic_write_json(record["exit"], {"returncode": returncode, "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
