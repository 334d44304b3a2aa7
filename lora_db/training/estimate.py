"""Predict the peak device memory of a training configuration without running it on that device.

    lora-db estimate --model random:unidiffuser-v1 --mixed-precision bf16 --gradient-checkpointing \
        --optimizer adamw8bit --cache-latents --gpu-memory 24GB

    from lora_db import TrainConfig
    from lora_db import estimate_memory
    print(estimate_memory(TrainConfig(model="random:unidiffuser-v1", mixed_precision="bf16")).format())

The pipeline is built on the meta device (shapes and dtypes, no weights) and turned into fake tensors
(torch's FakeTensorMode: no memory, no arithmetic). Then the training code itself sets it up (`setup_models`:
LoRA injection, dtypes, checkpointing, attention; `ExampleSource`, `PromptEncoder`, `release_idle_modules`,
`setup_optimizer`) and two optimizer steps of `micro_batch_loss` + backward + clipping + optimizer step run under
torch's MemTracker, which files every tensor as weights, gradients, optimizer state, activation or temporary and
records the peak. Two steps, because Adam's states only exist from the first step on. The real-size model takes
seconds on a CPU. A quantized base (`--quantize-base`) is quantized by bitsandbytes' own code through its fake
kernels, so packed weights and quantization constants are counted as training holds them; NF4's fused matmul op
is traced through bitsandbytes' default implementation (dequantize the weight, then multiply), which the CPU runs.

What the trace does not see is added beside it: on CUDA the context (~0.5 GiB, printed, not measured here); on a
CPU the buffers kernels allocate inside themselves, as measured (`cpu_process_bytes`). Not counted: the caching
allocator's slack (reserved minus allocated). The trace runs with CPU kernels and CPU autocast (fake CUDA tensors
need a CUDA build of torch); of the CUDA differences, torch's foreach AdamW (one temporary the size of the trained
weights) is modelled; the fp32 outputs of CUDA autocast's layer norms and the int8 copy of each input that
bitsandbytes' CUDA int8 matmul keeps (its CPU matmul does not) are not.
benchmarks/README.md compares the estimate with measurements.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY as _TOTAL
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState

from lora_db.config.train import TrainConfig
from lora_db.errors import LoraDBError
from lora_db.images import find_images
from lora_db.models.loading import (
    check_resolution,
    load_options,
    load_unet_config,
    local_model,
    native_resolution,
    random_preset,
)
from lora_db.models.memory import check_mixed_precision, count_parameters, weight_dtype
from lora_db.models.quantize import check_quantization, quantization_tensors
from lora_db.models.random import build_random_pipeline
from lora_db.training.checkpoint import trainable_state
from lora_db.training.data import ImageRecord, scan_images
from lora_db.training.ema import setup_ema
from lora_db.training.examples import PromptEncoder, example_source
from lora_db.training.loop import micro_batch_loss
from lora_db.training.optimizers import check_optimizer, setup_optimizer
from lora_db.training.setup import Run, release_idle_modules, setup_models
from lora_db.training.traced_kernels import host_tensors_stay_real_mode, kernels_mode

GiB = 2**30
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context + kernels of torch on a current GPU; not counted by the allocator
REDUCED_PRECISION_KERNEL_BYTES = 24 * 2**20  # see cpu_process_bytes
TEXT_ENCODER_BACKWARD_KERNEL_BYTES = 10 * 2**20  # see cpu_process_bytes
COMPILED_GRAPHS_BYTES = 36 * 2**20  # --compile on a CPU: see cpu_process_bytes
FEED_FORWARD_MULT = 4  # the U-ViT's feed-forward hidden width over its model width (diffusers' FeedForward)
COMPONENTS = ("unet", "text_encoder", "text_decoder", "vae", "image_encoder")
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries", "other")
_TRACKER_CATEGORIES = {  # MemTracker's reference types -> our names
    "Parameter": "weights",
    "Buffer": "weights",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}
_TRACED_STEPS = 2  # the second step is the first to start with the optimizer's states allocated


@dataclass
class ComponentMemory:
    weights: int = 0  # parameters and buffers resident during the step
    gradients: int = 0
    optimizer: int = 0
    saved_activations: int = 0  # kept by its forward for the backward pass
    resident: bool = True
    note: str = ""


@dataclass
class MemoryEstimate:
    """Bytes of one training configuration's step on `device` ("cuda" or "cpu")."""

    model: str
    device: str
    resolution: int
    batch: int  # examples per U-ViT call (instance + class)
    trainable_parameters: int
    components: dict[str, ComponentMemory]
    at_peak: dict[str, int]  # category -> bytes held at the moment of the peak
    peak_bytes: int  # tensors alive at the peak of a training step
    setup_bytes: int  # tensors alive when the loop starts (weights, buffers, caches)
    notes: list[str] = field(default_factory=list)
    process_bytes: int = 0  # on a CPU: what the process holds at the peak besides tensors (`cpu_process_bytes`)

    @property
    def context_bytes(self) -> int:
        return CUDA_CONTEXT_BYTES if self.device == "cuda" else 0

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.context_bytes + self.process_bytes

    def fits(self, memory_bytes: int) -> bool:
        return self.total_bytes <= memory_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "resolution": self.resolution,
            "batch": self.batch,
            "trainable_parameters": self.trainable_parameters,
            "peak_bytes": self.peak_bytes,
            "setup_bytes": self.setup_bytes,
            "context_bytes": self.context_bytes,
            "process_bytes": self.process_bytes,
            "total_bytes": self.total_bytes,
            "at_peak": dict(self.at_peak),
            "components": {name: vars(c) for name, c in self.components.items()},
            "notes": list(self.notes),
        }

    def format(self, memory_bytes: int | None = None) -> str:
        """The breakdown as a small table, and whether it fits in `memory_bytes`."""
        lines = [
            f"Estimated memory of one training step: {self.model}, {self.resolution} px, "
            f"{self.batch} example(s) per step, {self.trainable_parameters:,} trainable parameters, on {self.device}",
            "",
            f"{'component':<14}{'weights':>12}{'gradients':>12}{'optimizer':>12}{'saved act.':>12}",
        ]
        for name, part in self.components.items():
            if not part.resident:
                lines.append(f"{name:<14}{'not resident':>12}  ({part.note})")
                continue
            cells = [part.weights, part.gradients, part.optimizer, part.saved_activations]
            lines.append(f"{name:<14}" + "".join(f"{format_bytes(v) if v else '-':>12}" for v in cells))
        held = ", ".join(f"{name} {format_bytes(self.at_peak.get(name, 0))}" for name in CATEGORIES)
        lines += ["", f"at the peak: {held}", f"{'peak of the step':<34}{format_bytes(self.peak_bytes):>12}"]
        if self.device == "cuda":
            lines.append(f"{'CUDA context (approx., not above)':<34}{format_bytes(self.context_bytes):>12}")
        else:
            lines.append(f"{'CPU, beside tensors (measured)':<34}{format_bytes(self.process_bytes):>12}")
        lines.append(f"{'total':<34}{format_bytes(self.total_bytes):>12}")
        if memory_bytes is not None:
            spare = memory_bytes - self.total_bytes
            verdict, margin = ("fits", "to spare") if self.fits(memory_bytes) else ("does NOT fit", "short")
            lines.append(
                f"{verdict} in {format_bytes(memory_bytes)} ({format_bytes(abs(spare))} {margin}; "
                "PyTorch's caching allocator reserves somewhat more than it allocates)"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def format_bytes(value: int) -> str:
    if abs(value) >= GiB:
        return f"{value / GiB:.2f} GiB"
    if abs(value) >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**10:.1f} KiB"


