"""DreamBooth training of one shared SuperLoRA, as diffusers' `train_dreambooth_lora.py` does it for LoRA.

    from superlora_diffusers.training import TrainingConfig, train
    train(TrainingConfig(instance_data_dir="examples/striped_star", instance_prompt="a photo of sks star"))

`config.py` (every option; the flags are generated from it) → `setup.py` (accelerator, base model, data,
adapter, optimiser) → `step.py` (one batch and its loss) → `trainer.py` (`train`, the loop, `main`), with
`data.py`, `checkpoints.py`, `validation.py` and `adapters.py` (what trains: SuperLoRA, or a peft method by
`--adapter`) beside them. Two choices differ from diffusers' script, both
for exact, testable resumes: every random draw of a step comes from a generator seeded by (seed, step,
process), and the tiny image sets are preprocessed once instead of going through a DataLoader.
"""

from .config import TrainingConfig, TrainingError, build_parser, parse_args
from .trainer import main, train

__all__ = ["TrainingConfig", "TrainingError", "build_parser", "main", "parse_args", "train"]
