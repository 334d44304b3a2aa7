"""What each control of the page does, without the page: lora_db.ui.app lays these out with gradio.

    page = Page(Path("workspace"))
    page.start(values)          # "started: lora-db train --model tiny ...", or "error: <the CLI's one line>"
    page.train_view()           # what the Train tab shows now: state, progress, losses, validation images, output

An action returns one line for the page: what it started, or `error: ...`, the line the CLI prints for the same
mistake (a LoraDBError's message; an unexpected exception's type and first line, its traceback only in the log of
the `lora-db ui` process). Training, evaluation, merge and export are `lora-db` subprocesses (lora_db.ui.jobs); the
memory estimate and the sampler run here, on lora_db's own functions.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.io import os_error_of
from lora_db.layout import ADAPTER_FILE, list_checkpoints
from lora_db.locks import output_lock
from lora_db.logs import printable_line
from lora_db.ui import forms, progress, workspace
from lora_db.ui.jobs import Job, Jobs
from lora_db.ui.sampler import Sampler
from lora_db.ui.workspace import Workspace

logger = logging.getLogger("lora_db")

LOG_LINES = 30


def one_line(err: BaseException) -> str:
    """An exception as the page shows it: `error: ` and one line, never a traceback."""
    if isinstance(err, LoraDBError):
        text = str(err)
    elif (os_error := os_error_of(err)) is not None:
        where = getattr(os_error, "filename", None)
        text = f"{where}: {os_error.strerror or os_error}" if where else str(os_error.strerror or os_error)
    else:
        logger.error("unexpected error in the page", exc_info=err)
        detail = (str(err).strip().splitlines() or [""])[0]
        text = (
            f"unexpected {type(err).__name__}{': ' + detail if detail else ''} (the terminal running `lora-db ui` "
            "shows the traceback; please report it)"
        )
    return "error: " + printable_line(" ".join(text.split()))


def action(method):
    """A page action: its one-line result, or its error as one line."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as err:
            return one_line(err)

    return wrapped