def local_gpu_bytes() -> int | None:
    """This machine's first GPU's memory, or None without one."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


# -- the model, on no memory at all ------------------------------------------------------------------------------


def meta_pipeline(model: str):
    """The pipeline's modules on the meta device: shapes and dtypes of the real thing, no weights loaded."""

    model = local_model(model)
    preset = random_preset(model)
    if preset is not None:
        return build_random_pipeline(preset, device="meta")
    return _meta_pipeline_from_configs(model)


def _meta_pipeline_from_configs(model: str):
    from diffusers import AutoencoderKL, UniDiffuserModel, UniDiffuserPipeline, UniDiffuserTextDecoder
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    load_unet_config(model)  # a clear error if the folder or hub id is not there
    options = load_options(model)  # the hub's local cache when the hub is out of reach
    with torch.device("meta"):
        components = {
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae", **options)),
            "unet": UniDiffuserModel.from_config(UniDiffuserModel.load_config(model, subfolder="unet", **options)),
            "text_decoder": UniDiffuserTextDecoder.from_config(
                UniDiffuserTextDecoder.load_config(model, subfolder="text_decoder", **options)
            ),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder", **options)),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig.from_pretrained(model, subfolder="image_encoder", **options)
            ),
        }
    # Modules passed in are taken as they are: only tokenizers, image processor and scheduler are read.
    return UniDiffuserPipeline.from_pretrained(model, **components, **options)


