#!/usr/bin/env python
"""DreamBooth a SuperLoRA adapter (diffusers-style flags). Run `python train_dreambooth_superlora.py --help`.

    accelerate launch train_dreambooth_superlora.py --pretrained_model_name_or_path toy \\
      --instance_data_dir examples/<subject> --instance_prompt "a photo of sks star" \\
      --with_prior_preservation --class_prompt "a photo of a star" --output_dir out/sks-star
"""

import sys

from superlora_diffusers.training import main

if __name__ == "__main__":
    sys.exit(main())
