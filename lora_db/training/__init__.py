"""A DreamBooth training run, and the memory it will need.

- loop.py: `train(config)`, the loop top to bottom: steps, checkpoints, validation, outputs
- setup.py: checks before loading, accelerate, models, LoRA injection, optimizer (`setup_run`)
- examples.py: cached or per-step latents, CLIP embeddings and prompts
- data.py: the instance and class photos, captions, augmentation, batches
- class_images.py: prior preservation's class images, generated once and reused
- checkpoint.py, resume.py, stopping.py: exact resume, what a resume may change, stopping on signals
- divergence.py: the loss checked every step, the weights every 10 and before saves and sampling; a diverged run
  ends in an error naming the cause
- tracking.py, model_card.py, hub.py: tensorboard/wandb, the run's README, `--push-to-hub`
- estimate.py: `estimate_memory(config)`, two traced steps of this set-up on fake tensors
- traced_kernels.py: the trace's ops that must allocate what their real kernels allocate inside themselves
- demo.py: `run_demo(config)`, `lora-db demo`: tiny-world learns a held-out subject, a grid before and after
"""

from lora_db.training.estimate import estimate_memory
from lora_db.training.loop import TrainResult, train
from lora_db.training.setup import setup_run

__all__ = ["TrainResult", "estimate_memory", "setup_run", "train"]