# -- fake tensors -----------------------------------------------------------------------------------------------


def fake_tensor_mode():
    """A FakeTensorMode in which modules can still be moved with `.to()`.

    Module.to() swaps FakeTensor parameters in place, and torch refuses to swap a tensor that something holds a
    weak reference to: the fake mode's memo of converted tensors does. The memo only saves re-conversions.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    return mode


def _materialize(pipe, device: torch.device) -> None:
    for name in COMPONENTS:
        getattr(pipe, name).to_empty(device=device)


# -- the estimate ------------------------------------------------------------------------------------------------


class _SingleProcess:
    """What `micro_batch_loss` asks of accelerate's Accelerator, for one process on the traced device."""

    process_index = 0
    num_processes = 1

    def __init__(self, device: torch.device, mixed_precision: str):
        self.device, self.mixed_precision = device, mixed_precision

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()

        return torch.autocast(self.device.type, dtype=weight_dtype(self.mixed_precision))


def check_estimate_options(config: TrainConfig, device: str) -> tuple[TrainConfig, list[str]]:
    """The checks of `check_before_loading` that concern memory; returns the config with its resolution."""

    if device not in ("cuda", "cpu"):
        raise LoraDBError(f"--device {device}: estimate for cuda or cpu")
    check_optimizer(config)
    check_mixed_precision(config.mixed_precision, torch.device(device))
    check_quantization(config.quantize_base, torch.device(device), weight_dtype(config.mixed_precision), probe=False)
    unet_config = load_unet_config(config.model)
    resolution = config.resolution or native_resolution(unet_config)
    check_resolution(resolution, unet_config, config.model)
    notes = []
    if config.attention == "xformers":
        # xformers needs a GPU to even be selected; its memory-efficient kernel keeps what SDPA's keeps.
        notes.append("xformers attention estimated as PyTorch SDPA (both keep O(tokens) attention memory)")
        config = replace(config, attention="sdpa")
    if config.validation_prompt:
        notes.append("validation sampling between steps is not included")
    if config.optimizer == "prodigy":
        notes.append(
            "Prodigy counted with a copy of every trained weight's start; it keeps a scalar for weights that start "
            "at zero (LoRA's B, LoKr's w1, LoHa's w2_b), so the optimizer column is high by their size"
        )
    if config.use_ema:
        notes.append("the optimizer column includes --use-ema's average, an fp32 copy of every trained weight")
    if config.cache_latents_dir is not None:
        notes.append("--cache-latents-dir: one micro-batch of encodings in memory at a time, whatever the image count")
    if config.compile and device == "cpu":
        notes.append(
            "--compile: the compiled graphs and their generated code counted as measured (36 MiB); the first compile "
            "in a process also loads inductor's code generation (~150 MiB), which, like torch itself, is not counted"
        )
    if config.init_adapter is not None:
        # Its weights only replace the initial values of tensors of the same shapes: the same memory.
        config = replace(config, init_adapter=None)
    return replace(config, resolution=resolution, alpha=config.lora_alpha), notes


