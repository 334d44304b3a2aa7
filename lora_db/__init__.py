"""lora-db: memory-optimized LoRA DreamBooth for the UniDiffuser text-to-image model."""

__version__ = "0.1.0"
