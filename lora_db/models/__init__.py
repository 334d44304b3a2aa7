"""UniDiffuser itself: loading it, its objective, sampling it, and the options that shrink its memory.

- loading.py: `load_pipeline` (hub id, local folder, `tiny`, `tiny-world`, `random:<preset>`), config look-ups
- random.py: random-weight builds of the architecture (`tiny`, `random:small`, `random:unidiffuser-v1`)
- objective.py: `dreambooth_loss`, UniDiffuser's text-to-image noise-prediction loss; `add_noise` in fp32
- sampling.py: `generate_images`, `generate_captions`
- quantize.py: `quantize_model` / `quantize_pipeline` (NF4, int8) and their checks
- memory.py: gradient checkpointing of the U-ViT, attention backends, optimizers, dtypes, peak memory
"""

from lora_db.models.loading import load_pipeline
from lora_db.models.objective import dreambooth_loss
from lora_db.models.quantize import quantize_pipeline
from lora_db.models.random import build_random_pipeline
from lora_db.models.sampling import generate_captions, generate_images

__all__ = [
    "build_random_pipeline",
    "dreambooth_loss",
    "generate_captions",
    "generate_images",
    "load_pipeline",
    "quantize_pipeline",
]