def estimate_memory(config: TrainConfig, device: str = "cuda") -> MemoryEstimate:
    """Trace two training steps of `config` on fake tensors and report the peak memory `device` would need."""

    config, notes = check_estimate_options(config, device)
    traced = torch.device("cpu")  # fake CUDA tensors need a CUDA build of torch; the tensors are the same
    mode = fake_tensor_mode()
    with tempfile.TemporaryDirectory() as scratch:
        run = _fake_run(config, device, traced, mode, Path(scratch))
        pipe = run.models.pipe
        tracker = StepTracker([getattr(pipe, name) for name in COMPONENTS])
        cached = [t for source in run.sources for item in source.cache or [] for t in item]
        tracker.track_external(*(getattr(pipe, name) for name in COMPONENTS), run.optimizer, *cached)
        tracker.track_external(*run.prompts.cache.values())
        if run.ema is not None:
            tracker.track_external(*run.ema.average.values())
        # Quantization constants (absmax, scales) are attributes of bitsandbytes' weights, not parameters.
        tracker.track_external(*(t for name in COMPONENTS for t in quantization_tensors(getattr(pipe, name))))
        setup_bytes = _device_total(tracker.get_tracker_snapshot("current"), traced)
        saved: dict[str, int] = {}
        earlier = _autograd_contexts()
        with mode, tracker, host_tensors_stay_real_mode(), kernels_mode(config.quantize_base, device):
            for step in range(_TRACED_STEPS):
                _traced_step(run, step, tracker, saved)
                _end_step_graphs(earlier)
    peak = tracker.get_tracker_snapshot("peak").get(traced, {})
    at_peak = dict.fromkeys(CATEGORIES, 0)
    for kind, value in peak.items():
        if kind != _TOTAL:
            at_peak[_TRACKER_CATEGORIES[str(kind.value)]] += value
    return MemoryEstimate(
        model=config.model,
        device=device,
        resolution=config.resolution,
        batch=config.train_batch_size * len(run.sources),
        trainable_parameters=count_parameters(*run.models.trained.values(), trainable_only=True),
        components=_components(pipe, run.optimizer, saved, run.ema),
        at_peak=at_peak,
        peak_bytes=peak.get(_TOTAL, 0),
        setup_bytes=setup_bytes,
        notes=notes,
        process_bytes=cpu_process_bytes(config, pipe, len(run.sources)) if device == "cpu" else 0,
    )


def cpu_process_bytes(config: TrainConfig, pipe, sources: int) -> int:
    """What a CPU training process holds at its peak besides the tensors the trace sees, as benchmarks/memory.py
    measured it at two model sizes (benchmarks/README.md, How good is the estimate): about one fp32 copy of the
    U-ViT's feed-forward hidden activation, which some op allocates inside itself (the whole under-estimate of the
    fp32 rows: 24-30 MiB at real size, 3-5 MiB for random:small), and with bf16 or fp16 weights the state of
    oneDNN's reduced-precision kernels (23-36 MiB more at either size), and 10 MiB more once the text encoder trains
    in bf16 or fp16: what its first backward leaves allocated (random:small, the process warmed up on the tiny model,
    every tensor freed: 8.8 MiB for the text encoder's first backward alone, 11.4 MiB between whole runs with
    and without it; in fp32 0.4 MiB, and the estimate of that row was within 1 %). With --compile, what the compiled
    U-ViT blocks keep (dynamo's graphs and guards, AOTAutograd's forward and backward, inductor's generated code):
    31 MiB at random:small, 41 MiB at tiny-world and REAL at real size above the same row without it, each row in a
    process of its own with a fresh inductor cache, so that inductor's code generation, loaded by the first compile
    of a process, is in the baseline for every row (with a shared cache the same row measured 24 or 181 MiB more,
    depending on whether the warm-up before the baseline had compiled or hit the cache)."""
    unet = pipe.unet.config
    side = config.resolution // pipe.vae_scale_factor // unet.patch_size
    # Image patches, text tokens, the CLIP image token, both timesteps and (v1) the data-type token.
    tokens = side * side + unet.num_text_tokens + 3 + int(unet.use_data_type_embedding)
    hidden = FEED_FORWARD_MULT * unet.num_attention_heads * unet.attention_head_dim
    reduced = 0
    if config.mixed_precision != "no":
        reduced = REDUCED_PRECISION_KERNEL_BYTES + config.trains_text_encoder * TEXT_ENCODER_BACKWARD_KERNEL_BYTES
    compiled = COMPILED_GRAPHS_BYTES if config.compile else 0
    return config.train_batch_size * sources * tokens * hidden * 4 + reduced + compiled


