"""The judge: the image encoder that scores the DINO column, and the rule that it is not the model being judged.

UniDiffuser's image latent contains its own CLIP image embedding, so a U-ViT trained on a subject learns to emit that
subject's embedding: CLIP-I with the pipeline's encoder is partly circular. A judge is an encoder training never
sees. A model folder may ship one as `judge/` (tiny-world's is lora-db's small conv net trained self-supervised,
lora_db.synthetic.judge; any transformers ViT folder works too); `lora-db eval` uses it for the DINO column unless
`--dino` names another (`--dino tiny-world` names tiny-world's; real models use `--dino facebook/dino-vits16`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_db.errors import LoraDBError
from lora_db.evaluation.metrics import DinoEmbedder
from lora_db.models.loading import TINY_WORLD, local_model, random_preset, tiny_world_dir
from lora_db.synthetic.judge import JUDGE_FOLDER, JudgeEmbedder, is_judge_folder


@dataclass(frozen=True)
class JudgeChoice:
    """Which encoder scores the DINO column: `name` for the table header, `path` to load, `source` of the choice."""

    name: str
    path: str
    source: str  # "--dino", or "model" for the judge the model folder ships


def model_judge(model: str) -> Path | None:
    """`MODEL/judge/` when the model is a local folder that ships a judge (tiny-world does), else None."""
    if random_preset(model) is not None:
        return None
    folder = Path(local_model(model)).expanduser()
    judge = folder / JUDGE_FOLDER
    return judge if folder.is_dir() and (judge / "config.json").is_file() else None


def resolve_judge(dino: str | None, model: str) -> JudgeChoice | None:
    """The judge of `lora-db eval`: `--dino` when given, else the model's own `judge/`, else none (no DINO column).

    Refuses, before anything loads, a `--dino` that is the pipeline's image encoder folder."""
    if dino == TINY_WORLD:
        judge = tiny_world_dir() / JUDGE_FOLDER
        if not (judge / "config.json").is_file():
            raise LoraDBError(
                f"--dino {TINY_WORLD}: this copy of tiny-world ships no judge ({judge} is missing); rebuild tiny-world "
                "or pass --dino MODEL"
            )
        return JudgeChoice(f"{TINY_WORLD} judge", str(judge), "--dino")
    if dino:
        _refuse_encoder_folder(dino, model)
        return JudgeChoice(Path(dino).name if Path(dino).expanduser().is_dir() else dino, dino, "--dino")
    judge = model_judge(model)
    if judge is None:
        return None
    owner = TINY_WORLD if model == TINY_WORLD else Path(local_model(model)).name
    return JudgeChoice(f"{owner} judge", str(judge), "model")


def load_judge(choice: JudgeChoice, pipe) -> DinoEmbedder | JudgeEmbedder:
    """The judge's embedder, refused when its weights are the pipeline's own image encoder's.

    lora-db's own judge (tiny-world's: a small conv net trained with SimCLR) or any transformers ViT folder."""
    if is_judge_folder(Path(choice.path)):
        judge = JudgeEmbedder(Path(choice.path))
    else:
        judge = DinoEmbedder(choice.path, "--dino" if choice.source == "--dino" else "the model's judge")
    if shares_weights(judge.model, pipe.image_encoder):
        raise _not_a_judge(choice.path, "its weights are the pipeline's own image encoder's")
    return judge


def load_model_judge(model: str, pipe) -> DinoEmbedder | JudgeEmbedder | None:
    """The judge the model folder ships (`lora-db train --eval-steps` scores with it), or None."""
    choice = resolve_judge(None, model)
    return load_judge(choice, pipe) if choice else None


def _refuse_encoder_folder(dino: str, model: str) -> None:
    if random_preset(model) is not None:
        return
    encoder = Path(local_model(model)).expanduser() / "image_encoder"
    if encoder.is_dir() and Path(dino).expanduser().resolve() == encoder.resolve():
        raise _not_a_judge(dino, "it is the pipeline's own image encoder folder")


def _not_a_judge(dino: str, why: str) -> LoraDBError:
    return LoraDBError(
        f"--dino {dino}: {why}, whose embedding the model is trained to produce; a judge must not be the model "
        "being judged (that is CLIP-I already): pass another encoder, e.g. --dino facebook/dino-vits16"
    )


SHARED_FRACTION = 0.5  # more than half of the judge's weights found in the encoder: a copy of it, not a judge


@torch.no_grad()
def shares_weights(judge: nn.Module, encoder: nn.Module) -> bool:
    """True when most of the judge's weights (by element count) are tensors of the encoder, exactly.

    Catches a copy of the encoder in another folder, or its vision tower loaded on its own."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for tensor in encoder.state_dict().values():
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor.detach().cpu())
    shared = total = 0
    for tensor in judge.state_dict().values():
        tensor = tensor.detach().cpu()
        total += tensor.numel()
        if any(torch.equal(tensor.to(other.dtype), other) for other in by_shape.get(tuple(tensor.shape), ())):
            shared += tensor.numel()
    return total > 0 and shared > SHARED_FRACTION * total
