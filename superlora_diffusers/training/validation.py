"""What a run shows: validation grids during training, then samples and a model card from the saved file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..superlora import versus_lora1
from .config import TrainingConfig


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def make_pipeline(path: str, tokenizer, text_encoder, vae, unet, scheduler_config):
    """A pipeline over the training modules themselves: no copies, no dtype casts (diffusers #13124)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompt: str, count: int, seed: int, cfg: TrainingConfig, resolution: int) -> list[Image.Image]:
    return [
        pipe(prompt, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
             height=resolution, width=resolution,
             generator=torch.Generator(device="cpu").manual_seed(seed + i)).images[0]
        for i in range(count)
    ]


def validate(cfg: TrainingConfig, accelerator, path, modules, noise_scheduler, resolution: int, step: int, adapter) -> None:
    tokenizer, text_encoder, vae, unet = modules
    pipe = make_pipeline(path, tokenizer, text_encoder, vae, unet, noise_scheduler.config)
    images = generate(pipe, cfg.validation_prompt, cfg.num_validation_images, cfg.seed, cfg, resolution)
    assert all(p.dtype == torch.float32 for p in adapter.parameters() if p.requires_grad), \
        "validation must not downcast the adapter"
    grid = image_grid(images)
    out = Path(cfg.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def final_validation(cfg: TrainingConfig, path: str, weights: Path, resolution: int, adapter) -> None:
    """Reload the saved file into a fresh pipeline (what a user does) and write samples + a model card."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    adapter.load_into(pipe, weights)
    prompt = cfg.validation_prompt or cfg.instance_prompt
    images = generate(pipe, prompt, max(1, cfg.num_validation_images), cfg.seed, cfg, resolution)
    image_grid(images).save(Path(cfg.output_dir) / "samples.png")
    write_model_card(cfg, adapter, weights, prompt)


def write_model_card(cfg: TrainingConfig, adapter, weights: Path, prompt: str) -> None:
    from ..toy import TOY_ALIASES

    toy = str(cfg.pretrained_model_name_or_path).lower() in TOY_ALIASES
    base_expr = ("superlora_diffusers.toy.resolve_base_model('toy'), torch_dtype=torch.float32" if toy
                 else f'"{cfg.pretrained_model_name_or_path}"')
    n_params, lora1 = adapter.n_params, adapter.lora1
    card = f"""---
base_model: {cfg.pretrained_model_name_or_path}
library_name: diffusers
tags:
- text-to-image
- diffusers
- superlora
- dreambooth
instance_prompt: {cfg.instance_prompt}
---

# {adapter.title} DreamBooth adapter

Trained with `train_dreambooth_superlora.py` on `{cfg.pretrained_model_name_or_path}` from the images in
`{cfg.instance_data_dir}` with the instance prompt **{cfg.instance_prompt}**
{f"and prior preservation on *{cfg.class_prompt}* (target: {cfg.prior_loss_target.replace('_', ' ')})" if cfg.with_prior_preservation else ""}.

- trainable parameters: **{n_params:,}** ({weights.stat().st_size:,} bytes on disk); a rank-1 LoRA of the same
  targets has {lora1:,} ({versus_lora1(n_params, lora1)})
- configuration: {adapter.describe()}
- steps: {cfg.max_train_steps or 'from epochs'}, learning rate {cfg.learning_rate}, batch {cfg.train_batch_size}, seed {cfg.seed}

![samples](samples.png) (prompt: "{prompt}")

```python
import torch
import superlora_diffusers
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base_expr})
{adapter.load_code.format(out=cfg.output_dir)}
image = pipe("{cfg.instance_prompt}").images[0]
```

Full config:
```json
{json.dumps(adapter.config_dict(), indent=1)}
```
"""
    (Path(cfg.output_dir) / "README.md").write_text(card)