def _fake_run(config: TrainConfig, device: str, traced: torch.device, mode, scratch: Path):
    """What `train.setup_run` builds, on fake tensors: models, example sources, prompts, optimizer."""
    from diffusers import DDPMScheduler

    dtype = weight_dtype(config.mixed_precision)
    pipe = meta_pipeline(config.model)
    pipe.set_progress_bar_config(disable=True)
    with mode:
        _materialize(pipe, traced)
        models = setup_models(config, pipe, dtype, traced)
        sources = _example_sources(config, pipe, dtype, traced, scratch)
        prompts = PromptEncoder(pipe, traced, trainable=config.trains_text_encoder)
        if not config.trains_text_encoder:
            prompts.precompute({record.prompt for source in sources for record in source.dataset.records})
        release_idle_modules(replace(config, validation_prompt=None), pipe)  # what validation keeps is off the device
    optimizer, lr_scheduler = setup_optimizer(config, models)  # outside: bitsandbytes computes its maps here
    if device == "cuda" and config.optimizer == "adamw":
        # On CUDA tensors torch picks the foreach AdamW, whose update holds one temporary per trained weight.
        for group in optimizer.param_groups:
            group["foreach"] = True
    return Run(
        config=config,
        accelerator=_SingleProcess(traced, config.mixed_precision),
        models=models,
        sources=sources,
        prompts=prompts,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        wrapped=dict(models.trained),
        generator=torch.Generator().manual_seed(config.seed),
        ema=setup_ema(config, trainable_state(models)),
    )


class _NoHook:
    def remove(self) -> None:
        pass


