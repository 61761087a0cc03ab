"""One DreamBooth step: a seeded batch (instance rows, then as many class rows), noise, the UNet, the loss.

The class rows regress onto the sampled noise (DreamBooth's prior preservation) or, with
`--prior_loss_target base_model`, onto the frozen base model's own prediction for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainingError
from .data import encode_prompts, sample_latents, step_generator
from .setup import Run


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    prompts: list[str]
    n: int  # instance rows come first; the rest are class rows


def make_batch(run: Run, rows: list[int], micro: int) -> Batch:
    """The batch of micro-step `micro`: every random draw from a generator seeded by (seed, micro, process)."""
    cfg, accelerator = run.cfg, run.accelerator
    g = step_generator(cfg.seed, 2, micro, accelerator.process_index)
    n = len(rows)
    latents = sample_latents(run.inst_stats, rows, g, cfg.random_flip)
    prompts = [run.instance.prompts[i] for i in rows]
    if run.classes is not None:
        cidx = torch.randint(0, len(run.classes.prompts), (n,), generator=g).tolist()
        latents = torch.cat([latents, sample_latents(run.class_stats, cidx, g, cfg.random_flip)])
        prompts += [run.classes.prompts[i] for i in cidx]
    latents = (latents * run.vae.config.scaling_factor).to(run.device, run.weight_dtype)
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    noise = noise.to(run.device, run.weight_dtype)
    timesteps = sample_timesteps(run.timestep_weights, run.noise_scheduler.config.num_train_timesteps,
                                 latents.shape[0], g)
    timesteps = timesteps.to(run.device)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    return Batch(latents, noise, timesteps, noisy, prompts, n)


def sample_timesteps(weights: torch.Tensor | None, num_timesteps: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform, or drawn by the run's timestep weights (`timestep_weights`, built once per run)."""
    if weights is None:
        return torch.randint(0, num_timesteps, (n,), generator=g)
    return torch.multinomial(weights, n, replacement=True, generator=g)


@torch.no_grad()
def base_prediction(run: Run, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The frozen base model's output for the class rows: the target of `--prior_loss_target base_model`."""
    hidden = torch.stack([run.fixed_embeds[p] for p in prompts]).to(run.device)
    with run.adapter.disabled(), run.accelerator.autocast():
        return run.denoiser(noisy, timesteps, hidden).sample


def losses(run: Run, b: Batch) -> dict[str, torch.Tensor]:
    """{"loss"} and, with prior preservation, {"instance_loss", "prior_loss"}: MSE per row, Min-SNR weighted."""
    from diffusers.training_utils import compute_snr

    cfg, scheduler = run.cfg, run.noise_scheduler
    if run.encode_every_step:
        hidden = encode_prompts(run.tokenizer, run.text_encoder, b.prompts)
    else:
        hidden = torch.stack([run.fixed_embeds[p] for p in b.prompts]).to(run.device)
    with run.accelerator.autocast():
        pred = run.denoiser(b.noisy, b.timesteps, hidden).sample
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(b.latents, b.noise, b.timesteps) if v_prediction else b.noise
    if run.classes is not None and cfg.prior_loss_target == "base_model":
        n = b.n
        target = torch.cat([target[:n], base_prediction(run, b.noisy[n:], b.timesteps[n:], b.prompts[n:])])
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma is not None:
        snr = compute_snr(scheduler, b.timesteps)
        weight = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma))
        per_sample = per_sample * (weight / (snr + 1) if v_prediction else weight / snr)
    if run.classes is None:
        return {"loss": per_sample.mean()}
    instance_loss, prior_loss = per_sample[:b.n].mean(), per_sample[b.n:].mean()
    return {"loss": instance_loss + cfg.prior_loss_weight * prior_loss, "instance_loss": instance_loss,
            "prior_loss": prior_loss}


def check_finite(run: Run, loss: torch.Tensor, step: int, last_checkpoint) -> None:
    """Stop every process, before any update, when one of them sees a NaN/inf loss."""
    device = run.device
    bad = run.accelerator.reduce(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device), "sum")
    if bad.item() > 0:
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise TrainingError(f"loss became NaN/inf at step {step + 1}; stopped without updating the weights "
                            f"({where}). Lower --learning_rate or use --mixed_precision bf16/no.")


def update(run: Run, loss: torch.Tensor, optimizer, lr_scheduler) -> None:
    """Backward (DDP averages the UNet's gradients across processes), then at the end of an accumulation average
    the rest (a text encoder's own peft parameters), clip, and step."""
    accelerator, params = run.accelerator, [p for p in run.adapter.module.parameters() if p.requires_grad]
    accelerator.backward(loss)
    if accelerator.sync_gradients and accelerator.num_processes > 1:
        for p in run.averaged_by_hand:
            p.grad = accelerator.reduce(p.grad, "mean")
    if accelerator.sync_gradients and run.cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, run.cfg.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
