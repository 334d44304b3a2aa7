"""The tiny-world build's second core: the judge, then CLIP, in a process of its own beside the VAE.

Until the U-ViT, which takes both cores, the build runs in two processes of `BuildConfig.threads` threads each:

- the build's own renders the world, hands it to the second (`SecondCore.send`), trains the VAE;
- the second trains the judge (which shares nothing with the model) while the world renders, then runs the work it
  was started with on what it was sent (the build's: CLIP on the world's pictures and captions), and hands the
  result back (`SecondCore.join`).

Each half is deterministic on its own (fixed seeds, fixed thread counts), so the build is.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from pathlib import Path

import torch

from lora_db.synthetic.judge import JudgeConfig, build_judge, judge_report

POLL_S = 2.0  # how often a wait checks that the second process is still alive


class SecondCore:
    """The second process: started at the build's beginning, sent the world, joined before the U-ViT.

    `work(sent, *args)` runs there after the judge; it must be a module-level function (the process is spawned),
    and it returns plain Python and numpy values: torch's queue would share tensors through the memory of a
    process that is gone by the time they are read."""

    def __init__(self, judge_folder: Path, judge_config: JudgeConfig, threads: int, work: Callable, args=()) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.judge_folder = Path(judge_folder)
        self.inbox, self.outbox = context.Queue(), context.Queue()
        self.process = context.Process(
            target=_second_core,
            args=(str(judge_folder), judge_config, threads, work, args, self.inbox, self.outbox),
        )
        self.process.start()

    def send(self, value) -> None:
        self.inbox.put(value)

    def join(self):
        """Wait for the judge and the work: (the judge's build report, what the work returned)."""
        while True:
            try:
                result = self.outbox.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(
                        f"the build's second process (the judge, then CLIP) failed (exit code "
                        f"{self.process.exitcode}); see its output above"
                    ) from None
        self.process.join()
        return judge_report(self.judge_folder), result

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _second_core(judge_folder: str, judge_config, threads: int, work, args, inbox, outbox) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="judge: %(message)s")
    build_judge(Path(judge_folder), judge_config, log=logging.getLogger("lora_db").info)
    outbox.put(work(inbox.get(), *args))
