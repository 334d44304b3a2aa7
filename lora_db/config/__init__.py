"""Every command's options as dataclasses, free of torch: defaults, help, ranges and checks in one place.

- fields.py: `option()` (how a field is declared), range checks, `--config` TOML files
- train.py: `TrainConfig` (`lora-db train`, and `estimate` with `EstimateConfig` from evaluate.py)
- commands.py: `SampleConfig`, `MergeConfig`, `InfoConfig`, `ExportConfig`, `DemoImagesConfig`, `WeightedAdapter`
- evaluate.py: `EvalConfig`, `EstimateConfig`
- ui.py: `UiConfig` (`lora-db ui`)
"""

from lora_db.config.commands import (
    DemoImagesConfig,
    ExportConfig,
    InfoConfig,
    MergeConfig,
    SampleConfig,
    WeightedAdapter,
)
from lora_db.config.evaluate import EstimateConfig, EvalConfig
from lora_db.config.fields import option
from lora_db.config.train import TrainConfig, load_toml
from lora_db.config.ui import UiConfig

__all__ = [
    "DemoImagesConfig",
    "EstimateConfig",
    "EvalConfig",
    "ExportConfig",
    "InfoConfig",
    "MergeConfig",
    "SampleConfig",
    "TrainConfig",
    "UiConfig",
    "WeightedAdapter",
    "load_toml",
    "option",
]
