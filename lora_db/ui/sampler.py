"""The page's sampler: one base model kept loaded, adapters hot-swapped by weight, as `lora-db sample` does it.

    sampler = Sampler()
    result = sampler.sample("tiny", {Path("runs/a/adapter.safetensors"): 0.5}, "a photo of sks toy", seed=0,
                            num_images=2, steps=20, guidance=8.0, out=Path("samples/0001"))

The base loads once (`lora_db.adapters.hotswap.load_pipeline`), each adapter file once (`AdapterSet.load`); a new
weight is `AdapterSet.activate`, milliseconds, not a reload. Images are `lora_db.models.sampling.generate_images`,
the function `lora-db sample` renders its rows with: same model, adapter, weight, prompt and seed, same image. An
adapter file rewritten since it was loaded (a run trained again into its folder) reloads the base.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lora_db.adapters.hotswap import load_pipeline
from lora_db.images import save_png
from lora_db.models.sampling import generate_images


@dataclass
class Samples:
    images: list[Path]
    note: str


class Sampler:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # one sampling at a time: the pipeline's adapters are shared state
        self._model: str | None = None
        self._pipe = None
        self._names: dict[Path, tuple[str, tuple[int, int]]] = {}  # adapter file -> (name, its mtime and size)

    def sample(
        self,
        model: str,
        weights: dict[Path, float],
        prompt: str,
        *,
        seed: int,
        num_images: int,
        steps: int,
        guidance: float,
        out: Path,
    ) -> Samples:
        with self._lock:
            started = time.perf_counter()
            stamps = {path: _stamp(path) for path in weights}
            stale = any(path in self._names and self._names[path][1] != stamp for path, stamp in stamps.items())
            if model != self._model or stale:
                self._pipe, self._model, self._names = None, None, {}
                self._pipe = load_pipeline(model)
                self._pipe.set_progress_bar_config(disable=True)
                self._model = model
            adapters = self._pipe.lora_adapters
            for path, stamp in stamps.items():
                if path not in self._names:
                    self._names[path] = (adapters.load(path), stamp)
            loaded = time.perf_counter()
            adapters.activate({self._names[path][0]: weight for path, weight in weights.items()})
            switched = time.perf_counter()
            images = generate_images(
                self._pipe, prompt, num_images, seed=seed, num_inference_steps=steps, guidance_scale=guidance
            )
        label = " + ".join(f"{self._names[path][0]}:{weight:g}" for path, weight in weights.items()) or "base"
        text = {
            "prompt": prompt,
            "adapter": " + ".join(str(path) for path in weights) or "none",
            "weight": " + ".join(f"{weight:g}" for weight in weights.values()),
            "model": model,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
        }
        paths = [
            save_png(image, out / f"{i:02d}_seed{seed + i}.png", {**text, "seed": seed + i})
            for i, image in enumerate(images)
        ]
        note = (
            f"{label}: {len(paths)} image(s) in {out}; loading {loaded - started:.2f} s (base and adapters, only when "
            f"new), adapter switch {1000 * (switched - loaded):.1f} ms"
        )
        return Samples(paths, note)


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_mtime_ns, info.st_size