class StepTracker(MemTracker):
    """torch's MemTracker, fitted to models with frozen weights and read for its global peak only."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        # MemTracker hooks the gradient of every weight it meets; torch refuses such hooks on frozen weights.
        for module in modules:
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        # Instance and class images go through the VAE one batch after the other, and MemTracker refuses a
        # second top-level call of a module per step: forget the first call's statistics (not its memory).
        tracker = self._mod_tracker
        again = module in self.memory_tracking and not tracker.is_bw
        if again and set(tracker.parents) - {tracker.get_known_fqn(module)} == {"Global"}:
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        # MemTracker also updates every module's own peak here: a pass over ~800 modules per op, minutes per trace.
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL]:
                self._peak_mem[device] = snapshot[_TOTAL]
                self._peak_mem_snap[device] = dict(snapshot)


def _device_total(snapshot: dict, device: torch.device) -> int:
    return snapshot.get(device, {}).get(_TOTAL, 0)


def _traced_step(run, step: int, tracker, saved: dict[str, int]) -> None:
    """`train.optimizer_step` without what needs real values (the finiteness check) or several processes."""

    config = run.config
    accumulation = config.gradient_accumulation_steps
    for micro in range(accumulation):
        loss = micro_batch_loss(run, step * accumulation + micro)
        (loss / accumulation).backward()
        _record_saved_activations(run, tracker, saved)
        tracker.reset_mod_stats()  # the tracker follows one call of each module per pass
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable_parameters, config.max_grad_norm)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(step + 1)
    run.optimizer.zero_grad(set_to_none=True)


def _autograd_contexts() -> dict[int, object]:
    return {id(obj): obj for obj in gc.get_objects() if isinstance(obj, torch.autograd.function.BackwardCFunction)}


def _end_step_graphs(earlier: dict[int, object]) -> None:
    """Free what the step's autograd graph holds, as the end of a training step does.

    MemTracker's backward hooks (`register_multi_grad_hook`) close a reference cycle through each graph, node ->
    hook -> closure -> node, that Python's collector cannot see, so a traced step's graph outlives the step. Its
    saved tensors were freed by backward; what a custom autograd Function keeps as attributes of its context is
    not, and bitsandbytes' int8 matmul keeps its input there: the next step's trace counted every layer's input
    twice (+33% on the real-size int8 row).
    """
    for key, context in _autograd_contexts().items():
        if key not in earlier:
            vars(context).clear()


def _record_saved_activations(run, tracker, saved: dict[str, int]) -> None:
    """Activations a component's forward left alive for its backward (after minus before its forward)."""
    for name in COMPONENTS:
        stats = tracker.memory_tracking.get(getattr(run.models.pipe, name))
        if stats is None or _ModState.POST_FW not in stats.snapshots:
            continue
        before = stats.snapshots[_ModState.PRE_FW][0]
        after = stats.snapshots[_ModState.POST_FW][0]
        grown = sum(after.get(d, {}).get(_MemRefType.ACT, 0) - before.get(d, {}).get(_MemRefType.ACT, 0) for d in after)
        saved[name] = max(saved.get(name, 0), grown)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared ones once), leaving out released (meta) ones."""
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[id(storage)] = storage  # held, so that no id is reused while counting
    return sum(storage.nbytes() for storage in storages.values())


def _components(pipe, optimizer, saved: dict[str, int], ema=None) -> dict[str, ComponentMemory]:
    parts = {}
    for name in COMPONENTS:
        module: nn.Module = getattr(pipe, name)
        trainable = [p for p in module.parameters() if p.requires_grad]
        averages = [t for key, t in ema.average.items() if key.startswith(name + ".")] if ema is not None else []
        weights = _storage_bytes([*module.parameters(), *module.buffers(), *quantization_tensors(module)])
        if weights == 0:
            released = "prompts encoded once" if name == "text_encoder" else "--cache-latents: images encoded once"
            parts[name] = ComponentMemory(resident=False, note=f"{released}, then released")
            continue
        parts[name] = ComponentMemory(
            weights=weights,
            gradients=sum(p.numel() * p.element_size() for p in trainable),
            optimizer=_storage_bytes([*(t for p in trainable for t in optimizer.state.get(p, {}).values()), *averages]),
            saved_activations=saved.get(name, 0),
        )
    return parts


def _example_sources(config: TrainConfig, pipe, dtype: torch.dtype, device: torch.device, scratch: Path) -> list:
    """`ExampleSource`s as `setup_run` builds them, on the given folders' images or else one blank image."""

    instances, classes = [], []
    for number, concept in enumerate(config.concepts()):
        prompt = concept.instance_prompt or "a photo of sks subject"  # caption files still win
        instances += _records(concept.folder, prompt, config.resolution, scratch / f"blank-{number}") * concept.repeats
        if concept.class_prompt is not None:
            found = _records(concept.class_dir, concept.class_prompt, config.resolution, scratch / f"class-{number}")
            classes += found[: config.num_class_images]
    if config.cache_latents_dir is not None:
        # On disk, only a micro-batch of encodings is in memory at a time: one cached image stands for it.
        config, instances, classes = (
            replace(config, cache_latents=True, cache_latents_dir=None),
            instances[:1],
            classes[:1],
        )
    return [example_source(config, records, pipe, dtype, device) for records in (instances, classes) if records]


def _records(folder: Path | None, prompt: str, resolution: int, scratch: Path) -> list:
    """A folder's images where it holds any (cached latents grow with their number); else one blank image."""
    from PIL import Image

    if folder is not None and find_images(folder, allow_empty=True):
        return scan_images(folder, prompt, resolution=resolution, skip_bad_images=True)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "blank.png"
    Image.new("RGB", (resolution, resolution)).save(path)
    return [ImageRecord(path, prompt)]
