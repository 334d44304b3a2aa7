"""A quantized frozen base (QLoRA): 4-bit NF4 or 8-bit linear layers from bitsandbytes, LoRA on top in fp32.

    quantize_model(pipe.unet, "nf4", compute_dtype=torch.bfloat16, device=device)
    inject_lora(pipe.unet, spec)          # peft's bitsandbytes LoRA layers (peft.tuners.lora.bnb) go on top

The backbone of the U-ViT (`unet.transformer`: 99.8% of its weights) and, when it gets LoRA, of the CLIP text
encoder (its `encoder`) become bitsandbytes layers: `Linear4bit` with NF4 and double quantization (each
block of 64 weights, 32 where 64 does not divide a row, has an absmax itself stored in 8 bits, with one fp32
constant per 256 blocks), or `Linear8bitLt`
(LLM.int8(): 8-bit rows with one fp32 scale each, outlier features above 6.0 computed in 16 bits). The U-ViT's
five small input/output projections, embeddings and norms keep the weight dtype, as QLoRA keeps a language
model's head. Each layer is quantized as it reaches the device, so the full-precision backbone is never there
at once. The model is then marked `is_loaded_in_4bit` / `is_loaded_in_8bit`, the flag by which peft's
`inject_adapter_in_model` chooses its bitsandbytes LoRA layers.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator

import torch
from torch import nn

from lora_db.errors import LoraDBError

logger = logging.getLogger("lora_db")

QUANTIZATIONS = ("nf4", "int8")
NF4_BLOCKSIZE = 64
NF4_ROW_BLOCKSIZES = (NF4_BLOCKSIZE, 32)  # bitsandbytes' smallest 4-bit block, for rows 64 does not divide
# Relative output error of a quantized layer with Gaussian weights above which the library computes wrongly
# (measured on the CPU here: NF4 0.09, int8 0.01; the misindexed blocks described in `nf4_blocksize`: 0.27).
MAX_PROBE_ERROR = {"nf4": 0.15, "int8": 0.05}
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: features beyond it are computed in 16 bits
_MARKS = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}


def _bitsandbytes():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a warning about an optional CPU kernel package
    import bitsandbytes

    return bitsandbytes


def nf4_blocksize(in_features: int) -> int | None:
    """The NF4 block size for a layer whose rows hold `in_features` weights: 64, or 32 where 64 does not divide
    a row, so that no block spans two rows; None (keep the layer unquantized) where neither does.

    bitsandbytes quantizes the flattened weight in consecutive blocks, but its CPU dequantization kernel (0.50)
    decodes block by block within each row: a block that straddles two rows comes back with the wrong scales.
    A 96-wide layer at block size 64 returned its Gaussian weights with 27% RMS error instead of NF4's 9%,
    enough to undo most of tiny-world's pretraining. With row-aligned blocks every kernel agrees.
    """
    for blocksize in NF4_ROW_BLOCKSIZES:
        if in_features % blocksize == 0:
            return blocksize
    return None


def check_quantization(
    kind: str, device: torch.device, compute_dtype: torch.dtype, probe: bool = True, option: str = "--quantize-base"
) -> None:
    """Refuse, before any model loads, a quantization the installed bitsandbytes cannot run on `device`.

    The probe quantizes one 96x96 Gaussian layer on the device (two NF4 blocks a row) and runs it forward and
    backward under the compute dtype, what training does, in milliseconds, and checks that its output is as
    close to the full-precision layer's as the format allows (a kernel can run and still compute wrongly).
    `probe=False` checks the install only (for estimates of other devices). `option` is the flag the errors name.
    """
    if kind == "none":
        return
    if kind not in QUANTIZATIONS:
        raise LoraDBError(f"{option} {kind}: choose none, nf4 or int8")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraDBError(f"{option} {kind} needs bitsandbytes: `pip install 'bitsandbytes>=0.50'`, or drop {option}")
    if not probe:
        return
    bnb = _bitsandbytes()
    try:
        error = _probe_error(kind, compute_dtype, device)
    except Exception as err:  # any failure of the library means the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoraDBError(
            f"{option} {kind}: bitsandbytes {bnb.__version__} cannot run it on {device.type} ({reason}); "
            f"install a bitsandbytes build for this device, or drop {option}"
        ) from None
    if not error <= MAX_PROBE_ERROR[kind]:  # NaN fails too
        raise LoraDBError(
            f"{option} {kind}: bitsandbytes {bnb.__version__} computes it wrongly on {device.type} (a test "
            f"layer's output is off by {error:.0%}, the format allows {MAX_PROBE_ERROR[kind]:.0%}); install "
            f"another bitsandbytes version, or drop {option}"
        )


def _probe_error(kind: str, compute_dtype: torch.dtype, device: torch.device) -> float:
    """Relative RMS error of a quantized 96x96 Gaussian layer's output (training mode, with a backward pass)."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 96, bias=False)
    linear.weight.data = torch.randn(96, 96, generator=generator) / 96**0.5
    inputs = torch.randn(8, 96, generator=generator)
    expected = linear(inputs)
    layer = _quantized_layer(linear, kind, compute_dtype, device)
    probe = inputs.to(device, compute_dtype).requires_grad_(True)
    output = layer(probe).float()
    output.sum().backward()
    output = output.detach().cpu()
    return ((output - expected).norm() / expected.norm()).item()


