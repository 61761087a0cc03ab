"""DreamBooth training of one shared SuperLoRA: the logic behind `train_dreambooth_superlora.py`.

Flags follow diffusers' `examples/dreambooth/train_dreambooth_lora.py`, plus the SuperLoRA ones. Two
choices differ from that script, both for exact, testable resumes:
- All randomness of a step (batch order, flips, noise, timesteps, VAE sampling) comes from generators
  seeded by (seed, epoch) or (seed, step, process), so a run resumed from `checkpoint-N` replays the
  same steps an uninterrupted run would: on CPU the final weights are bit-identical.
- The tiny instance/class sets are preprocessed once (pixels, and their latents when the VAE is
  frozen) instead of going through a DataLoader.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import PRESETS, SuperLoRAConfig, config_from_preset
from .superlora import count_parameters
from .targets import with_text_encoder

logger = logging.getLogger("superlora.dreambooth")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
WEIGHT_NAME = "superlora_weights.safetensors"


class TrainingError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DreamBooth a SuperLoRA adapter: one small shared tensor generates every attention ΔW.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--pretrained_model_name_or_path", default="toy",
                   help="diffusers folder or hub id; 'toy' = the embedded default base model")
    m.add_argument("--revision", default=None)
    m.add_argument("--variant", default=None)
    m.add_argument("--tokenizer_name", default=None)
    d = p.add_argument_group("data")
    d.add_argument("--instance_data_dir", required=True, help="3-10 images of the subject (+ optional <image>.txt captions)")
    d.add_argument("--instance_prompt", required=True, help="e.g. 'a photo of sks star'")
    d.add_argument("--class_data_dir", default=None, help="class images for prior preservation (generated if too few)")
    d.add_argument("--class_prompt", default=None, help="e.g. 'a photo of a star'")
    d.add_argument("--with_prior_preservation", action="store_true")
    d.add_argument("--prior_loss_weight", type=float, default=1.0)
    d.add_argument("--prior_loss_target", choices=["noise", "base_model"], default="noise",
                   help="what the class batch regresses to: the sampled noise (DreamBooth), or the frozen base "
                        "model's own prediction for it (adapter off), which pins class prompts to the base directly")
    d.add_argument("--num_class_images", type=int, default=100)
    d.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    d.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    d.add_argument("--resolution", type=int, default=None, help="default: the base model's native size")
    d.add_argument("--center_crop", action="store_true")
    d.add_argument("--random_flip", action="store_true")
    d.add_argument("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch")
    d.add_argument("--caption_extension", default=".txt", help="per-image caption files <image><ext> override the prompt")
    t = p.add_argument_group("SuperLoRA")
    t.add_argument("--superlora_preset", choices=sorted(PRESETS), default="lorta",
                   help="special case of the method to start from; the flags below override it")
    t.add_argument("--param_budget", type=int, default=None,
                   help="the best measured recipe that fits this many trainable parameters (the embedding of "
                        "--train_text_encoder_ti included); below all of them, the largest configuration that fits")
    t.add_argument("--factorization", choices=["lora", "kronecker", "tucker"], default=None)
    t.add_argument("--rank", type=int, default=None)
    t.add_argument("--alpha", type=float, default=None, help="ΔW is scaled by alpha/rank (default alpha = rank)")
    t.add_argument("--groups", default=None,
                   help="number of groups G, 'weight' for one per weight, or 'shape' for a Tucker over (layer, d_out, "
                        "d_in) of each shape's weights (with --factorization tucker --fold 3)")
    t.add_argument("--fold", type=int, default=None, help="fold each group into an M-way tensor")
    t.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--projection", choices=["none", "fastfood", "gaussian"], default=None)
    t.add_argument("--projection_ratio", type=float, default=None)
    t.add_argument("--kron_splits", type=int, default=None)
    t.add_argument("--kron_factor", type=int, default=None)
    t.add_argument("--target_modules", default=None,
                   help="preset ('unet', 'unet-cross', 'unet+conv' [adds the ResNet convs, LoCon-style], 'unet+text', "
                        "'unet+conv+text') or comma-separated module-name regexes; --train_text_encoder adds the text "
                        "encoder's attention to any of them")
    t.add_argument("--train_text_encoder", action="store_true",
                   help="the shared SuperLoRA also spans the text encoder's attention ('unet+conv' becomes "
                        "'unet+conv+text'), and the text encoder runs every step")
    t.add_argument("--train_text_encoder_ti", action="store_true",
                   help="pivotal tuning: also train the input embedding of --token_abstraction (an offset per token id, "
                        "saved in the adapter file); the text encoder runs every step")
    t.add_argument("--token_abstraction", default="sks",
                   help="with --train_text_encoder_ti: the identifier word of --instance_prompt whose embedding trains")
    t.add_argument("--text_encoder_lr", type=float, default=None,
                   help="with --train_text_encoder_ti: the embedding's learning rate (default: --learning_rate)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--train_batch_size", type=int, default=4)
    o.add_argument("--num_train_epochs", type=int, default=1)
    o.add_argument("--max_train_steps", type=int, default=None, help="overrides num_train_epochs")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--gradient_checkpointing", action="store_true")
    o.add_argument("--learning_rate", type=float, default=1e-3)
    o.add_argument("--scale_lr", action="store_true")
    o.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    o.add_argument("--lr_warmup_steps", type=int, default=0)
    o.add_argument("--lr_num_cycles", type=int, default=1)
    o.add_argument("--lr_power", type=float, default=1.0)
    o.add_argument("--use_8bit_adam", action="store_true")
    o.add_argument("--adam_beta1", type=float, default=0.9)
    o.add_argument("--adam_beta2", type=float, default=0.999)
    o.add_argument("--adam_weight_decay", type=float, default=1e-2)
    o.add_argument("--adam_epsilon", type=float, default=1e-8)
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--use_ema", action="store_true",
                   help="save and validate an exponential moving average of the factors (as diffusers' text-to-image)")
    o.add_argument("--ema_decay", type=float, default=0.99, help="with --use_ema; about 1/(1-decay) steps averaged")
    o.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is typical)")
    o.add_argument("--noise_offset", type=float, default=0.0)
    o.add_argument("--allow_tf32", action="store_true")
    o.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    o.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    v = p.add_argument_group("validation")
    v.add_argument("--validation_prompt", default=None)
    v.add_argument("--num_validation_images", type=int, default=4)
    v.add_argument("--validation_steps", type=int, default=100, help="validate every N optimizer steps")
    v.add_argument("--num_inference_steps", type=int, default=25)
    v.add_argument("--guidance_scale", type=float, default=5.0)
    s = p.add_argument_group("output and checkpoints")
    s.add_argument("--output_dir", default="superlora-dreambooth-model")
    s.add_argument("--overwrite_output_dir", action="store_true", help="allow replacing weights already in output_dir")
    s.add_argument("--checkpointing_steps", type=int, default=500)
    s.add_argument("--checkpoints_total_limit", type=int, default=None)
    s.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N directory")
    s.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none")
    s.add_argument("--logging_dir", default="logs", help="relative to output_dir")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.with_prior_preservation and (not args.class_prompt or not args.class_data_dir):
        raise TrainingError("--with_prior_preservation needs --class_prompt and --class_data_dir.")
    if args.prior_loss_target != "noise" and not args.with_prior_preservation:
        raise TrainingError(f"--prior_loss_target {args.prior_loss_target} acts on the class batch; add "
                            "--with_prior_preservation (with --class_prompt and --class_data_dir).")
    for name in ("train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                 "checkpointing_steps", "validation_steps"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        fixed = max(8, -(-args.resolution // 8) * 8)  # the next multiple up
        raise TrainingError(f"--resolution must be a positive multiple of 8 (diffusers' pipelines refuse others at "
                            f"validation), got {args.resolution}; use {fixed}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise TrainingError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.train_text_encoder_ti and args.token_abstraction not in args.instance_prompt.split():
        raise TrainingError(f"--token_abstraction {args.token_abstraction!r} is not a word of --instance_prompt "
                            f"{args.instance_prompt!r}; name the identifier word the prompt uses.")
    if not 0 <= args.ema_decay < 1:
        raise TrainingError(f"--ema_decay must be in [0, 1), got {args.ema_decay}; 0.99 averages about 100 steps.")
    return args


# ---- adapter configuration ---------------------------------------------------------------------
def superlora_config_from_args(args: argparse.Namespace, shapes_for, token_parameters: int = 0
                               ) -> tuple[SuperLoRAConfig, str]:
    """The config the flags ask for, and a sentence saying how it was chosen.

    `shapes_for(target_modules)` returns the (d_out, d_in) list of those targets, so a budget can be
    met exactly before anything is injected; `token_parameters` is the size of the identifier's embedding,
    which `--param_budget` counts when `--train_text_encoder_ti` trains it.
    """
    targets = args.target_modules or "unet"
    if "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if args.train_text_encoder:
        try:
            targets = with_text_encoder(targets)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if args.param_budget is not None:
        ti = bool(getattr(args, "train_text_encoder_ti", False))
        config, why = choose_config_for_budget(args.param_budget - (token_parameters if ti else 0),
                                               shapes_for(targets), target_modules=targets, pivotal=ti)
        return config, f"--param_budget {args.param_budget}: {why}: {describe(config)}"
    overrides = {k: getattr(args, k) for k in ("factorization", "rank", "alpha", "fold", "shuffle", "projection",
                                               "projection_ratio", "kron_splits", "kron_factor")
                 if getattr(args, k) is not None}
    if args.groups is not None:
        overrides["groups"] = args.groups if args.groups in ("weight", "shape") else int(args.groups)
    if overrides.get("projection_ratio", 1.0) < 1.0 and "projection" not in overrides:
        overrides["projection"] = "fastfood"
    preset_defaults = {"rank": 4} if args.superlora_preset != "lorta" else {"rank": 4, "groups": 4}
    preset_defaults = {k: v for k, v in preset_defaults.items() if k not in PRESETS[args.superlora_preset]}
    try:
        config = config_from_preset(args.superlora_preset, target_modules=targets, **{**preset_defaults, **overrides})
    except ValueError as e:
        raise TrainingError(str(e)) from None
    return config, f"preset {args.superlora_preset!r}: {describe(config)}"


def describe(config: SuperLoRAConfig) -> str:
    parts = [config.factorization, f"rank={config.rank}", f"groups={config.groups}", f"fold={config.fold}"]
    if config.factorization == "kronecker":
        parts.append(f"kron_splits={config.kron_splits}")
    if config.shuffle:
        parts.append("shuffle")
    if config.projection != "none":
        parts.append(f"{config.projection} ρ={config.projection_ratio}")
    return " ".join(parts)


# Recipes measured by benchmarks/quality.py (UNet attention + ResNet convs + CLIP attention, 1,500 steps, prior
# loss; docs/benchmarks.md, "Tiny adapters"), best first, with and without pivotal tuning: the shared Tucker axes
# layout learns a subject only beside the identifier's embedding, while per-weight LoRA r=1 does without it.
MEASURED_RECIPES: dict[bool, list[tuple[str, dict]]] = {
    True: [("lora", {"rank": 4}), ("tucker-axes", {}), ("lora", {"rank": 1}), ("lorta", {"groups": 12, "rank": 5})],
    False: [("lora", {"rank": 4}), ("lora", {"rank": 1}), ("tucker-axes", {}), ("lorta", {"groups": 12, "rank": 5})],
}


def choose_config_for_budget(budget: int, shapes: list[tuple[int, int]], target_modules="unet",
                             pivotal: bool = False) -> tuple[SuperLoRAConfig, str]:
    """The best measured recipe (`MEASURED_RECIPES`) that fits the budget, and a few words on how it was chosen.

    Below every measured recipe: the candidate with the most trainable parameters that fits, among per-weight
    LoRA, Tucker (fold 3-5, G in 1..12), then Tucker with Fastfood projection (ρ = 0.1, 0.01).
    """
    for preset, overrides in MEASURED_RECIPES[pivotal]:
        config = config_from_preset(preset, target_modules=target_modules, **overrides)
        with contextlib.suppress(ValueError):  # a layout these shapes cannot take is simply not a candidate
            if count_parameters(config, shapes) <= budget:
                return config, f"the best measured recipe that fits ({preset})"
    candidates: list[SuperLoRAConfig] = []
    for rank in range(1, 65):
        candidates.append(SuperLoRAConfig.lora(rank=rank, target_modules=target_modules))
    for fold in (3, 4, 5):
        for groups in (1, 2, 4, 8, 12):
            for rank in range(1, 17):
                candidates.append(SuperLoRAConfig.lorta(fold=fold, groups=groups, rank=rank, target_modules=target_modules))
    for ratio in (0.1, 0.01):
        for fold in (3, 4, 5, 6, 8):
            for rank in range(1, 9):
                candidates.append(SuperLoRAConfig.lorta(fold=fold, groups=1, rank=rank, projection="fastfood",
                                                        projection_ratio=ratio, target_modules=target_modules))
    best, best_count = None, -1
    for config in candidates:
        try:
            n = count_parameters(config, shapes)
        except ValueError:
            continue
        if best_count < n <= budget:
            best, best_count = config, n
    if best is None:
        raise TrainingError(f"--param_budget is below the smallest SuperLoRA for these targets ({budget} left for the "
                            "factors); raise it.")
    return best, "below every measured recipe, the largest configuration that fits (not measured)"


# ---- data --------------------------------------------------------------------------------------
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


# ---- checkpoints -------------------------------------------------------------------------------
def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(arg: str | None, output_dir: Path) -> Path | None:
    if arg is None:
        return None
    if arg == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(arg)
    if not path.is_absolute() and not path.exists():
        path = output_dir / arg
    if not path.is_dir():
        raise TrainingError(f"checkpoint {arg!r} not found; pass 'latest' or an existing checkpoint-N folder.")
    return path


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for old in list_checkpoints(output_dir)[:-limit] if limit > 0 else list_checkpoints(output_dir):
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    if (output_dir / WEIGHT_NAME).exists() and not overwrite and not resuming:
        raise TrainingError(
            f"{str(output_dir / WEIGHT_NAME)!r} already exists; pass --overwrite_output_dir to replace it or pick "
            "another --output_dir."
        )
