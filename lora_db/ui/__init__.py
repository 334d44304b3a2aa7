"""`lora-db ui`: the DreamBooth workflow in a local web page, over the same `lora-db` commands as the terminal.

- app.py: the gradio page (`serve`), its tabs and its one-second refresh
- page.py: what each control does (`Page`), with errors as the CLI's one line
- forms.py: the page's fields (every TrainConfig field) and the command lines they make
- jobs.py / runner.py: `lora-db` commands as subprocesses whose state lives in the workspace
- progress.py: reading back metrics, validation images, eval.json, adapters and the model card
- sampler.py: one loaded model, adapters hot-swapped by weight
- workspace.py: paths kept inside the workspace; photos and their captions

It sits under lora_db.cli (which registers the command) and above training and the packages below: it starts
training, eval, merge and export as `lora-db` subprocesses and reuses the estimate and the hot-swap, with no copy
of any of them. gradio is imported only by app.py, which the CLI imports when `lora-db ui` runs.
"""
