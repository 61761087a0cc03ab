"""`train(config)`: the DreamBooth run top to bottom, and `main(argv)`, the command line around it."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import AdapterEMA, averaged, check_output_dir, checkpoint, list_checkpoints, resolve_resume, restore
from .config import TrainingConfig, TrainingError, parse_args
from .data import epoch_batches, list_images
from .setup import (Run, Schedule, attach_adapter, encode_fixed_prompts, load_base, load_data, make_accelerator,
                    make_optimizer, make_schedule, stop_embedding)
from .step import check_finite, losses, make_batch, update
from .validation import final_validation, validate

logger = logging.getLogger("superlora.dreambooth")
OnStep = Callable[[int, int, float], None]


def train(cfg: TrainingConfig, on_step: OnStep | None = None) -> Path:
    """Train one shared SuperLoRA and save it; `on_step(step, max_steps, loss)` is called after every update."""
    cfg.validate()
    output_dir = Path(cfg.output_dir)
    resume = resolve_resume(cfg.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, cfg.overwrite_output_dir, resume is not None)
    list_images(cfg.instance_data_dir, "--instance_data_dir")  # fail fast, before loading any model
    accelerator = make_accelerator(cfg, output_dir)
    torch.manual_seed(cfg.seed)  # the adapter's initial factors: identical on every process
    run = load_base(cfg, accelerator)
    load_data(run)
    attach_adapter(run)
    encode_fixed_prompts(run)
    schedule = make_schedule(run)
    optimizer, lr_scheduler = make_optimizer(run, schedule.max_steps)
    ema = AdapterEMA(run.adapter.module, cfg.ema_decay) if cfg.use_ema else None
    step = restore(run, resume, ema) if resume is not None else 0
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("superlora-dreambooth", config={k: v for k, v in vars(cfg).items()
                                                                  if isinstance(v, (int, float, str, bool))})
    t0 = time.time()
    step = loop(run, schedule, optimizer, lr_scheduler, ema, step, on_step)
    accelerator.wait_for_everyone()
    check_replicas(run)
    weights = output_dir / run.adapter.weight_name
    if accelerator.is_main_process:
        logger.info("trained %d steps in %.0f s", step, time.time() - t0)
        with averaged(ema):  # with --use_ema the file holds the average
            weights = run.adapter.export(output_dir, {"instance_prompt": cfg.instance_prompt,
                                                      "base_model": str(cfg.pretrained_model_name_or_path)})
        final_validation(cfg, run.path, weights, run.resolution, run.adapter)
    # Free the DDP wrapper while its process group is alive: freed after end_training(), its reducer would hold
    # the last reference, and gloo's destructor then deadlocks on the GIL with its own worker thread.
    run.denoiser = None
    accelerator.free_memory()
    accelerator.end_training()
    return weights


def loop(run: Run, schedule: Schedule, optimizer, lr_scheduler, ema: AdapterEMA | None, step: int,
         on_step: OnStep | None) -> int:
    """Optimizer steps from `step` to the schedule's end (a resumed run replays its skipped batches); the last step."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    progress = tqdm(total=schedule.max_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    start_micro, micro = step * cfg.gradient_accumulation_steps, 0
    found = list_checkpoints(Path(cfg.output_dir))
    last_checkpoint = found[-1] if found else None
    pivot = int(cfg.train_text_encoder_ti_frac * schedule.max_steps) if cfg.train_text_encoder_ti_frac < 1 else None
    if pivot is not None and step >= pivot:  # resumed past it
        stop_embedding(optimizer, lr_scheduler)
    train_mode(run)
    try:
        for epoch in range(schedule.num_epochs):
            for rows in epoch_batches(len(schedule.items), cfg.train_batch_size, cfg.seed, epoch,
                                      accelerator.process_index, accelerator.num_processes):
                if micro < start_micro:  # replaying a resumed run: skip what was already done
                    micro += 1
                    continue
                if step >= schedule.max_steps:
                    break
                batch = make_batch(run, [schedule.items[i] for i in rows], micro)
                with accelerator.accumulate(run.denoiser):
                    loss = losses(run, batch)
                    check_finite(run, loss["loss"], step, last_checkpoint)
                    update(run, loss["loss"], optimizer, lr_scheduler)
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step == pivot:
                    stop_embedding(optimizer, lr_scheduler)
                    logger.info("step %d: the embedding stops training (--train_text_encoder_ti_frac %g); the adapter "
                                "goes on", step, cfg.train_text_encoder_ti_frac)
                if ema is not None:
                    ema.update(step)
                report(run, step, schedule.max_steps, loss, lr_scheduler, progress, on_step)
                if step % cfg.checkpointing_steps == 0 or step == schedule.max_steps:  # the last one: to extend
                    last_checkpoint = checkpoint(run, step, ema)
                if cfg.validation_prompt and step % cfg.validation_steps == 0 and accelerator.is_main_process:
                    with averaged(ema):
                        validate(cfg, accelerator, run.path, (run.tokenizer, run.text_encoder, run.vae, run.unet),
                                 run.noise_scheduler, run.resolution, step, run.adapter.module)
                    train_mode(run)
            if step >= schedule.max_steps:
                break
    finally:
        progress.close()
    return step


def train_mode(run: Run) -> None:
    for module in [run.unet] + ([run.text_encoder] if run.cfg.train_text_encoder else []):
        module.train()


def report(run: Run, step: int, max_steps: int, loss: dict[str, torch.Tensor], lr_scheduler, progress,
           on_step: OnStep | None) -> None:
    """The step's loss and rate to the progress bar, the trackers and `on_step`."""
    logs = {"loss": loss["loss"].detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
    progress.update(1)
    progress.set_postfix(**logs)
    # how far the class prompts drift, apart from the subject's own loss
    logs.update({k: v.detach().item() for k, v in loss.items() if k != "loss"})
    run.accelerator.log(logs, step=step)
    if on_step is not None:
        on_step(step, max_steps, logs["loss"])


def check_replicas(run: Run) -> None:
    """Averaged gradients keep every process's adapter identical: check it after a multi-process run."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in run.adapter.module.parameters() if p.requires_grad]).to(run.device)
    replicas = accelerator.gather(flat[None])
    if not torch.equal(replicas.min(0).values, replicas.max(0).values):
        raise TrainingError("the SuperLoRA factors differ between processes; gradients were not synchronised.")
    logger.info("factors identical on all %d processes", accelerator.num_processes)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(parse_args(argv))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
