"""Pivotal tuning: a new token for the subject's identifier whose CLIP input embedding trains with the LoRA.

    lora-db train ... --instance-prompt "a photo of sks toy" --train-token sks --init-token toy

Training adds `sks` to the CLIP tokenizer as a token of its own (so it is no longer split into known pieces) and
puts a `TokenEmbedding` in the text encoder: the frozen vocabulary plus one trained row, started at the embedding
of `toy` (the mean of its pieces'). The adapter file keeps the row as `tokens.sks` (lora-db's `AdapterFile.tokens`).
Sample and eval switch it in with its adapter (`TokenSwitch`: while the adapter is inactive the base model reads
"sks" as before); merge puts it into the pipeline the way stock transformers does (`add_tokens`, a resized
embedding table: `add_tokens_to_pipeline`), so a merged folder loads in stock diffusers with the token in its
tokenizer.
An exported peft folder carries them beside the components as `tokens.safetensors` ({token: vector}, diffusers'
textual-inversion layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lora_db.errors import LoraDBError
from lora_db.logs import printable

TOKENS_PREFIX = "tokens."  # key prefix of a token's embedding in an adapter file
TOKENS_FILE = "tokens.safetensors"  # beside the component folders of a peft export
TRAINED_TOKEN_SUFFIX = "token_embedding.added"  # a checkpoint's name of the trained rows (TokenEmbedding.added)


class TokenEmbedding(nn.Module):
    """CLIP's token embedding with rows for added tokens: ids below the base vocabulary read the frozen table, the
    others `added` (trained)."""

    def __init__(self, base: nn.Embedding, added: torch.Tensor):
        super().__init__()
        self.base = base
        self.added = nn.Parameter(added)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.added.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocabulary = self.base.num_embeddings
        new = ids >= vocabulary
        known = self.base(ids.clamp(max=vocabulary - 1))
        added = self.added[(ids - vocabulary).clamp(min=0, max=self.added.shape[0] - 1)]
        return torch.where(new[..., None], added.to(known.dtype), known)


def _single_id(tokenizer, token: str, option: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise LoraDBError(f"{option} {token!r} is {len(ids)} tokens to the CLIP tokenizer; choose a single word")
    return ids[0]


def install_trainable_token(pipe, train_token: str, init_token: str) -> TokenEmbedding:
    """Add `train_token` to the pipeline's CLIP tokenizer and a trainable embedding row for it, started at
    `init_token`'s embedding; returns the text encoder's new input embedding."""
    tokenizer, text_encoder = pipe.clip_tokenizer, pipe.text_encoder
    base = text_encoder.get_input_embeddings()
    init_ids = tokenizer(init_token, add_special_tokens=False).input_ids
    if not init_ids:
        raise LoraDBError(f"--init-token {init_token!r} holds no token; give a word such as toy")
    if tokenizer.add_tokens([train_token]) != 1:
        raise LoraDBError(f"--train-token {train_token!r} is already a token of its own; choose a new word")
    token_id = _single_id(tokenizer, train_token, "--train-token")
    if token_id != base.num_embeddings:
        raise LoraDBError(f"--train-token {train_token!r}: the tokenizer and the text encoder's vocabulary disagree")
    with torch.no_grad():
        start = base.weight[init_ids].float().mean(0, keepdim=True).clone()
    embedding = TokenEmbedding(base, start)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def trained_tokens(pipe) -> dict[str, torch.Tensor]:
    """token -> its trained embedding, for the tokens `install_trainable_token` added (none: {})."""
    embedding = pipe.text_encoder.get_input_embeddings()
    if not isinstance(embedding, TokenEmbedding):
        return {}
    vocabulary = embedding.base.num_embeddings
    tokens = pipe.clip_tokenizer.convert_ids_to_tokens(list(range(vocabulary, embedding.num_embeddings)))
    return {token: embedding.added[i].detach() for i, token in enumerate(tokens)}


def check_tokens(path: Path, tokens: Mapping[str, torch.Tensor]) -> None:
    """An adapter's token embeddings: one word each, 1-D floating-point vectors of one width, finite."""
    widths = set()
    for token, vector in tokens.items():
        where = f"{path}: {TOKENS_PREFIX}{printable(token)}"
        if not token.strip() or any(ch.isspace() for ch in token):
            raise LoraDBError(f"{where}: a token is one word")
        if vector.ndim != 1 or not vector.is_floating_point():
            shape = tuple(vector.shape)
            raise LoraDBError(f"{where} has shape {shape} ({vector.dtype}); it must be a 1-D float vector")
        if not torch.isfinite(vector).all():
            raise LoraDBError(f"{where} holds NaN or infinite values: the file is damaged")
        widths.add(vector.shape[0])
    if len(widths) > 1:
        raise LoraDBError(f"{path}: its token embeddings have widths {sorted(widths)}; the file is inconsistent")


