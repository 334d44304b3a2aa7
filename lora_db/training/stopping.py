"""Stopping a training run cleanly on SIGINT (Ctrl-C), SIGTERM and SIGHUP.

`docker stop`, Slurm preemption, `timeout` and cloud spot reclaims send SIGTERM, a closed terminal SIGHUP. Each
is treated like Ctrl-C: the current micro-batch finishes (a step of many accumulated micro-batches is dropped and
repeated on resume), a checkpoint of the finished steps is saved, and the run exits (128 + the signal's number) with
the resume command in its message. Preemption leaves seconds before the hard kill, so the warning says how long the
checkpoint is expected to take, and a slow checkpoint is reported when it happens. A second signal stops at once,
without a checkpoint, with one line and the same exit code. Before the loop starts nothing is trained yet: a signal
then stops the run at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch

from lora_db.errors import LoraDBError
from lora_db.interrupts import deferrable

logger = logging.getLogger("lora_db")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
SLOW_CHECKPOINT_S = 10.0  # above this, a preemption notice may be too short for the checkpoint: say so


class TrainingInterrupted(LoraDBError):
    """A stop signal during training: the run was checkpointed and can be resumed."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT, quiet: bool = False):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.quiet = quiet  # the other processes of a multi-process run: the main process says it


class StopRequest:
    """What the loop asks each step: was a stop signal received? Also the timings the warning quotes."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False  # False until the loop runs: a signal then stops at once, there is nothing to save
        self.step_s: float | None = None
        self.checkpoint_s: float | None = None

    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def note_checkpoint(self, seconds: float, path) -> None:
        if seconds > SLOW_CHECKPOINT_S and (self.checkpoint_s is None or self.checkpoint_s <= SLOW_CHECKPOINT_S):
            logger.warning(
                "saving %s took %.0f s: a stop signal (SIGTERM on preemption, docker stop) needs at least that long "
                "before the hard kill to leave a checkpoint (e.g. docker stop -t %d, Slurm --signal=TERM@%d)",
                path,
                seconds,
                int(seconds * 2 + 10),
                int(seconds * 2 + 10),
            )
        self.checkpoint_s = seconds

    def expected(self) -> str:
        parts = []
        if self.step_s is not None:
            parts.append(f"a step takes ~{self.step_s:.1f} s")
        if self.checkpoint_s is not None:
            parts.append(f"a checkpoint ~{self.checkpoint_s:.1f} s")
        return f" ({', '.join(parts)})" if parts else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the block (main thread only; elsewhere signals keep their handlers)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    @deferrable  # raises only outside the lines that create or swap a temporary file (lora_db.interrupts)
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if not request.armed:
            raise TrainingInterrupted(f"stopped by {name} before training started; nothing was trained yet", signum)
        if request.is_set():
            raise TrainingInterrupted(
                f"stopped at once by a second {name}, without saving a checkpoint; continue from the last one with the "
                "same command and --resume-from-checkpoint latest",
                signum,
            )
        request.signum = signum
        logger.warning(
            "%s: stopping after this micro-batch to save a checkpoint%s; %s again stops at once without one",
            name,
            request.expected(),
            "Ctrl-C" if signum == signal.SIGINT else name,
        )

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_requested(stop: StopRequest, accelerator) -> bool:
    """Whether any process received a stop signal (all of them must checkpoint together)."""
    if accelerator.num_processes == 1:
        return stop.is_set()
    flag = torch.tensor(float(stop.is_set()), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
