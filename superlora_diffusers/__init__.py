"""SuperLoRA for Hugging Face diffusers: one tiny shared tensor generates every attention ΔW.

Importing the package attaches `load_superlora_weights` and its sibling verbs to diffusers pipelines, and
registers "SUPERLORA" with peft (`tuner.register`), so `unet.add_adapter(SuperLoRAConfig(...))` and
`peft.get_peft_model(model, SuperLoRAConfig(...))` work.
"""

__version__ = "0.1.0"

from .config import PRESETS, SuperLoRAConfig, config_from_preset
from .loaders import SuperLoRALoaderMixin, attach
from .components import inject_superlora
from .serialization import WEIGHT_NAME, SuperLoRAFileError
from .superlora import SuperLoRA, count_parameters, lora_parameter_count
from .targets import find_targets
from .tuner import SharedGenerator, SuperLoRALayer, SuperLoRATuner, register

attach()
register()

__all__ = [
    "PRESETS",
    "WEIGHT_NAME",
    "SharedGenerator",
    "SuperLoRA",
    "SuperLoRAConfig",
    "SuperLoRAFileError",
    "SuperLoRALayer",
    "SuperLoRATuner",
    "SuperLoRALoaderMixin",
    "config_from_preset",
    "count_parameters",
    "find_targets",
    "inject_superlora",
    "lora_parameter_count",
]
