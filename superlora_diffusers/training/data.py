"""The run's data: instance and class images (prior preservation), their latents, and seeded batches.

All randomness of a step (batch order, flips, noise, timesteps, VAE sampling) comes from generators seeded
by (seed, epoch) or (seed, step, process), so a run resumed from `checkpoint-N` replays the same steps an
uninterrupted run would: on CPU the final weights are bit-identical. The tiny instance/class sets are
preprocessed once (pixels, then their VAE posteriors) instead of going through a DataLoader.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import TrainingConfig, TrainingError
from .validation import make_pipeline

logger = logging.getLogger("superlora.dreambooth")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(directory: str | os.PathLike, what: str) -> list[Path]:
    """Image files of a folder (sorted); other files are skipped with a warning."""
    path = Path(directory)
    if not path.is_dir():
        raise TrainingError(f"{what} {str(path)!r} does not exist or is not a folder; pass a folder of images.")
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [f.name for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS and f.suffix.lower() != ".txt"]
    if skipped:
        logger.warning("skipping %d non-image file(s) in %s: %s", len(skipped), path, ", ".join(skipped[:5]))
    if not images:
        raise TrainingError(f"{what} {str(path)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add 3-10 photos.")
    return images


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise TrainingError(f"cannot read image {str(path)!r} ({e.__class__.__name__}); remove or replace it.") from None


def preprocess(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """Resize the short side to `resolution`, crop to a square, scale to [-1, 1], (3, H, W)."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class Examples:
    pixels: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    prompts: list[str]


def load_examples(directory: str, prompt: str, resolution: int, center_crop: bool, caption_extension: str,
                  what: str, limit: int | None = None) -> Examples:
    files = list_images(directory, what)[:limit]
    pixels, prompts = [], []
    for f in files:
        pixels.append(preprocess(load_image(f), resolution, center_crop))
        caption = f.with_suffix(caption_extension)
        prompts.append(caption.read_text().strip() if caption.is_file() else prompt)
    return Examples(torch.stack(pixels), prompts)


def step_generator(seed: int, *salt: int) -> torch.Generator:
    """A generator whose state depends only on (seed, salt...): the basis of exact resumes."""
    mixed = seed
    for s in salt:
        mixed = (mixed * 1_000_003 + s + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, process: int, processes: int) -> list[list[int]]:
    """This process's batches of one epoch: a seeded permutation cut into global batches, each split by rank."""
    order = torch.randperm(n_items, generator=step_generator(seed, 1, epoch)).tolist()
    global_batch = batch_size * processes
    batches = []
    for start in range(0, n_items - global_batch + 1, global_batch) or [0]:
        chunk = order[start:start + global_batch]
        if len(chunk) < global_batch:  # fewer items than one global batch: wrap around
            chunk = (chunk * math.ceil(global_batch / max(1, len(chunk))))[:global_batch]
        batches.append(chunk[process * batch_size:(process + 1) * batch_size])
    return batches


@torch.no_grad()
def latent_stats(vae, pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    """(n, 2[flip], 2[mean/std], C, h, w): the VAE posterior of each image and, if asked, its mirror."""
    views = [pixels] + ([pixels.flip(-1)] if flip else [pixels])
    out = []
    for view in views:
        dist = vae.encode(view.to(vae.device, vae.dtype)).latent_dist
        out.append(torch.stack([dist.mean, dist.std], 1).float().cpu())
    return torch.stack(out, 1)


def sample_latents(stats: torch.Tensor, idx: list[int], generator: torch.Generator, random_flip: bool) -> torch.Tensor:
    chosen = stats[idx]  # (b, 2, 2, C, h, w)
    if random_flip:
        flips = torch.randint(0, 2, (len(idx),), generator=generator)
    else:
        flips = torch.zeros(len(idx), dtype=torch.long)
    picked = chosen[torch.arange(len(idx)), flips]
    mean, std = picked[:, 0], picked[:, 1]
    return mean + std * torch.randn(mean.shape, generator=generator)


def generate_class_images(cfg: TrainingConfig, accelerator, path: str, modules, resolution: int) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model's own images of --class_prompt."""
    class_dir = Path(cfg.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([f for f in class_dir.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}])
    missing = cfg.num_class_images - have
    if missing <= 0 or not accelerator.is_main_process:
        return
    logger.info("generating %d class images of %r into %s", missing, cfg.class_prompt, class_dir)
    tokenizer, text_encoder, vae, unet, scheduler = modules
    pipe = make_pipeline(path, tokenizer, text_encoder, vae, unet, scheduler.config)
    for start in range(0, missing, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, missing - start)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 10_000 + have + start)
        images = pipe([cfg.class_prompt] * n, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, height=resolution, width=resolution,
                      generator=generator).images
        for i, image in enumerate(images):
            image.save(class_dir / f"class-{have + start + i:05d}.png")


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]