def add_tokens_to_pipeline(pipe, tokens: Mapping[str, torch.Tensor], source: Path) -> None:
    """Put an adapter's tokens into a pipeline as stock transformers would: each one added to the CLIP tokenizer and
    its row to a resized embedding table. A token already there with another vector is refused (one pipeline holds
    one embedding per token)."""
    if not tokens:
        return
    tokenizer, text_encoder = pipe.clip_tokenizer, pipe.text_encoder
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vector in tokens.items():
        if vector.shape[0] != width:
            raise LoraDBError(
                f"{source}: the embedding of {printable(token)!r} is {vector.shape[0]} wide, the text encoder's "
                f"{width}; the adapter was trained for another model"
            )
    table = text_encoder.get_input_embeddings()
    for token, vector in tokens.items():
        if token in tokenizer.get_added_vocab():
            row = table.weight[tokenizer.convert_tokens_to_ids(token)]
            if not torch.equal(row.detach().float().cpu(), vector.float().cpu()):
                raise LoraDBError(
                    f"{source}: the token {printable(token)!r} is already in this pipeline with another embedding "
                    "(from another adapter); load them into separate pipelines"
                )
            continue
        if tokenizer.add_tokens([token]) != 1 or _single_id(tokenizer, token, "token") != len(tokenizer) - 1:
            raise LoraDBError(f"{source}: the token {printable(token)!r} cannot be added to the CLIP tokenizer")
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[-1] = vector.to(table.weight.device, table.weight.dtype)


class TokenSwitch:
    """The tokens of the active adapters, and only theirs, in a pipeline whose adapters switch (`AdapterSet`).

    A token stays out of the tokenizer while no active adapter holds it, so the base model and the other adapters
    read "sks" as the base vocabulary splits it. Each switch installs a fresh copy of the base tokenizer with the
    active tokens added, and a `TokenEmbedding` over the base table with their rows."""

    def __init__(self, pipe):
        import copy

        self.pipe = pipe
        self.base_tokenizer = copy.deepcopy(pipe.clip_tokenizer)
        self.base_embedding = pipe.text_encoder.get_input_embeddings()
        self.installed: dict[str, torch.Tensor] = {}

    def check(self, tokens: Mapping[str, torch.Tensor], source: Path) -> None:
        width = self.base_embedding.weight.shape[1]
        for token, vector in tokens.items():
            if vector.shape[0] != width:
                raise LoraDBError(
                    f"{source}: the embedding of {printable(token)!r} is {vector.shape[0]} wide, the text encoder's "
                    f"{width}; the adapter was trained for another model"
                )
            probe = copy_with(self.base_tokenizer, [token])
            _single_id(probe, token, f"{source}: token")

    def install(self, tokens: Mapping[str, torch.Tensor]) -> None:
        """Exactly `tokens` (token -> vector) in the pipeline; the base vocabulary alone for none."""
        if tokens.keys() == self.installed.keys() and all(torch.equal(tokens[t], self.installed[t]) for t in tokens):
            return
        device = self.base_embedding.weight.device
        if tokens:
            self.pipe.clip_tokenizer = copy_with(self.base_tokenizer, list(tokens))
            rows = torch.stack([vector.float() for vector in tokens.values()]).to(device)
            embedding = TokenEmbedding(self.base_embedding, rows).requires_grad_(False)
        else:
            self.pipe.clip_tokenizer, embedding = self.base_tokenizer, self.base_embedding
        self.pipe.text_encoder.set_input_embeddings(embedding)
        self.installed = dict(tokens)


def copy_with(tokenizer, tokens: list[str]):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(tokens)
    return tokenizer
