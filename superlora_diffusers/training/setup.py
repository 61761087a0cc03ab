"""Everything a run builds before its first step: accelerator, frozen base model, data, adapter, optimiser.

`Run` holds what the step and the loop read, so their functions take one argument instead of twenty.
Only the SuperLoRA factors train: they stay fp32 whatever `--mixed_precision` is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import build_adapter
from .config import TrainingConfig, TrainingError
from .data import (
    Examples,
    encode_prompts,
    epoch_batches,
    generate_class_images,
    latent_stats,
    load_examples,
)


@dataclass
class Run:
    """The state of one run that the step, the loop and the checkpoints share."""

    cfg: TrainingConfig
    accelerator: object
    path: str  # the base model's folder
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    resolution: int = 0
    weight_dtype: torch.dtype = torch.float32
    instance: Examples | None = None
    classes: Examples | None = None
    inst_stats: torch.Tensor | None = None
    class_stats: torch.Tensor | None = None
    adapter: object = None  # what trains (adapters.py): its parameters are the only trainable ones
    denoiser: torch.nn.Module | None = None  # the UNet as training calls it (accelerate's DDP with several processes)
    averaged_by_hand: list[torch.nn.Parameter] = field(default_factory=list)  # trainable, but outside the UNet
    encode_every_step: bool = False
    fixed_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    timestep_weights: torch.Tensor | None = None  # --timestep_bias_strategy's draw; None: uniform

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def make_accelerator(cfg: TrainingConfig, output_dir: Path):
    """accelerate's `Accelerator` for this launch, refusing set-ups it would silently get wrong."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # several processes without CUDA: accelerate needs cpu=True to pick gloo (`accelerate launch --multi_gpu`)
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
    )
    if accelerator.num_processes != world_size:
        raise TrainingError(f"launched {world_size} processes but accelerate sees {accelerator.num_processes}; "
                            "on CPU use `accelerate launch --multi_gpu --num_processes N`.")
    if cfg.enable_xformers_memory_efficient_attention and not torch.cuda.is_available():
        raise TrainingError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU.")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def load_base(cfg: TrainingConfig, accelerator) -> Run:
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of the base model, frozen, on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..toy import resolve_base_model

    path = resolve_base_model(cfg.pretrained_model_name_or_path)
    common = dict(revision=cfg.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.tokenizer_name or path,
                                                  subfolder=None if cfg.tokenizer_name else "tokenizer", **common)
        # fp32 whatever the files store (the toy's are fp16); --mixed_precision casts later, factors stay fp32
        weights = dict(variant=cfg.variant, torch_dtype=torch.float32, **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise TrainingError(f"cannot load base model {cfg.pretrained_model_name_or_path!r}: {first}") from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(accelerator.device)
    run = Run(cfg, accelerator, path, tokenizer, text_encoder, vae, unet, scheduler)
    run.resolution = cfg.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    run.timestep_weights = timestep_weights(cfg, scheduler.config.num_train_timesteps)
    return run


def timestep_weights(cfg: TrainingConfig, num_timesteps: int) -> torch.Tensor | None:
    """diffusers' timestep weights for --timestep_bias_strategy (the biased ones x multiplier, normalised), once per
    run, so a range past the scheduler is refused before training; None keeps the uniform draw."""
    if cfg.timestep_bias_strategy == "none":
        return None
    weights = torch.ones(num_timesteps)
    biased = int(cfg.timestep_bias_portion * num_timesteps)
    if cfg.timestep_bias_strategy == "range":
        if cfg.timestep_bias_end > num_timesteps:
            raise TrainingError(f"--timestep_bias_end {cfg.timestep_bias_end} is past the scheduler's "
                                f"{num_timesteps} timesteps; use at most {num_timesteps}.")
        weights[cfg.timestep_bias_begin:cfg.timestep_bias_end] *= cfg.timestep_bias_multiplier
    elif cfg.timestep_bias_strategy == "earlier":
        weights[:biased] *= cfg.timestep_bias_multiplier
    else:
        weights[num_timesteps - biased:] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def load_data(run: Run) -> None:
    """Instance images, class images (generated by the base model when too few), and their VAE posteriors."""
    cfg = run.cfg
    run.instance = load_examples(cfg.instance_data_dir, cfg.instance_prompt, run.resolution, cfg.center_crop,
                                 cfg.caption_extension, "--instance_data_dir")
    if cfg.with_prior_preservation:
        with run.accelerator.main_process_first():
            generate_class_images(cfg, run.accelerator, run.path, (run.tokenizer, run.text_encoder, run.vae, run.unet,
                                                                   run.noise_scheduler), run.resolution)
        run.classes = load_examples(cfg.class_data_dir, cfg.class_prompt, run.resolution, cfg.center_crop,
                                    cfg.caption_extension, "--class_data_dir", limit=cfg.num_class_images)
    run.inst_stats = latent_stats(run.vae, run.instance.pixels, cfg.random_flip)
    run.class_stats = latent_stats(run.vae, run.classes.pixels, cfg.random_flip) if run.classes else None


def attach_adapter(run: Run) -> None:
    """Attach what `--adapter` trains to the UNet (and text encoder), then cast the frozen rest."""
    from diffusers.training_utils import cast_training_params

    from ..targets import TEXT_ENCODERS

    cfg = run.cfg
    run.adapter = build_adapter(cfg, run.tokenizer, run.unet, run.text_encoder, log=run.accelerator.is_main_process)
    targets = getattr(run.adapter, "targets", [])
    if not cfg.train_text_encoder and any(n.split(".", 1)[0] in TEXT_ENCODERS for n in targets):
        raise TrainingError(f"--target_modules {cfg.target_modules} adapts the text encoder, which stays frozen; add "
                            "--train_text_encoder.")
    for module in (run.text_encoder, run.vae, run.unet):
        module.to(dtype=run.weight_dtype)
    cast_training_params(run.adapter.module, torch.float32)  # what trains stays fp32 (no "unscale FP16 gradients")
    if cfg.gradient_checkpointing:
        run.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            run.text_encoder.gradient_checkpointing_enable()
    if cfg.enable_xformers_memory_efficient_attention:
        run.unet.enable_xformers_memory_efficient_attention()


def encode_fixed_prompts(run: Run) -> None:
    """Text states that never change, encoded once by the base text encoder: every prompt when it stays
    frozen, and the class prompts when the base model's prediction is the prior target."""
    cfg = run.cfg
    run.encode_every_step = cfg.train_text_encoder or cfg.trains_embedding
    fixed = set() if run.encode_every_step else set(run.instance.prompts)
    if run.classes is not None and (not run.encode_every_step or cfg.prior_loss_target == "base_model"):
        fixed |= set(run.classes.prompts)
    with torch.no_grad(), run.adapter.disabled():
        for p in sorted(fixed):
            run.fixed_embeds[p] = encode_prompts(run.tokenizer, run.text_encoder, [p])[0].to(run.weight_dtype)


@dataclass
class Schedule:
    """How many optimizer steps the run makes, over how many epochs of which items."""

    items: list[int]
    max_steps: int
    num_epochs: int


def make_schedule(run: Run) -> Schedule:
    cfg, processes = run.cfg, run.accelerator.num_processes
    items = list(range(len(run.instance.prompts))) * cfg.repeats
    batches_per_epoch = len(epoch_batches(len(items), cfg.train_batch_size, cfg.seed, 0, 0, processes))
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    return Schedule(items, max_steps, math.ceil(max_steps / updates_per_epoch))


def stop_embedding(optimizer, lr_scheduler) -> None:
    """--train_text_encoder_ti_frac: the embedding's rate is 0 from here on (the schedule's base rate too, or its next
    step would restore it), so only the adapter trains, around the pivot the embedding found."""
    from .adapters import EMBEDDING_GROUP

    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") == EMBEDDING_GROUP:
            group["lr"] = scheduler.base_lrs[i] = 0.0


def make_optimizer(run: Run, max_steps: int):
    """AdamW over the adapter (SuperLoRA's embedding offsets at --text_encoder_lr) and the learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    cfg, processes = run.cfg, run.accelerator.num_processes
    lr = cfg.learning_rate
    ti_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * processes
        ti_lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * processes
    groups = run.adapter.param_groups(lr, ti_lr, cfg.loraplus_lr_ratio)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only).") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * processes,
                                 num_training_steps=max_steps * processes,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    # Several processes: the UNet owns what trains (SuperLoRA's generator, which the text encoder only reads;
    # peft's UNet layers), so accelerate's DDP averages those gradients. A text encoder's own peft parameters
    # are averaged in step.update. One process calls the UNet itself: bit for bit the unwrapped run.
    unet_trains = any(p.requires_grad for p in run.unet.parameters())  # not for the embedding alone
    run.denoiser = run.accelerator.prepare(run.unet) if processes > 1 and unet_trains else run.unet
    in_unet = {id(p) for p in run.unet.parameters()}
    run.averaged_by_hand = [p for group in groups for p in group["params"] if id(p) not in in_unet]
    return run.accelerator.prepare(optimizer, lr_scheduler)
