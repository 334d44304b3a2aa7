"""`lora-db eval`: samples of each adapter and checkpoint scored against the subject's photos.

- evaluate.py: `evaluate(config)`, the rows, subject and control prompts, grids, eval.json and table
- metrics.py: embedders, similarity measures (CLIP-I, DINO, pixel, CLIP-T), `TrainingEval` (`train --eval-steps`)
- judge.py: which encoder scores the DINO column (a model's `judge/`), never the pipeline's own image encoder
- standing.py: the reference rows (photos, ceiling through the VAE, --describe) and the best checkpoint
- plot.py: subject fidelity per subject prompt against the training step

`evaluate` names its module here; the function is `lora_db.evaluate`.
"""

from lora_db.evaluation.metrics import TrainingEval

__all__ = ["TrainingEval"]
