"""The page's jobs: `lora-db` commands run as subprocesses, their state kept in the workspace.

    jobs = Jobs(workspace_root)
    job = jobs.start("train", ["train", "--model", "tiny", ...], output=run_folder)
    job.state()          # "running", then "finished", "stopped", "failed" or "lost"
    job.stop()           # SIGTERM, as `kill` or Ctrl-C on a terminal: training saves a checkpoint and exits
    jobs.shown("train")  # what a (re)loaded page shows: the running train job, else the latest one

Each job is WORKSPACE/.lora-db-ui/jobs/ID.json (the command, its output folder, the page's values, the runner's
process id), ID.log (everything the command printed), ID.stop once Stop was pressed and, once it ended,
ID.exit.json (its exit code, written by lora_db.ui.runner). Nothing of a job lives only in the page's memory,
so a reloaded page, or a page started again after a crash, re-attaches to the commands still running there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lora_db.errors import LoraDBError
from lora_db.io import atomic_write_json
from lora_db.logs import printable_line

STATE_FOLDER = ".lora-db-ui"
STOP_SIGNALS = {128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP, -signal.SIGTERM}
STOPPING = "stopping: the step in progress finishes and a checkpoint is saved"
_LOG_TAIL_BYTES = 256 * 1024
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Job:
    path: Path  # WORKSPACE/.lora-db-ui/jobs/ID.json
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def output(self) -> Path:
        return Path(self.record["output"])

    @property
    def values(self) -> dict:
        return self.record.get("values", {})

    @property
    def command_line(self) -> str:
        return "lora-db " + shlex.join(self.record["args"])

    def ending(self) -> dict | None:
        try:
            return json.loads(Path(self.record["exit"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        ending = self.ending()
        if ending is None:
            starting = "pid" not in self.record  # written the moment the runner has started
            return "running" if starting or _runner_alive(self.record["pid"]) else "lost"
        if ending["returncode"] == 0:
            return "finished"
        return "stopped" if ending["returncode"] in STOP_SIGNALS else "failed"

    def lines(self, count: int = 40) -> list[str]:
        """The last `count` lines the command printed; of a progress bar redrawn with \\r, its last state."""
        try:
            with open(self.record["log"], "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return []
        lines = [_ANSI.sub("", line).rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
        return [printable_line(line) for line in lines if line.strip()][-count:]

    def error_line(self) -> str | None:
        """The command's own one-line error (`error: ...`), as the terminal would have shown it."""
        errors = [line for line in self.lines(200) if line.startswith("error: ")]
        return errors[-1] if errors else None

    def summary(self) -> str:
        """One line on how the job stands, in the command's own words where it said any."""
        state = self.state()
        if state == "running":
            return STOPPING if self.stop_asked() else "running"
        if state == "finished":
            return "finished"
        line = self.error_line()
        if state == "stopped":  # the CLI's line: "stopped by SIGTERM at step N; checkpoint saved to ..."
            return line.removeprefix("error: ") if line else "stopped"
        if state == "lost":
            return "its process is gone without an exit code (was the machine restarted?); the log shows how far it got"
        return line or f"failed with exit code {self.ending()['returncode']}; the log shows what it printed"

    def stop_asked(self) -> bool:
        return self.path.with_suffix(".stop").exists()

    def stop(self) -> str:
        """SIGTERM to the command, once: a second signal would stop training without its checkpoint."""
        if self.state() != "running":
            return f"{self.kind} is not running ({self.state()})"
        if self.stop_asked():
            return f"already {STOPPING}"
        self.path.with_suffix(".stop").touch()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.record["pid"], signal.SIGTERM)
        return STOPPING


def _runner_alive(pid: int | None) -> bool:
    """Whether `pid` is still a job runner (and not a finished one awaiting its parent, nor a reused number)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"lora_db.ui.runner" in command


class Jobs:
    """The jobs of one workspace, in WORKSPACE/.lora-db-ui/jobs/."""

    def __init__(self, root: Path):
        self.root = root
        self.folder = root / STATE_FOLDER / "jobs"
        self._lock = threading.Lock()

    def start(self, kind: str, args: list[str], output: Path, values: dict | None = None) -> Job:
        """Start `lora-db ARGS` in the workspace, in a session of its own (it outlives the page)."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            number = 1
            while (self.folder / f"{stamp}-{number:02d}-{kind}.json").exists():
                number += 1
            job_id = f"{stamp}-{number:02d}-{kind}"
            path = self.folder / f"{job_id}.json"
            record = {
                "id": job_id,
                "kind": kind,
                "args": [str(arg) for arg in args],
                "output": str(output),
                "cwd": str(self.root),
                "log": str(self.folder / f"{job_id}.log"),
                "exit": str(self.folder / f"{job_id}.exit.json"),
                "started": time.time(),
                "values": values or {},
            }
            atomic_write_json(path, record)
            try:
                runner = subprocess.Popen(
                    [sys.executable, "-m", "lora_db.ui.runner", str(path)],
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:
                path.unlink(missing_ok=True)
                raise LoraDBError(f"cannot start lora-db {kind}: {err.strerror or err}") from None
            threading.Thread(target=runner.wait, daemon=True).start()  # reaped here, so it never lingers as a zombie
            record["pid"] = runner.pid
            atomic_write_json(path, record)
            return Job(path, record)

    def all(self, kind: str | None = None) -> list[Job]:
        """The workspace's jobs, oldest first."""
        jobs = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            if path.name.endswith(".exit.json"):
                continue
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text(encoding="utf-8"))
                if kind is None or record.get("kind") == kind:
                    jobs.append(Job(path, record))
        return jobs

    def shown(self, kind: str) -> Job | None:
        """The job a page shows for `kind`: the newest running one, else the newest."""
        jobs = self.all(kind)
        running = [job for job in jobs if job.state() == "running"]
        return (running or jobs or [None])[-1]
