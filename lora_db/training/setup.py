"""Setting up a training run: every check that needs no weights, then accelerate, the model, class images, LoRA
injection, the optimizer and the example sources, each in a function of its own that `lora-db estimate` reuses.

`setup_run(config, accelerator)` returns the `Run` the loop in lora_db.training.loop reads top to bottom."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lora_db.adapters.layers import check_rank, inject_lora
from lora_db.adapters.spec import LoraSpec
from lora_db.adapters.tokens import install_trainable_token
from lora_db.adapters.variants import load_init_adapter, lora_spec
from lora_db.config.train import TEXT_ENCODER_TARGETS, TrainConfig
from lora_db.errors import LoraDBError
from lora_db.evaluation.judge import load_model_judge
from lora_db.evaluation.metrics import TrainingEval
from lora_db.images import find_images, load_image
from lora_db.layout import (
    ABANDONED_DIR,
    ADAPTER_FILE,
    CHECKPOINT_PATTERN,
    METRICS_FILE,
    RAW_ADAPTER_FILE,
    list_checkpoints,
    written_by_training,
)
from lora_db.models.loading import check_resolution, load_pipeline, load_unet_config, native_resolution
from lora_db.models.memory import (
    check_attention_backend,
    check_mixed_precision,
    current_memory_bytes,
    eager_calls,
    enable_text_encoder_gradient_checkpointing,
    enable_uvit_gradient_checkpointing,
    set_attention_backend,
    upcast_trainable,
    weight_dtype,
)
from lora_db.models.quantize import check_quantization, quantize_pipeline
from lora_db.training.checkpoint import trainable_state
from lora_db.training.concepts import class_records, instance_records
from lora_db.training.data import check_caption_lengths, scan_images
from lora_db.training.ema import EMA, setup_ema
from lora_db.training.examples import ExampleSource, PromptEncoder, example_source
from lora_db.training.hub import check_hub_access
from lora_db.training.latent_cache import LatentCache
from lora_db.training.optimizers import check_optimizer, gradient_clipper, setup_optimizer, stepped_optimizer
from lora_db.training.tracking import resolve_tracker

logger = logging.getLogger("lora_db")


RUN_FILES = (ADAPTER_FILE, RAW_ADAPTER_FILE, METRICS_FILE, "config.json", "summary.json", "unet", ABANDONED_DIR)


FINAL_OUTPUTS = (ADAPTER_FILE, "unet", "summary.json")


@dataclass
class Models:
    """What the loop needs: the pipeline, the trained modules and the frozen text path."""

    pipe: object
    unet: nn.Module
    text_encoder: nn.Module
    specs: dict[str, LoraSpec]
    trained: dict[str, nn.Module]

    @functools.cached_property
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """component.parameter -> each trained parameter. Fixed once set up and read after every step: walking the
        U-ViT's modules for them each time cost milliseconds a step (benchmarks/README.md, Speed)."""
        return trainable_state(self)


def check_before_loading(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Every check that needs no weights; returns the config with the resolution filled in."""
    config.require_run_inputs()
    check_attention_backend(config.attention)
    check_optimizer(config)
    check_mixed_precision(config.mixed_precision, device)
    resolve_tracker(config.report_to)
    if config.push_to_hub:
        check_hub_access(config.push_to_hub)
    check_quantization(config.quantize_base, device, weight_dtype(config.mixed_precision))
    unet_config = load_unet_config(config.model)
    resolution = config.resolution or native_resolution(unet_config)
    check_resolution(resolution, unet_config, config.model)
    check_output_dir(config)
    return replace(config, resolution=resolution, alpha=config.lora_alpha)


def check_output_dir(config: TrainConfig) -> None:
    output_dir = config.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise LoraDBError(f"--output-dir {output_dir} is a file; choose a folder")
    checkpoints = list_checkpoints(output_dir)
    holds_run = output_dir.is_dir() and (any((output_dir / name).exists() for name in RUN_FILES) or checkpoints)
    if holds_run and not (config.resume_from_checkpoint or config.overwrite):
        finished = not checkpoints and any((output_dir / name).exists() for name in FINAL_OUTPUTS)
        advice = (
            "it has no checkpoint to continue from: start afresh with --overwrite, or choose another folder"
            if finished
            else "continue it with --resume-from-checkpoint latest, start afresh with --overwrite, or choose another "
            "folder"
        )
        raise LoraDBError(f"--output-dir {output_dir} already holds a run; {advice}")
    if config.overwrite:
        _check_all_written_by_training(output_dir)


def _previous_run_files(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    named = [output_dir / name for name in RUN_FILES if os.path.lexists(output_dir / name)]
    return named + [p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name)]


def _check_all_written_by_training(output_dir: Path) -> None:
    """--overwrite removes a previous run's files; one that lora-db did not write under that name stops it."""
    foreign = [path.name for path in _previous_run_files(output_dir) if not written_by_training(path)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LoraDBError(
            f"--output-dir {output_dir} holds {shown}, named like a run's files but not written by lora-db; "
            "--overwrite removes only what lora-db wrote: move them out, or choose another folder"
        )


def _clear_previous_run(output_dir: Path) -> None:
    """--overwrite: remove only what an earlier lora-db run wrote, never other files (checked again under the lock:
    the folder may have changed since the checks before loading)."""
    _check_all_written_by_training(output_dir)
    for path in _previous_run_files(output_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def setup_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.method == "full")]
    return Accelerator(
        # Without cpu=True accelerate only forms a process group on accelerators; torchrun on CPUs needs gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=resolve_tracker(config.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(config.output_dir), logging_dir=str(config.output_dir / "logs")
        ),
        kwargs_handlers=kwargs_handlers,
    )


