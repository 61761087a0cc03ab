"""The DreamBooth training loop (accelerate): data → noise → UNet with one shared SuperLoRA → MSE.

Called by `train_dreambooth_superlora.py`; the flags, data handling and checkpoint helpers live in
`dreambooth.py`. Only the SuperLoRA factors train: they stay fp32 whatever `--mixed_precision` is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image

from .dreambooth import (
    WEIGHT_NAME,
    Examples,
    TrainingError,
    check_output_dir,
    describe,
    epoch_batches,
    list_checkpoints,
    list_images,
    load_examples,
    parse_args,
    prune_checkpoints,
    resolve_resume,
    step_generator,
    superlora_config_from_args,
)
from .superlora import lora_parameter_count, versus_lora1
from .tokens import token_ids_for

logger = logging.getLogger("superlora.dreambooth")
STATE_FILE = "superlora_training_state.json"
EMA_WEIGHT_NAME = "superlora_weights_ema.safetensors"


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def load_base(args: argparse.Namespace):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of the base model, frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .toy import resolve_base_model

    path = resolve_base_model(args.pretrained_model_name_or_path)
    common = dict(revision=args.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or path, subfolder=None if args.tokenizer_name else "tokenizer", **common)
        # fp32 whatever the files store (the toy's are fp16); --mixed_precision casts later, factors stay fp32
        weights = dict(variant=args.variant, torch_dtype=torch.float32, **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise TrainingError(f"cannot load base model {args.pretrained_model_name_or_path!r}: {first}") from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    return path, tokenizer, text_encoder, vae, unet, scheduler


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
def generate(pipe, prompt: str, count: int, seed: int, args: argparse.Namespace, resolution: int) -> list[Image.Image]:
    device = pipe.unet.device
    return [
        pipe(prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
             height=resolution, width=resolution,
             generator=torch.Generator(device="cpu").manual_seed(seed + i)).images[0]
        for i in range(count)
    ]


def generate_class_images(args: argparse.Namespace, accelerator, path: str, modules, resolution: int) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model's own images of --class_prompt."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([f for f in class_dir.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}])
    missing = args.num_class_images - have
    if missing <= 0 or not accelerator.is_main_process:
        return
    logger.info("generating %d class images of %r into %s", missing, args.class_prompt, class_dir)
    tokenizer, text_encoder, vae, unet, scheduler = modules
    pipe = make_pipeline(path, tokenizer, text_encoder, vae, unet, scheduler.config)
    for start in range(0, missing, args.sample_batch_size):
        n = min(args.sample_batch_size, missing - start)
        generator = torch.Generator(device="cpu").manual_seed(args.seed + 10_000 + have + start)
        images = pipe([args.class_prompt] * n, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, height=resolution, width=resolution,
                      generator=generator).images
        for i, image in enumerate(images):
            image.save(class_dir / f"class-{have + start + i:05d}.png")


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


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


def train(args: argparse.Namespace, on_step=None) -> Path:
    """Run the DreamBooth loop; `on_step(step, max_steps, loss)`, if given, is called after every optimizer step."""
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, args.overwrite_output_dir, resume is not None)
    list_images(args.instance_data_dir, "--instance_data_dir")  # fail fast, before loading any model

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    from .model import get_superlora_model, inject_superlora, target_shapes
    from .serialization import save_superlora_file
    from .targets import TEXT_ENCODERS
    report_to = None if args.report_to == "none" else args.report_to
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # several processes without CUDA: accelerate needs cpu=True to pick gloo (`accelerate launch --multi_gpu`)
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    if accelerator.num_processes != world_size:
        raise TrainingError(f"launched {world_size} processes but accelerate sees {accelerator.num_processes}; "
                            "on CPU use `accelerate launch --multi_gpu --num_processes N`.")
    if args.enable_xformers_memory_efficient_attention and not torch.cuda.is_available():
        raise TrainingError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU.")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)  # the adapter's initial factors: identical on every process

    path, tokenizer, text_encoder, vae, unet, noise_scheduler = load_base(args)
    resolution = args.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (text_encoder, vae, unet):
        module.to(device)

    # --- data ---
    instance = load_examples(args.instance_data_dir, args.instance_prompt, resolution, args.center_crop,
                             args.caption_extension, "--instance_data_dir")
    classes: Examples | None = None
    if args.with_prior_preservation:
        with accelerator.main_process_first():
            generate_class_images(args, accelerator, path, (tokenizer, text_encoder, vae, unet, noise_scheduler), resolution)
        classes = load_examples(args.class_data_dir, args.class_prompt, resolution, args.center_crop,
                                args.caption_extension, "--class_data_dir", limit=args.num_class_images)
    inst_stats = latent_stats(vae, instance.pixels, args.random_flip)
    class_stats = latent_stats(vae, classes.pixels, args.random_flip) if classes else None

    # --- the one shared SuperLoRA ---
    components = {"unet": unet, "text_encoder": text_encoder}
    token_ids = tuple(token_ids_for(tokenizer, args.token_abstraction))
    token_dim = text_encoder.get_input_embeddings().embedding_dim
    config, how = superlora_config_from_args(args, lambda targets: target_shapes(components, targets),
                                             len(token_ids) * token_dim)
    if args.train_text_encoder_ti:  # pivotal tuning: the identifier's embedding offsets live in the same module
        config = dataclasses.replace(config, token=args.token_abstraction, token_ids=token_ids, token_dim=token_dim)
    superlora = inject_superlora(components, config)
    superlora_model = get_superlora_model(components)
    adapter = superlora_model.adapters["default"]
    target_names = adapter.targets
    if not args.train_text_encoder and any(n.split(".", 1)[0] in TEXT_ENCODERS for n in target_names):
        raise TrainingError(f"--target_modules {args.target_modules} adapts the text encoder, which stays frozen; add "
                            "--train_text_encoder.")
    n_params = superlora.num_parameters()
    lora1 = lora_parameter_count(superlora.shapes)
    if accelerator.is_main_process:
        logger.info("SuperLoRA %s", how)
        logger.info("adapting %d weights (%s entries); trainable parameters: %s (~%.1f KB as fp32); "
                    "a rank-1 LoRA of the same targets: %s (%s)", len(superlora.shapes),
                    f"{superlora.layout.total:,}", f"{n_params:,}", 4 * n_params / 1024, f"{lora1:,}", versus_lora1(n_params, lora1))
    for module in (text_encoder, vae, unet):
        module.to(dtype=weight_dtype)
    superlora.to(dtype=torch.float32)  # trainable factors stay fp32 (no "unscale FP16 gradients")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    # Text states that never change, encoded once by the base text encoder: every prompt when it stays frozen,
    # and the class prompts when the base model's prediction is the prior target.
    encode_every_step = args.train_text_encoder or args.train_text_encoder_ti
    fixed = set() if encode_every_step else set(instance.prompts)
    if classes is not None and (not encode_every_step or args.prior_loss_target == "base_model"):
        fixed |= set(classes.prompts)
    fixed_embeds: dict[str, torch.Tensor] = {}
    with torch.no_grad(), superlora_model.disable_adapter():
        for p in sorted(fixed):
            fixed_embeds[p] = encode_prompts(tokenizer, text_encoder, [p])[0].to(weight_dtype)

    params = [p for p in superlora.parameters() if p.requires_grad]
    lr = args.learning_rate
    ti_lr = args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        ti_lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    token_params = list(superlora.tokens.parameters()) if config.token is not None else []
    groups = [{"params": [p for p in params if all(p is not t for t in token_params)], "lr": lr}]
    if token_params:  # the embedding offsets at their own rate (diffusers' --text_encoder_lr)
        groups.append({"params": token_params, "lr": ti_lr})
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only).") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    items = list(range(len(instance.prompts))) * args.repeats
    batches_per_epoch = len(epoch_batches(len(items), args.train_batch_size, args.seed, 0, 0, accelerator.num_processes))
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)

    # The frozen UNet is not wrapped (DDP refuses a module without trainable parameters): the factors'
    # gradients are averaged across processes by hand below, and mixed precision runs under autocast.
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    def save_weights(path: Path, extra: dict[str, str] | None = None) -> None:
        save_superlora_file(path, superlora, target_names, {**adapter.metadata, **(extra or {})}, overwrite=True)

    ema = AdapterEMA(superlora, args.ema_decay) if args.use_ema else None

    def save_checkpoint_weights(directory: Path) -> None:
        save_weights(directory / WEIGHT_NAME)
        if ema is not None:
            with ema.swapped_in():
                save_weights(directory / EMA_WEIGHT_NAME)

    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        superlora.load_state_dict(load_checkpoint_weights(resume / WEIGHT_NAME))
        if ema is not None:
            if not (resume / EMA_WEIGHT_NAME).is_file():
                raise TrainingError(f"{resume} holds no EMA weights ({EMA_WEIGHT_NAME}); resume it without --use_ema.")
            ema.load_state_dict(load_checkpoint_weights(resume / EMA_WEIGHT_NAME))
        global_step = json.loads((resume / STATE_FILE).read_text())["global_step"]
        logger.info("resumed from %s at step %d", resume, global_step)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("superlora-dreambooth", config={k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})

    @torch.no_grad()
    def base_prediction(noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The frozen base model's output for the class batch: the target of `--prior_loss_target base_model`."""
        hidden = torch.stack([fixed_embeds[p] for p in prompts]).to(device)
        with superlora_model.disable_adapter(), accelerator.autocast():
            return unet(noisy, timesteps, hidden).sample

    def averaged():
        """With --use_ema, the averaged factors for the block (validation, the final file); else as they are."""
        return ema.swapped_in() if ema is not None else contextlib.nullcontext()

    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    micro_per_update = args.gradient_accumulation_steps
    start_micro = global_step * micro_per_update
    last_checkpoint = list_checkpoints(output_dir)[-1] if list_checkpoints(output_dir) else None
    trainable = [unet] + ([text_encoder] if args.train_text_encoder else [])
    for m in trainable:
        m.train()
    t0 = time.time()
    micro = 0
    for epoch in range(num_epochs):
        for batch in epoch_batches(len(items), args.train_batch_size, args.seed, epoch,
                                   accelerator.process_index, accelerator.num_processes):
            if micro < start_micro:  # replaying a resumed run: skip what was already done
                micro += 1
                continue
            if global_step >= max_steps:
                break
            g = step_generator(args.seed, 2, micro, accelerator.process_index)
            idx = [items[i] for i in batch]
            n = len(idx)  # instance rows first, then as many class rows
            latents = sample_latents(inst_stats, idx, g, args.random_flip)
            prompts = [instance.prompts[i] for i in idx]
            if classes is not None:
                cidx = torch.randint(0, len(classes.prompts), (len(idx),), generator=g).tolist()
                latents = torch.cat([latents, sample_latents(class_stats, cidx, g, args.random_flip)])
                prompts += [classes.prompts[i] for i in cidx]
            latents = (latents * vae.config.scaling_factor).to(device, weight_dtype)
            noise = torch.randn(latents.shape, generator=g)
            if args.noise_offset:
                noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
            noise = noise.to(device, weight_dtype)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      generator=g).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)

            with accelerator.accumulate(unet):
                if encode_every_step:
                    hidden = encode_prompts(tokenizer, text_encoder, prompts)
                else:
                    hidden = torch.stack([fixed_embeds[p] for p in prompts]).to(device)
                with accelerator.autocast():
                    pred = unet(noisy, timesteps, hidden).sample
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                if classes is not None and args.prior_loss_target == "base_model":
                    target = torch.cat([target[:n], base_prediction(noisy[n:], timesteps[n:], prompts[n:])])
                per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if args.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weight = torch.minimum(snr, torch.full_like(snr, args.snr_gamma))
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        weight = weight / (snr + 1)
                    else:
                        weight = weight / snr
                    per_sample = per_sample * weight
                if classes is not None:
                    instance_loss, prior_loss = per_sample[:n].mean(), per_sample[n:].mean()
                    loss = instance_loss + args.prior_loss_weight * prior_loss
                else:
                    loss = per_sample.mean()
                bad = accelerator.reduce(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device), "sum")
                if bad.item() > 0:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
                    progress.close()
                    raise TrainingError(
                        f"loss became NaN/inf at step {global_step + 1}; stopped without updating the weights "
                        f"({where}). Lower --learning_rate or use --mixed_precision bf16/no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.num_processes > 1:
                    for p in params:
                        p.grad = accelerator.reduce(p.grad, "mean")
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.update(global_step)
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            if classes is not None:  # how far the class prompts drift, apart from the subject's own loss
                logs.update(instance_loss=instance_loss.detach().item(), prior_loss=prior_loss.detach().item())
            accelerator.log(logs, step=global_step)
            if on_step is not None:
                on_step(global_step, max_steps, logs["loss"])
            if global_step % args.checkpointing_steps == 0 or global_step == max_steps:  # the last one: to extend
                last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit,
                                                  save_checkpoint_weights)
            if args.validation_prompt and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                with averaged():
                    validate(args, accelerator, path, (tokenizer, text_encoder, vae, unet),
                             noise_scheduler, resolution, global_step, superlora)
                for m in trainable:
                    m.train()
        if global_step >= max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # averaged gradients keep every replica identical: check it
        flat = torch.cat([p.detach().reshape(-1) for p in params]).to(device)
        replicas = accelerator.gather(flat[None])
        if not torch.equal(replicas.min(0).values, replicas.max(0).values):
            raise TrainingError("the SuperLoRA factors differ between processes; gradients were not synchronised.")
        logger.info("factors identical on all %d processes", accelerator.num_processes)
    weights = output_dir / WEIGHT_NAME
    if accelerator.is_main_process:
        logger.info("trained %d steps in %.0f s", global_step, time.time() - t0)
        with averaged():  # with --use_ema the file holds the average
            save_weights(weights, {"instance_prompt": args.instance_prompt,
                                   "base_model": str(args.pretrained_model_name_or_path)})
        final_validation(args, accelerator, path, weights, resolution, n_params, lora1, config)
    accelerator.end_training()
    return weights


