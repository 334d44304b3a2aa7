"""LoRA adapters: the file, putting one into a model, its variants, merging, hot-swapping, and peft folders.

- spec.py: `LoraSpec` and `AdapterFile`, what an adapter is
- format.py: `save_adapter`, `read_adapter`, `describe_adapter` (`lora-db info`), `export_peft` (`lora-db export`)
- layers.py: `inject_lora`, `lora_state_dict`, `load_lora_state_dict`, `check_fits`, `lora_scale`
- variants.py: the spec a run trains (LoRA, DoRA, rsLoRA), LoRA+ learning rates, `--init-adapter`
- merge.py: `merge` (`lora-db merge`), `write_combined` (several adapters as one)
- hotswap.py: `AdapterSet` and `load_pipeline` (a pipeline with adapters switched in place)
- sample.py: `sample` (`lora-db sample`)
- peft.py: peft folders, written and read

`merge` and `sample` are the names of their modules here; the functions are `lora_db.merge` and `lora_db.sample`.
"""

from lora_db.adapters.format import describe_adapter, export_peft, read_adapter, save_adapter
from lora_db.adapters.hotswap import AdapterSet, load_pipeline
from lora_db.adapters.layers import inject_lora, lora_state_dict
from lora_db.adapters.merge import write_combined
from lora_db.adapters.spec import AdapterFile, LoraSpec

__all__ = [
    "AdapterFile",
    "AdapterSet",
    "LoraSpec",
    "describe_adapter",
    "export_peft",
    "inject_lora",
    "load_pipeline",
    "lora_state_dict",
    "read_adapter",
    "save_adapter",
    "write_combined",
]