def quantize_base(config: TrainConfig, pipe, dtype: torch.dtype, device: torch.device) -> None:
    """--quantize-base: the U-ViT (and a trained text encoder) quantized layer by layer onto the device."""
    quantize_pipeline(pipe, config.quantize_base, dtype, device, text_encoder=config.train_text_encoder)


def setup_models(config: TrainConfig, pipe, dtype: torch.dtype, device: torch.device) -> Models:
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for module in (pipe.vae, text_encoder, pipe.image_encoder, pipe.text_decoder, unet):
        module.requires_grad_(False)
    pipe.to(device=device, dtype=dtype)
    quantize_base(config, pipe, dtype, device)  # before LoRA: peft then picks its bitsandbytes LoRA layers
    specs: dict[str, LoraSpec] = {}
    trained: dict[str, nn.Module] = {"unet": unet}
    if config.method == "lora":
        specs["unet"] = lora_spec(config, tuple(config.target_modules))
        check_rank(unet, specs["unet"], "U-ViT")
        inject_lora(unet, specs["unet"])
        if config.train_text_encoder:
            specs["text_encoder"] = lora_spec(config, TEXT_ENCODER_TARGETS)
            check_rank(text_encoder, specs["text_encoder"], "text encoder")
            inject_lora(text_encoder, specs["text_encoder"])
            trained["text_encoder"] = text_encoder
        if config.train_token is not None:  # pivotal tuning: the new token's embedding trains too
            install_trainable_token(pipe, config.train_token, config.init_token)
            trained["text_encoder"] = text_encoder
        if config.init_adapter is not None:
            load_init_adapter(config, specs, trained)
    else:
        unet.requires_grad_(True)
    upcast_trainable(*trained.values())
    set_attention_backend(unet, config.attention)
    if config.gradient_checkpointing:
        enable_uvit_gradient_checkpointing(unet)
        if config.trains_text_encoder:
            enable_text_encoder_gradient_checkpointing(text_encoder)
    for module in trained.values():
        module.train()
    return Models(pipe=pipe, unet=unet, text_encoder=text_encoder, specs=specs, trained=trained)


def idle_modules(config: TrainConfig, pipe) -> list[nn.Module]:
    """What the loop never calls: the caption decoder's GPT-2 (a step and t2i sampling use only its 768->64
    prefix projection), the VAE and image encoder once latents are cached, and the text encoder when it is not
    trained (every prompt is encoded once, before the loop)."""
    decoder = pipe.text_decoder
    idle = [decoder.transformer, decoder.decode_prefix]
    if config.encodes_once:
        idle += [pipe.vae, pipe.image_encoder]
    if not config.trains_text_encoder:
        idle.append(pipe.text_encoder)
    return idle


def release_idle_modules(config: TrainConfig, pipe) -> None:
    """Nothing idle on the device: what validation samples with goes to the CPU (or stays, with
    --keep-sampling-encoders), everything else is dropped."""
    sampling = {pipe.vae, pipe.image_encoder, pipe.text_encoder} if samples_during_training(config) else set()
    moved = False
    for module in idle_modules(config, pipe):
        if module in sampling and config.keep_sampling_encoders:
            continue
        before = _device_of(module)
        module.to("cpu" if module in sampling else "meta")
        moved = moved or _device_of(module) != before
    if moved:  # a full collection took 1.7 s with tiny-world loaded: twice per validation on a CPU, freeing nothing
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def samples_during_training(config: TrainConfig) -> bool:
    return config.validation_prompt is not None or config.eval_steps > 0


def setup_training_eval(config: TrainConfig, models: Models, accelerator):
    """The --eval-steps scorer, built on the untrained model (its class samples are the base model's), with the
    model's judge when its folder ships one. With several concepts it scores the first."""
    concept = config.concepts()[0]
    photos = [load_image(path) for path in find_images(concept.folder, "--instance-dir")]
    prompt = concept.instance_prompt or scan_images(concept.folder, None)[0].prompt  # captions: the first one
    with sampling_mode(config, models, accelerator):
        return TrainingEval(
            models.pipe,
            photos,
            prompt,
            concept.class_prompt,
            validation_prompt=config.validation_prompt,
            judge=load_model_judge(config.model, models.pipe),
            num_images=config.num_eval_images,
            seed=config.seed,
            num_inference_steps=config.validation_inference_steps,
            guidance_scale=config.validation_guidance_scale,
            autocast=accelerator.autocast,
        )