class AdapterEMA:
    """An exponential moving average of the trainable factors, swapped in to validate and to save.

    Decay as diffusers' `EMAModel`: min(decay, (1 + step) / (10 + step)), so the average follows the
    fast early steps and then smooths the step-to-step jitter of a constant learning rate.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.shadow.items():
            t.copy_(state[name])


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    from .serialization import parse_superlora, read_superlora_file

    return parse_superlora(*read_superlora_file(path), source=repr(str(path))).state_dict


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, save_weights) -> Path:
    """accelerate state (optimizer, scheduler, RNG) + the factors (`save_weights(dir)`) + our step counter,
    written to a temp dir and renamed into place (atomic)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_weights(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"global_step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def validate(args, accelerator, path, modules, noise_scheduler, resolution, step, superlora) -> None:
    tokenizer, text_encoder, vae, unet = modules
    pipe = make_pipeline(path, tokenizer, text_encoder, vae, unet, noise_scheduler.config)
    images = generate(pipe, args.validation_prompt, args.num_validation_images, args.seed, args, resolution)
    assert all(p.dtype == torch.float32 for p in superlora.parameters()), "validation must not downcast the adapter"
    grid = image_grid(images)
    out = Path(args.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def final_validation(args, accelerator, path, weights: Path, resolution, n_params, lora1, config) -> None:
    """Reload the saved file into a fresh pipeline (what a user does) and write samples + a model card."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_superlora_weights(str(weights.parent), weight_name=weights.name)
    prompt = args.validation_prompt or args.instance_prompt
    images = generate(pipe, prompt, max(1, args.num_validation_images), args.seed, args, resolution)
    image_grid(images).save(Path(args.output_dir) / "samples.png")
    write_model_card(args, n_params, lora1, config, weights, prompt)


def write_model_card(args, n_params: int, lora1: int, config, weights: Path, prompt: str) -> None:
    from .toy import TOY_ALIASES

    toy = str(args.pretrained_model_name_or_path).lower() in TOY_ALIASES
    base_expr = ("superlora_diffusers.toy.resolve_base_model('toy'), torch_dtype=torch.float32" if toy
                 else f'"{args.pretrained_model_name_or_path}"')
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
tags:
- text-to-image
- diffusers
- superlora
- dreambooth
instance_prompt: {args.instance_prompt}
---

# SuperLoRA DreamBooth adapter

Trained with `train_dreambooth_superlora.py` on `{args.pretrained_model_name_or_path}` from the images in
`{args.instance_data_dir}` with the instance prompt **{args.instance_prompt}**
{f"and prior preservation on *{args.class_prompt}* (target: {args.prior_loss_target.replace('_', ' ')})" if args.with_prior_preservation else ""}.

- trainable parameters: **{n_params:,}** ({weights.stat().st_size:,} bytes on disk); a rank-1 LoRA of the same
  targets has {lora1:,} ({versus_lora1(n_params, lora1)})
- configuration: {describe(config)}; targets: {config.target_modules}
- steps: {args.max_train_steps or 'from epochs'}, learning rate {args.learning_rate}, batch {args.train_batch_size}, seed {args.seed}

![samples](samples.png) (prompt: "{prompt}")

```python
import torch
import superlora_diffusers
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base_expr})
pipe.load_superlora_weights("{args.output_dir}")
image = pipe("{args.instance_prompt}").images[0]
```

Full config:
```json
{json.dumps(config.to_dict(), indent=1)}
```
"""
    (Path(args.output_dir) / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(parse_args(argv))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
