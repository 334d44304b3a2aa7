"""DreamBooth fine-tuning of UniDiffuser: LoRA adapters (or every U-ViT weight) trained on a few photos.

    from lora_db import TrainConfig
    from lora_db import train
    result = train(TrainConfig(model="tiny", instance_dir="photos", instance_prompt="a photo of sks dog",
                               output_dir="out", max_train_steps=30))

The loss is UniDiffuser's own text-to-image objective: the VAE latent and the CLIP image embedding are noised
at one timestep, the text stays clean (`timestep_text=0`, `data_type=1`), and both image outputs regress their
noise. Guidance is not part of the loss; `uncond_prob` trains the unconditional branch that guidance uses.
A run is: check options, load, set up models / data / optimizer, then the loop below, top to bottom.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.io import (
    WriteError,
    append_line,
    atomic_write_json,
    atomic_write_text,
    explain_os_error,
)
from lora_db.layout import METRICS_FILE, RAW_ADAPTER_FILE
from lora_db.locks import output_lock
from lora_db.models.memory import count_parameters, peak_memory_bytes, reset_peak_memory
from lora_db.models.objective import dreambooth_loss
from lora_db.training.checkpoint import (
    TrainingState,
    local_rng_state,
    resolve_checkpoint,
    restore,
    rng_state,
    save_checkpoint,
    scaler_state,
    set_local_rng_state,
    trainable_state,
)
from lora_db.training.compiling import compile_unet
from lora_db.training.data import batch_indices
from lora_db.training.divergence import check_loss, check_weights, weights_check_due
from lora_db.training.ema import checkpoint_weights, evaluation_weights, training_weights
from lora_db.training.hub import push_run
from lora_db.training.model_card import write_model_card
from lora_db.training.optimizers import current_learning_rate
from lora_db.training.outputs import replica_divergence, rescue_weights, run_validation, save_outputs
from lora_db.training.resume import (
    RUN_RECORD,
    check_resume,
    data_digest,
    learning_rates,
    lower_learning_rates,
    read_run_record,
    retire_later_checkpoints,
    run_record,
)
from lora_db.training.setup import (
    FINAL_OUTPUTS,
    RUN_FILES,
    Run,
    _clear_previous_run,
    check_before_loading,
    release_idle_modules,
    sampling_mode,
    setup_accelerator,
    setup_run,
    setup_training_eval,
)
from lora_db.training.stopping import StopRequest, TrainingInterrupted, stop_on_signals, stop_requested
from lora_db.training.tracking import (
    PROJECT,
    hyperparameters,
    resolve_tracker,
    tracked,
    tracker_init_kwargs,
)

logger = logging.getLogger("lora_db")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    validation_dir: Path | None = None


# -- state of a run -------------------------------------------------------------------------------------------------


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the process was killed mid-write
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files and folders of ours that a killed run left behind (never anything else)."""
    ours = (".checkpoint-", *(f".{name}." for name in RUN_FILES))
    for path in output_dir.glob(".*.tmp"):
        if path.name.startswith(ours):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# -- the run --------------------------------------------------------------------------------------------------------