def _quantized_layer(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes copy of `linear`, its weights quantized on `device` (frozen: requires_grad False)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    bnb = _bitsandbytes()
    has_bias = linear.bias is not None
    # The layer is built empty on the meta device, outside any fake-tensor mode (`lora-db estimate` traces under
    # one, and a bitsandbytes weight cannot wrap a fake tensor); the weight's data is then set and quantized.
    with unset_fake_temporarily():
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,  # double quantization
                quant_type="nf4",
                device="meta",
            )
            # bitsandbytes' CPU inference layout rewrites the weight in place when a layer first runs in eval mode,
            # and fails for layers narrower than a block: keep one layout for training, sampling and merging.
            layer.support_avx512bf16_for_cpu = False
            weight = bnb.nn.Params4bit(
                torch.empty(0), requires_grad=False, blocksize=nf4_blocksize(linear.in_features),
                compress_statistics=True, quant_type="nf4", module=layer,
            )  # fmt: skip
        else:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
                device="meta",
            )
            weight = bnb.nn.Int8Params(torch.empty(0), requires_grad=False, has_fp16_weights=False)
    if _is_fake(linear.weight):
        layer.weight = _traced_weight(weight, linear.weight.data.to(device))
    else:
        weight.data = linear.weight.data
        layer.weight = weight._quantize(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    return layer.requires_grad_(False)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def _traced_weight(weight: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """`lora-db estimate`'s quantized weight: bitsandbytes' own quantization run on a fake tensor (its fake
    kernels give the packed shapes and dtypes), held by a plain parameter that carries the attributes bitsandbytes'
    and peft's layers read from their weight classes, which cannot hold fake tensors."""
    bnb = _bitsandbytes()
    if isinstance(weight, bnb.nn.Params4bit):
        packed, quant_state = bnb.functional.quantize_4bit(
            data, blocksize=weight.blocksize, compress_statistics=True, quant_type=weight.quant_type
        )
        traced = nn.Parameter(packed, requires_grad=False)
        attributes = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module")
        traced.__dict__.update({name: getattr(weight, name) for name in attributes})
        traced.quant_state, traced.bnb_quantized = quant_state, True
        weight.module.quant_state = quant_state
        return traced
    rows, scales, _ = bnb.functional.int8_vectorwise_quant(data.to(torch.float16))
    traced = nn.Parameter(rows, requires_grad=False)
    traced.CB, traced.SCB, traced.has_fp16_weights = rows, scales, False
    return traced


def _compute_constant_maps(kind: str) -> None:
    """bitsandbytes builds its quantization code maps from Python numbers the first time it quantizes: do that
    once on real tensors, so that quantizing under a fake-tensor mode (`lora-db estimate`) finds them ready."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        for blocksize in NF4_ROW_BLOCKSIZES:
            _quantized_layer(nn.Linear(blocksize, blocksize), kind, torch.float32, torch.device("cpu"))


def quantization_roots(model: nn.Module) -> list[nn.Module]:
    """The parts of a model whose linear layers are quantized: the U-ViT's or the CLIP text encoder's backbone."""
    if hasattr(model, "transformer") and hasattr(model, "text_out"):  # UniDiffuserModel
        return [model.transformer]
    text_model = getattr(model, "text_model", model)  # CLIPTextModel (transformers 5 has no text_model level)
    if hasattr(text_model, "encoder") and hasattr(text_model, "final_layer_norm"):
        return [text_model.encoder]
    raise LoraDBError(f"--quantize-base: lora-db quantizes the U-ViT and CLIP text encoder, not {type(model).__name__}")


def quantizable(linear: nn.Linear, kind: str) -> bool:
    """int8 quantizes any layer (one scale per row); NF4 one whose rows split into whole blocks."""
    return kind != "nf4" or nf4_blocksize(linear.in_features) is not None


def quantize_model(model: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the backbone's linear layers by quantized ones on `device`, in place; returns how many.

    Layers already quantized are left alone, so calling it twice is harmless. Call it before LoRA is injected.
    A layer NF4 cannot split into row-aligned blocks (input width not a multiple of 32; none in UniDiffuser)
    stays as it is, and is named in the log.
    """
    if kind == "none":
        return 0
    _compute_constant_maps(kind)
    count = 0
    kept = []
    for root in quantization_roots(model):
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:  # exactly: bitsandbytes' layers are nn.Linear subclasses
                    continue
                if not quantizable(child, kind):
                    kept.append(f"{name} ({child.in_features} wide)")
                    continue
                setattr(parent, name, _quantized_layer(child, kind, compute_dtype, device))
                count += 1
    if kept:
        logger.info(
            "--quantize-base %s: %d linear layer(s) whose input width is not a multiple of 32 keep full precision: %s",
            kind, len(kept), ", ".join(sorted(set(kept))),
        )  # fmt: skip
    if count or quantized_layers(model):
        setattr(model, _MARKS[kind], True)
    return count


def quantize_pipeline(pipe, kind: str, compute_dtype: torch.dtype, device: torch.device, text_encoder: bool) -> None:
    """The U-ViT, and the CLIP text encoder when it carries LoRA, quantized layer by layer onto `device`."""
    quantize_model(pipe.unet, kind, compute_dtype, device)
    if text_encoder:
        quantize_model(pipe.text_encoder, kind, compute_dtype, device)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    bnb = _bitsandbytes()
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)]