def encoders_to_device(config: TrainConfig, pipe, names: tuple[str, ...], device: torch.device) -> None:
    """What sampling calls, onto the device (where --keep-sampling-encoders left them, nothing moves)."""
    if config.keep_sampling_encoders and samples_during_training(config):
        return
    for name in names:
        getattr(pipe, name).to(device)


@contextlib.contextmanager
def sampling_mode(config: TrainConfig, models: Models, accelerator):
    """Encoders on the device and trained modules in eval mode while sampling; back to training afterwards."""
    for module in models.trained.values():
        module.eval()
    encoders_to_device(config, models.pipe, ("vae", "image_encoder", "text_encoder"), accelerator.device)
    try:
        with eager_calls():  # --compile compiled the training step, not sampling
            yield
    finally:
        for module in models.trained.values():
            module.train()
        release_idle_modules(config, models.pipe)


@dataclass
class Run:
    """Everything the loop touches, built by `setup_run`."""

    config: TrainConfig
    accelerator: object
    models: Models
    sources: list[ExampleSource]
    prompts: PromptEncoder
    noise_scheduler: object
    optimizer: object
    lr_scheduler: object
    wrapped: dict[str, nn.Module]  # what accelerate returned for each trained module: call these, not the originals
    generator: torch.Generator
    setup_memory_bytes: int = 0
    steps_done: int = 0
    weights_checked: int = 0  # the last step whose trained weights check_weights found sane
    output_path: Path | None = None  # the adapter (or U-ViT folder) once written
    evaluator: object = None  # --eval-steps: an evaluate.TrainingEval on the main process
    ema: EMA | None = None  # --use-ema: the moving average of the trained weights
    compiled: dict | None = None  # --compile: what lora_db.training.compiling.compile_unet did

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.models.named_trainable.values())

    @functools.cached_property
    def step_optimizer(self):
        """What each step steps and zeroes (`optimizers.stepped_optimizer`), decided once: `optimizer` itself is
        accelerate's wrapper, which checkpoints save and load."""
        return stepped_optimizer(self.optimizer)

    @functools.cached_property
    def clip_gradients(self):
        """clip_grad_norm_(parameters, max_norm), decided once (`optimizers.gradient_clipper`)."""
        return gradient_clipper(self.accelerator)


def setup_run(config: TrainConfig, accelerator) -> Run:
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    device = accelerator.device
    instances = instance_records(config)
    if config.train_token is not None and not any(config.train_token in record.prompt for record in instances):
        raise LoraDBError(
            f"--train-token {config.train_token} is in no training prompt, so it would learn nothing; put it in "
            f'--instance-prompt (e.g. "a photo of {config.train_token} {config.init_token}") or the captions'
        )
    dtype = weight_dtype(config.mixed_precision)
    set_seed(config.seed)
    pipe = load_pipeline(config.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    quantize_base(config, pipe, dtype, device)  # before the rest moves: never the whole bf16 U-ViT on the device
    pipe.to(device)
    classes = class_records(config, pipe, accelerator)
    check_caption_lengths(
        pipe.clip_tokenizer,
        instances + classes,
        {"--validation-prompt": config.validation_prompt},
        strict=config.strict,
    )

    torch.manual_seed(config.seed)  # LoRA initialisation
    models = setup_models(config, pipe, dtype, device)

    disk = LatentCache(config.cache_latents_dir, pipe, dtype, config.resolution) if config.cache_latents_dir else None
    sources = [example_source(config, instances, pipe, dtype, device, disk)]
    if classes:
        sources.append(example_source(config, classes, pipe, dtype, device, disk))
    if disk is not None:
        logger.info("--cache-latents-dir %s: %d images encoded, %d read back", disk.folder, disk.written, disk.reused)
    optimizer, lr_scheduler = setup_optimizer(config, models)
    prepared = accelerator.prepare(*models.trained.values(), optimizer)
    wrapped, optimizer = dict(zip(models.trained, prepared[:-1], strict=True)), prepared[-1]
    prompts = PromptEncoder(
        pipe, device, trainable=config.trains_text_encoder, text_encoder=wrapped.get("text_encoder")
    )
    if not config.trains_text_encoder:
        prompts.precompute({r.prompt for r in instances + classes})
    release_idle_modules(config, pipe)
    generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + accelerator.process_index)
    return Run(
        config=config,
        accelerator=accelerator,
        models=models,
        sources=sources,
        prompts=prompts,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        wrapped=wrapped,
        generator=generator,
        ema=setup_ema(config, trainable_state(models)),
        setup_memory_bytes=current_memory_bytes(device),
    )