@dataclass
class TrainView:
    status: str = "no run yet: choose the photos, then Start"
    command: str = ""
    output: Path | None = None
    step: int = 0
    total: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    validation: list[tuple[Path, int]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@dataclass
class JobView:
    status: str = ""
    command: str = ""
    output: Path | None = None
    log: list[str] = field(default_factory=list)


class Page:
    def __init__(self, root: Path):
        self.workspace = Workspace(root)
        self.jobs = Jobs(self.workspace.root)
        self.sampler = Sampler()
        self._torch = threading.Lock()  # the estimate and the sampler take turns with torch's global state

    # -- photos ---------------------------------------------------------------------------------------------------

    def photos_folder(self, text: str) -> Path:
        return self.workspace.path(text, forms.LABELS["instance_dir"])

    @action
    def upload(self, folder: str, uploads: list[str]) -> str:
        written = workspace.import_photos(self.photos_folder(folder), uploads or [])
        return f"added {len(written)} photo(s) to {self.workspace.show(self.photos_folder(folder))}"

    def photo_view(self, folder: str) -> tuple[list[tuple[Path, str]], list[list[str]]]:
        """The folder's photos (each with its caption, or the prompt's place) and the caption table."""
        try:
            rows = workspace.captions(self.photos_folder(folder))
        except LoraDBError:
            return [], []
        path = self.photos_folder(folder)
        return [(path / name, caption or name) for name, caption in rows], rows

    @action
    def save_captions(self, folder: str, rows: list[list[str]]) -> str:
        count = workspace.save_captions(self.photos_folder(folder), [row[:2] for row in rows if row and row[0]])
        return f"saved {count} caption(s); photos without one train on the instance prompt"

    # -- training -------------------------------------------------------------------------------------------------

    def _refuse_if_in_use(self, output: Path) -> None:
        """Refuse an output a job of this page writes (it may not hold the lock yet), or that a lora-db command
        holds the lock of (refused with the CLI's own message); the command takes the lock itself all the same."""
        for job in self.jobs.all():
            if job.output == output and job.state() == "running":
                raise LoraDBError(
                    f"--output-dir {output} is in use by {job.kind} job {job.id} of this page (process "
                    f"{job.record.get('pid')}); wait for it to finish, stop it, or choose another folder"
                )
        with output_lock(output, "--output-dir"):
            pass

    @action
    def start(self, values: dict[str, Any]) -> str:
        args, config = forms.train_command(self.workspace, values)
        self._refuse_if_in_use(config.output_dir)
        job = self.jobs.start("train", args, config.output_dir, {"config": config.to_dict()})
        return f"started: {job.command_line}"

    @action
    def stop(self) -> str:
        job = self.jobs.shown("train")
        if job is None:
            return "nothing to stop: no run has been started in this workspace"
        return job.stop()

    @action
    def resume(self) -> str:
        job = self.jobs.shown("train")
        if job is None:
            raise LoraDBError("nothing to resume: no run has been started in this workspace")
        if job.state() == "running":
            raise LoraDBError(f"{self.workspace.show(job.output)} is still running; Stop it first")
        if not list_checkpoints(job.output):
            raise LoraDBError(
                f"{self.workspace.show(job.output)} has no checkpoint to resume from; Start the run again instead"
            )
        self._refuse_if_in_use(job.output)
        resumed = self.jobs.start("train", forms.resume_args(job.record["args"]), job.output, job.values)
        return f"resumed: {resumed.command_line}"

    @action
    def estimate(self, values: dict[str, Any], gpu_gib: int) -> str:
        """`lora-db estimate` of the page's options: the peak of a training step, and whether it fits the GPU."""
        from lora_db.training.estimate import GiB, estimate_memory, format_bytes

        config = forms.train_config(self.workspace, values)
        with self._torch:
            estimate = estimate_memory(config, device="cuda")
        memory = int(gpu_gib) * GiB
        verdict = "fits in" if estimate.fits(memory) else "does NOT fit in"
        return (
            f"{verdict} {int(gpu_gib)} GB: peak {format_bytes(estimate.peak_bytes)} "
            f"({format_bytes(estimate.total_bytes)} with the CUDA context), "
            f"{estimate.trainable_parameters:,} trained parameters"
        )

    def train_job(self) -> Job | None:
        return self.jobs.shown("train")

    def train_view(self) -> TrainView:
        job = self.train_job()
        if job is None:
            return TrainView()
        config = job.values.get("config", {})
        run = progress.run_progress(job.output)
        view = TrainView(
            status=f"{self.workspace.show(job.output)}: {job.summary()}",
            command=job.command_line,
            output=job.output,
            step=run.step,
            total=int(config.get("max_train_steps") or 0),
            steps=run.steps,
            losses=run.losses,
            checkpoints=run.checkpoints,
            validation=progress.validation_images(job.output),
            log=job.lines(LOG_LINES),
        )
        if job.state() == "running" and not run.steps:
            view.status = f"{self.workspace.show(job.output)}: starting (loading the model and the photos)"
        return view

    def restore(self) -> dict[str, Any] | None:
        """The page's fields as the shown run had them, so a reloaded page goes on where it was."""
        job = self.train_job()
        if job is None or "config" not in job.values:
            return None
        values = dict(job.values["config"])
        paths = [field.name for field in forms.train_fields() if field.kind == "path"]
        for name in [*paths, "model"]:
            if isinstance(values.get(name), str) and Path(values[name]).is_absolute():
                values[name] = self.workspace.show(values[name])
        return values

    def _run_config(self) -> tuple[Job, TrainConfig]:
        job = self.train_job()
        if job is None or "config" not in job.values:
            raise LoraDBError("no run in this workspace yet: train one first (the Train tab)")
        return job, TrainConfig(**job.values["config"])

    # -- evaluation, merge, export --------------------------------------------------------------------------------

    @action
    def evaluate(self, num_images: int, steps: int) -> str:
        job, config = self._run_config()
        if job.state() == "running":
            raise LoraDBError(f"{self.workspace.show(job.output)} is still training; evaluate it when it has ended")
        out = job.output.with_name(job.output.name + "-eval")
        args = forms.eval_command(config, out, int(num_images), int(steps))
        started = self.jobs.start("eval", args, out, {"run": str(job.output)})
        return f"started: {started.command_line}"

    def eval_view(self) -> tuple[JobView, progress.EvalTable | None]:
        job = self.jobs.shown("eval")
        if job is None:
            return JobView("no evaluation yet: Score checkpoints scores each checkpoint of the run"), None
        status = f"{self.workspace.show(job.output)}: {job.summary()}"
        view = JobView(status, job.command_line, job.output, job.lines(LOG_LINES))
        return view, progress.eval_table(job.output) if job.state() == "finished" else None

    def _adapter(self) -> tuple[Path, TrainConfig]:
        job, config = self._run_config()
        adapter = job.output / ADAPTER_FILE
        if not adapter.is_file():
            raise LoraDBError(f"{self.workspace.show(job.output)} has no final adapter yet: let the run finish")
        return adapter, config

    @action
    def merge(self, out: str) -> str:
        adapter, config = self._adapter()
        folder = self.workspace.path(out, "Merged model folder")
        job = self.jobs.start("merge", forms.merge_command(adapter, config.model, folder), folder)
        return f"started: {job.command_line}"

    @action
    def export(self, out: str) -> str:
        adapter, _ = self._adapter()
        folder = self.workspace.path(out, "Export folder")
        job = self.jobs.start("export", forms.export_command(adapter, folder), folder)
        return f"started: {job.command_line}"

    def outputs_view(self) -> tuple[JobView, str | None]:
        """The latest merge or export, and the shown run's model card."""
        jobs = self.jobs.all("merge") + self.jobs.all("export")
        job = max(jobs, key=lambda j: j.record["started"], default=None)
        view = JobView("nothing merged or exported yet")
        if job is not None:
            where = f"{job.kind} into {self.workspace.show(job.output)}"
            view = JobView(f"{where}: {job.summary()}", job.command_line, job.output, job.lines(LOG_LINES))
        run = self.train_job()
        return view, progress.model_card(run.output) if run is not None else None

    # -- the sampler ----------------------------------------------------------------------------------------------

    def adapter_choices(self) -> list[str]:
        return [self.workspace.show(path) for path in progress.adapters_in(self.workspace.root)]

    def sample(
        self, model: str, slots: list[tuple[str, float]], prompt: str, seed, num_images, steps, guidance
    ) -> tuple[list[Path], str]:
        try:
            weights = {}
            for text, weight in slots:
                if text:
                    path = self.workspace.path(text, "Adapter")
                    weights[path] = weights.get(path, 0.0) + float(weight)
            if not (prompt or "").strip():
                raise LoraDBError("Prompt is empty; write what to draw, e.g. a photo of sks toy")
            out = _new_folder(self.workspace.root / "samples", time.strftime("%Y%m%d-%H%M%S"))
            with self._torch:
                result = self.sampler.sample(
                    self.workspace.model(model),
                    weights,
                    prompt.strip(),
                    seed=int(seed or 0),
                    num_images=max(1, int(num_images or 1)),
                    steps=max(1, int(steps or 1)),
                    guidance=float(guidance if guidance is not None else 8.0),
                    out=out,
                )
            return result.images, result.note.replace(str(out), self.workspace.show(out))
        except Exception as err:
            return [], one_line(err)


def _new_folder(parent: Path, stem: str) -> Path:
    """PARENT/STEM, or STEM-2, STEM-3, ... if taken: each sampling keeps its own images."""
    folder, number = parent / stem, 2
    while folder.exists():
        folder, number = parent / f"{stem}-{number}", number + 1
    return folder