def quantization_of(model: nn.Module) -> str:
    """`nf4`, `int8` or `none`: how a model's frozen linear layers are stored."""
    for kind, mark in _MARKS.items():
        if getattr(model, mark, False):
            return kind
    return "none"


def quantization_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a quantized layer keeps: packed weights and the quantization constants beside them.

    The constants (NF4's 8-bit absmax per block, its fp32 second-level absmax and code maps; int8's per-row
    scales) are attributes of the weight or layer, not parameters or buffers, so `model.parameters()` misses them.
    """
    for layer in quantized_layers(model):
        yield layer.weight.data
        state = getattr(layer.weight, "quant_state", None)
        if state is not None:  # NF4
            yield from (state.absmax, state.code)
            if state.state2 is not None:
                yield from (state.offset, state.state2.absmax, state.state2.code)
        for scales in (getattr(layer.weight, "SCB", None), getattr(getattr(layer, "state", None), "SCB", None)):
            if scales is not None:  # int8
                yield scales


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a constant shared by many layers counts once)."""
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            try:
                key = storage.data_ptr() or id(storage)
            except RuntimeError:  # fake tensors (the estimate) have no data
                key = id(storage)
            storages[key] = storage
    return sum(storage.nbytes() for storage in storages.values())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the quantized layers hold: packed weights plus quantization constants."""
    return storage_bytes(quantization_tensors(model))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight a quantized layer computes with (what the quantized base stands for)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized layer by a plain fp32 `nn.Linear` holding the weight it computed with; returns how
    many. The model then computes (in full precision) what the quantized one did, and a merge can fold LoRA into it.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return 0
    bnb = _bitsandbytes()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(dequantized_weight(child), requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
            setattr(parent, name, linear)
            count += 1
    for mark in _MARKS.values():
        if hasattr(model, mark):
            setattr(model, mark, False)
    return count
