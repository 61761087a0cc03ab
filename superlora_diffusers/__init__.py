"""SuperLoRA for Hugging Face diffusers: one tiny shared tensor generates every attention ΔW.

Importing the package attaches `load_superlora_weights` and its sibling verbs to diffusers pipelines.
"""

__version__ = "0.1.0"

from .config import PRESETS, SuperLoRAConfig, config_from_preset
from .loaders import SuperLoRALoaderMixin, attach
from .model import SuperLoRAModel, inject_superlora
from .serialization import WEIGHT_NAME, SuperLoRAFileError
from .superlora import SuperLoRA, count_parameters, lora_parameter_count
from .targets import find_targets

attach()

__all__ = [
    "PRESETS",
    "WEIGHT_NAME",
    "SuperLoRA",
    "SuperLoRAConfig",
    "SuperLoRAFileError",
    "SuperLoRALoaderMixin",
    "SuperLoRAModel",
    "config_from_preset",
    "count_parameters",
    "find_targets",
    "inject_superlora",
    "lora_parameter_count",
]
