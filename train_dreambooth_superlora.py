#!/usr/bin/env python
"""DreamBooth a SuperLoRA adapter (diffusers-style flags). Run `python train_dreambooth_superlora.py --help`.

    accelerate launch train_dreambooth_superlora.py --pretrained_model_name_or_path toy \\
      --instance_data_dir examples/<subject> --instance_prompt "a photo of sks star" \\
      --with_prior_preservation --class_prompt "a photo of a star" --output_dir out/sks-star
"""

import os
import sys

# CPU: tensors of 2 MB and more on huge pages (PyTorch's switch, read once when torch is imported). A
# regrouped adapter builds N-sized tensors every step, and each fresh one page-faults its memory back in:
# at SD-1.5 scale that is 0.1-0.2 s per tensor on 4 KB pages, about half as much on 2 MB ones
# (docs/benchmarks.md). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from superlora_diffusers.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
