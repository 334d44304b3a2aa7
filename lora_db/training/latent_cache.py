"""`--cache-latents-dir DIR`: VAE latents and CLIP image embeddings cached on disk, reused across runs, read one
micro-batch at a time, so memory stays flat however many images a dataset holds.

    DIR/<encoders>/<image>.safetensors        mean, std (the VAE posterior) and clip (the image embedding)

`<encoders>` is a digest of what the encodings depend on: the VAE's and the image encoder's weights, the CLIP image
processor's settings, the training resolution and dtype, and this layout's version; `<image>` a digest of the
image file's bytes. Another model, resolution or dtype therefore never reads another's encodings, and an edited
photo is encoded again. Each file is written whole or not at all (written under a temporary name, then renamed),
so runs may share the folder. The values are those `--cache-latents` keeps in memory: a run trains identically
with either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lora_db.errors import LoraDBError
from lora_db.io import atomic_write

LAYOUT_VERSION = "1"
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _update_with_weights(digest, module: torch.nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())


def encoders_digest(pipe, dtype: torch.dtype, resolution: int) -> str:
    """What every encoding depends on besides the image (the folder name of this model's encodings)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"lora-db latents {LAYOUT_VERSION} {resolution} {dtype}".encode())
    digest.update(pipe.clip_image_processor.to_json_string().encode())
    for module in (pipe.vae, pipe.image_encoder):
        _update_with_weights(digest, module)
    return digest.hexdigest()


class LatentCache:
    """One model's encodings in `folder`: `ensure` writes an image's when it is missing, `load` reads them back."""

    def __init__(self, folder: Path, pipe, dtype: torch.dtype, resolution: int):
        self.folder = Path(folder) / encoders_digest(pipe, dtype, resolution)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LoraDBError(f"--cache-latents-dir {folder}: cannot create it ({err.strerror or err})") from None
        self.written = self.reused = 0

    def ensure(self, image: Path, encode) -> Path:
        """The file of `image`'s encodings, from `encode()` (mean, std, clip) when not cached yet."""
        from safetensors.torch import save_file

        path = self.folder / f"{file_digest(image)}.safetensors"
        if path.is_file():
            self.reused += 1
            return path
        mean, std, clip = encode()
        tensors = {"mean": mean, "std": std, "clip": clip}
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        self.written += 1
        return path

    @staticmethod
    def load(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device=str(device))
            return tensors["mean"], tensors["std"], tensors["clip"]
        except (OSError, SafetensorError, KeyError) as err:
            raise LoraDBError(
                f"--cache-latents-dir: {path} is unreadable ({err}); delete it and run again to encode it anew"
            ) from None
