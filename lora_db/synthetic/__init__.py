"""Offline worlds for demos, tests and CI: no download anywhere.

- demo.py: `make_demo_images`, the toy robot `lora-db demo-images` photographs
- world.py: tiny-world's captioned world
- tiny_world.py: `build` pretrains tiny-world's VAE, CLIP and U-ViT (`python -m lora_db.synthetic.tiny_world build`)
"""

from lora_db.synthetic.demo import make_demo_images

__all__ = ["make_demo_images"]
