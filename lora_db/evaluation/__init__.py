"""`lora-db eval`: samples of each adapter and checkpoint scored against the subject's photos.

- evaluate.py: `evaluate(config)`, the rows, grids, eval.json and table
- metrics.py: embedders, similarity measures, `TrainingEval` (`lora-db train --eval-steps`)
- plot.py: each metric against the training step
"""

from lora_db.evaluation.evaluate import evaluate
from lora_db.evaluation.metrics import TrainingEval

__all__ = ["TrainingEval", "evaluate"]
