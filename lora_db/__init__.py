"""lora-db: memory-optimized LoRA DreamBooth for the UniDiffuser text-to-image model.

import lora_db
pipe = lora_db.load_pipeline("tiny", adapters=["robot/adapter.safetensors"])   # see lora_db.inference
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load_pipeline"]


def __getattr__(name: str):
    # Lazy, so `import lora_db` does not import torch and diffusers.
    if name == "load_pipeline":
        from .inference import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'lora_db' has no attribute {name!r}")
