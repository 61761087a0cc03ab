"""SuperLoRA for Hugging Face diffusers: one tiny shared tensor generates every attention ΔW."""

from .config import PRESETS, SuperLoRAConfig, config_from_preset
from .superlora import SuperLoRA, count_parameters, lora_parameter_count

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SuperLoRA",
    "SuperLoRAConfig",
    "config_from_preset",
    "count_parameters",
    "lora_parameter_count",
]