def micro_batch_loss(run: Run, micro_step: int) -> torch.Tensor:
    """Loss of one micro-batch: instance MSE + prior_loss_weight x class MSE (class examples share the batch), each
    example's MSE times its concept's weight. One source whose examples weigh alike (the usual run) is batched as it
    comes: nothing concatenated, no weights indexed."""
    config, accelerator = run.config, run.accelerator
    latents, clips, texts, weights = [], [], [], []
    for source in run.sources:
        pairs = batch_indices(
            len(source),
            config.train_batch_size,
            micro_step,
            config.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
        batch_latents, batch_clips, batch_prompts = source.batch(pairs, run.generator)
        latents.append(batch_latents)
        clips.append(batch_clips)
        texts.extend(batch_prompts)
        weights.append(source.weights(pairs))
    single = len(run.sources) == 1
    with accelerator.autocast():
        per_example = dreambooth_loss(
            run.wrapped["unet"],
            latents[0] if single else torch.cat(latents),
            clips[0] if single else torch.cat(clips),
            run.prompts(texts),
            run.noise_scheduler,
            run.generator,
            config.uncond_prob,
            noise_offset=config.noise_offset,
            snr_gamma=config.snr_gamma,
        )
    if single:
        return (per_example * weights[0]).mean()
    n = config.train_batch_size
    per_example = per_example * torch.cat([torch.as_tensor(w, device=per_example.device).expand(n) for w in weights])
    return per_example[:n].mean() + config.prior_loss_weight * per_example[n:].mean()


class StepAbandoned(Exception):
    """A stop request arrived between two micro-batches of a step: the step is dropped, not finished."""


def optimizer_step(run: Run, step: int, stop_requested=lambda: False) -> torch.Tensor:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss.

    `stop_requested` is asked before every micro-batch after the first: a stop signal is answered within one
    micro-batch (a step of many can take minutes), by raising StepAbandoned with no update made."""
    config, accelerator = run.config, run.accelerator
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        if micro > 0 and stop_requested():
            raise StepAbandoned
        with contextlib.ExitStack() as stack:
            if micro < accumulation - 1:  # gradients are all-reduced only on the last micro-batch
                for module in run.wrapped.values():
                    stack.enter_context(accelerator.no_sync(module))
            loss = micro_batch_loss(run, step * accumulation + micro)
            check_loss(config, loss, step, accelerator.is_main_process)
            accelerator.backward(loss / accumulation)
        step_loss += loss.detach() / accumulation
    if config.max_grad_norm > 0:
        run.clip_gradients(run.trainable_parameters, config.max_grad_norm)
    run.step_optimizer.step()
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.update(step + 1)
    run.step_optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, reduction="mean") if accelerator.num_processes > 1 else step_loss


def memory_advice(config: TrainConfig) -> str:
    """The memory options this configuration does not use yet, most effective first."""
    unused = [
        (config.method == "full", "--method lora"),
        (config.mixed_precision == "no", "--mixed-precision bf16"),
        (not config.gradient_checkpointing, "--gradient-checkpointing"),
        (config.optimizer in ("adamw", "prodigy", "schedulefree-adamw"), "--optimizer adamw8bit"),
        (not config.cache_latents and not (config.random_crop or config.random_flip), "--cache-latents"),
        (config.method == "lora" and config.quantize_base == "none", "--quantize-base nf4"),
        (config.train_batch_size > 1, "a smaller --train-batch-size with --gradient-accumulation-steps"),
    ]
    options = [option for applies, option in unused if applies]
    hint = "try " + ", ".join(options) if options else "every memory option is already on; use a larger device"
    return f"{hint} (`lora-db estimate` with the same options predicts the peak)"


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def plan_resume(config: TrainConfig) -> Path | None:
    """Before anything is written: the checkpoint to continue from (None: a new run), refused if it cannot be."""
    if not config.resume_from_checkpoint:
        return None
    checkpoint = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if checkpoint is None:
        finished = [name for name in FINAL_OUTPUTS if (config.output_dir / name).exists()]
        if finished:
            raise LoraDBError(
                f"--resume-from-checkpoint {config.resume_from_checkpoint}: {config.output_dir} holds a finished run "
                f"({finished[0]}) and no checkpoint to continue it from; start afresh with --overwrite or choose "
                "another --output-dir (with --checkpointing-steps a finished run can be trained further)"
            )
        logger.warning("no checkpoint in %s yet: starting a new run", config.output_dir)
        return None
    check_resume(config, checkpoint)
    return checkpoint


def resume(run: Run, checkpoint: Path | None) -> int:
    """Restore `checkpoint` (checked by plan_resume); returns the step to continue from."""
    config = run.config
    step = 0
    if checkpoint is not None:
        step = restore(
            checkpoint,
            run.models,
            run.optimizer,
            run.lr_scheduler,
            run.generator,
            run.accelerator,
            config.seed,
            ema=run.ema,
        )
        logger.info("resumed from %s at step %d", checkpoint, step)
        saved = (read_run_record(checkpoint) or {}).get("config")
        if saved is not None and learning_rates(saved) != learning_rates(config.to_dict()):
            lower_learning_rates(run.optimizer, run.lr_scheduler, run.models.trained, saved, config.to_dict())
            logger.info("learning rates lowered from the checkpoint's: %s", learning_rates(config.to_dict()))
        if config.lr_scheduler != "constant":
            logger.info("the %s learning-rate schedule spans %d steps", config.lr_scheduler, config.max_train_steps)
    if run.accelerator.is_main_process:
        truncate_metrics(config.output_dir / METRICS_FILE, step)
        retire_later_checkpoints(config.output_dir, step)
    return step


def checked_weights(run: Run, step: int) -> None:
    """check_weights after update `step`, naming the last step found sane if a divergence is found."""
    check_weights(run.config, run.models, step, run.accelerator.is_main_process, run.weights_checked)
    run.weights_checked = step


def checkpoint(run: Run, step: int, record: dict | None = None) -> Path | None:
    checkpoint_weights(run)  # the next step takes the weights it trains at again
    checked_weights(run, step)
    rng = rng_state(run.generator, run.accelerator)  # a collective: every process takes part
    if not run.accelerator.is_main_process:
        return None
    state = TrainingState(
        step,
        trainable_state(run.models),
        run.optimizer.state_dict(),
        run.lr_scheduler.state_dict(),
        rng,
        scaler_state(run.accelerator),
        ema=run.ema.state_dict() if run.ema is not None else None,
    )
    records = {RUN_RECORD: record} if record is not None else None
    return save_checkpoint(run.config.output_dir, state, run.config.checkpoints_total_limit, records)


def stopped(run: Run, stop: StopRequest, step: int, record: dict | None, start_step: int) -> TrainingInterrupted:
    """A stop signal after `step` finished steps: a checkpoint of them (none if this run finished none), and the
    error that says where it is and how to continue."""
    signal = stop.name or "a signal to another process"
    resume = "continue with the same command and --resume-from-checkpoint latest"
    if step == start_step:
        done = "nothing was trained yet" if step == 0 else f"nothing new since step {step}; {resume}"
        message = f"stopped by {signal} before step {step + 1} finished; {done}"
    else:
        started = time.perf_counter()
        saved = checkpoint(run, step, record)
        stop.note_checkpoint(time.perf_counter() - started, saved)
        where = f"saved to {saved}" if saved is not None else "saved by the main process"
        message = f"stopped by {signal} at step {step}; checkpoint {where} in {stop.checkpoint_s:.1f} s; {resume}"
    # One message per run, from the process that saved.
    return TrainingInterrupted(message, stop.signum or 15, quiet=not run.accelerator.is_main_process)


def _is_main_launch_process() -> bool:
    # torchrun and accelerate launch set RANK; the lock is the main process's before accelerate is set up.
    return int(os.environ.get("RANK", "0")) == 0


def train(config: TrainConfig) -> TrainResult:
    config.require_run_inputs()
    lock = output_lock(config.output_dir, "--output-dir") if _is_main_launch_process() else contextlib.nullcontext()
    with lock, stop_on_signals() as stop:
        config = check_before_loading(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        start_from = plan_resume(config)
        accelerator = setup_accelerator(config)
        try:
            return _train(config, accelerator, stop, start_from)
        except BaseException as err:
            # The failed frames' locals hold the DDP wrappers: let them go now, before the process group (see below).
            traceback.clear_frames(err.__traceback__)
            raise
        finally:
            release_distributed_state(accelerator)


def release_distributed_state(accelerator) -> None:
    """Tear down DDP and the process group in the one order that cannot deadlock, on every way out of a run.

    gloo's process group joins its worker threads when it is destroyed, and a worker may need the GIL at that
    moment (to free the tensors of a finished collective). torch releases the GIL when the process group's own
    Python object dies, but not when a DDP Reducer drops the last reference: that deadlocked two-process runs at
    exit, intermittently. So the DDP wrappers go first, while the process group is still registered, and
    `destroy_process_group` then drops its last reference. Clearing accelerate's process-wide state lets a
    notebook or a test call train() again with other settings.
    """
    from accelerate.state import AcceleratorState

    accelerator.free_memory()  # accelerate's own references to the DDP wrappers
    gc.collect()  # DDP modules sit in reference cycles
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def _train(config: TrainConfig, accelerator, stop: StopRequest, start_from: Path | None) -> TrainResult:
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    try:
        run = setup_run(config, accelerator)
    except (RuntimeError, MemoryError) as err:
        if not _is_out_of_memory(err):
            raise
        where = accelerator.device.type
        raise LoraDBError(
            f"out of {where} memory while setting up (loading the model): {memory_advice(config)}"
        ) from None
    run.compiled = compile_unet(run, micro_batch_loss)
    record = None
    if accelerator.is_main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(config.output_dir)
        if config.overwrite:
            _clear_previous_run(config.output_dir)
        atomic_write_json(config.output_dir / "config.json", run_record(config, {})["config"])
        record = run_record(config, data_digest(config))
    if config.eval_steps and accelerator.is_main_process:
        run.evaluator = setup_training_eval(config, run.models, accelerator)  # before resume: the base's samples
    start_step = resume(run, start_from)
    try:
        return _loop(run, stop, start_step, record)
    except (WriteError, OSError) as err:
        # Also what a library writes for us (a tracker's event file) fills the disk: the same message, the same rescue.
        failed = err if isinstance(err, WriteError) else _write_failure(err, config.output_dir)
        if failed is None:
            raise
        if not accelerator.is_main_process or run.output_path is not None:
            raise failed from err
        evaluation_weights(run)
        raise rescue_weights(config, run.models, run.steps_done, failed) from err


def _write_failure(err: OSError, output_dir: Path) -> WriteError | None:
    """A library's own write that failed for want of space or a writable disk (a read error is no such thing)."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    return explain_os_error(err, err.filename or output_dir)


def _loop(run: Run, stop: StopRequest, start_step: int, record: dict | None) -> TrainResult:
    config, accelerator = run.config, run.accelerator
    device = accelerator.device
    metrics_path = config.output_dir / METRICS_FILE
    run.steps_done = run.weights_checked = start_step  # a resumed checkpoint was checked before it was written
    if accelerator.log_with:
        tracker = resolve_tracker(config.report_to)
        init_kwargs = tracker_init_kwargs(tracker, config.output_dir) if accelerator.is_main_process else {}
        tracked(
            accelerator, accelerator.init_trackers, PROJECT, config=hyperparameters(config), init_kwargs=init_kwargs
        )
    trainable = count_parameters(*run.models.trained.values(), trainable_only=True)
    logger.info(
        "training %s of %s parameters (%s)",
        f"{trainable:,}",
        f"{count_parameters(run.models.unet, run.models.text_encoder):,}",
        config.method,
    )
    from tqdm.auto import tqdm

    progress = tqdm(
        total=config.max_train_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    losses: list[float] = []
    validation_dir = None
    reset_peak_memory(device)
    step = start_step
    loop_started = time.perf_counter()
    stop.armed = True
    with progress:  # closed on any way out, so an error line starts a line of its own
        while step < config.max_train_steps:
            started = time.perf_counter()
            before = local_rng_state(run.generator) if config.gradient_accumulation_steps > 1 else None
            try:
                training_weights(run)
                loss = optimizer_step(run, step, lambda: stop_requested(stop, accelerator)).item()
            except StepAbandoned:
                # The step's micro-batches are dropped and its random draws put back: resuming repeats it exactly.
                run.optimizer.zero_grad(set_to_none=True)
                set_local_rng_state(run.generator, before)
                raise stopped(run, stop, step, record, start_step) from None
            except (RuntimeError, MemoryError) as err:
                if not _is_out_of_memory(err):
                    raise
                raise LoraDBError(f"out of {device.type} memory at step {step + 1}: {memory_advice(config)}") from None
            step += 1
            run.steps_done = step
            is_last = step == config.max_train_steps
            evaluating = config.eval_steps > 0 and (step % config.eval_steps == 0 or is_last)
            validating = config.validation_prompt is not None and (step % config.validation_steps == 0 or is_last)
            if weights_check_due(step, config.max_train_steps) or evaluating or validating:
                checked_weights(run, step)  # saves check for themselves (checkpoint, save_outputs)
            losses.append(loss)
            stop.step_s = time.perf_counter() - started
            metrics = {
                "step": step,
                "loss": loss,
                "lr": current_learning_rate(run.optimizer, run.lr_scheduler),
                "peak_memory_bytes": peak_memory_bytes(device),
                "step_time_s": stop.step_s,
                "elapsed_s": time.perf_counter() - loop_started,  # the loop's own work between steps included
            }
            if evaluating:
                evaluation_weights(run)  # on every process, so that all switch back alike
                if run.evaluator is not None:
                    with sampling_mode(config, run.models, accelerator):
                        metrics.update(run.evaluator(step))
            if accelerator.is_main_process:
                append_line(metrics_path, json.dumps(metrics))
            if accelerator.log_with:
                tracked(accelerator, accelerator.log, metrics, step=step)
            # Shown at the bar's next refresh (at most every 0.1 s): a forced refresh was 0.1 ms of every step.
            progress.set_postfix(
                loss=f"{loss:.4f}", peak=f"{metrics['peak_memory_bytes'] / 2**30:.2f}GiB", refresh=False
            )
            progress.update(1)

            if stop_requested(stop, accelerator):
                raise stopped(run, stop, step, record, start_step)
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                started = time.perf_counter()
                stop.note_checkpoint(time.perf_counter() - started, checkpoint(run, step, record))
            if validating:
                evaluation_weights(run)  # a checkpoint just now put the trained weights back
                if accelerator.is_main_process:
                    validation_dir = run_validation(config, run.models, accelerator, step)
                    release_idle_modules(config, run.models.pipe)
                accelerator.wait_for_everyone()

    adapter_path = None
    divergence = replica_divergence(run) if accelerator.num_processes > 1 else 0.0
    if divergence > 0:
        logger.warning(
            "the %d processes ended with different weights (max difference %.3g): the saved adapter is the main "
            "process's",
            accelerator.num_processes,
            divergence,
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        evaluation_weights(run)
        adapter_path = run.output_path = save_outputs(config, run.models, step)
        if run.ema is not None:  # the trained weights beside their average
            run.ema.restore()
            save_outputs(config, run.models, step, RAW_ADAPTER_FILE)
        summary = {
            "steps": step,
            "final_loss": losses[-1] if losses else None,
            "trainable_parameters": trainable,
            "peak_memory_bytes": peak_memory_bytes(device),
            "setup_memory_bytes": run.setup_memory_bytes,
            "device": str(device),
            "num_processes": accelerator.num_processes,
            "replica_max_abs_difference": divergence,
            **({"compile": run.compiled} if run.compiled else {}),
            "output": str(adapter_path),
        }
        atomic_write_json(config.output_dir / "summary.json", summary)
        write_model_card(config, summary, adapter_path)
    for tracker in accelerator.trackers:
        tracker.finish()  # accelerator.end_training() would also destroy the process group while DDP holds it
    if config.push_to_hub and accelerator.is_main_process:
        push_run(config, step)
    return TrainResult(config.output_dir, adapter_path, step, losses, validation_dir)
