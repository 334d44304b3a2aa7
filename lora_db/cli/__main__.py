"""`python -m lora_db.cli ...` runs the `lora-db` command (what torchrun and accelerate launch call)."""

from lora_db.cli.application import main

main()
