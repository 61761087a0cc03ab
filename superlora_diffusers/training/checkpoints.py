"""Checkpoints: atomic, resumable (accelerate's state + the factors + the step), an EMA of the factors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..serialization import WEIGHT_NAME
from .adapters import LORA_WEIGHTS, PEFT_FOLDER_WEIGHTS
from .config import TrainingError
from .setup import Run

logger = logging.getLogger("superlora.dreambooth")
STATE_FILE = "superlora_training_state.json"
FINAL_NAMES = (WEIGHT_NAME, LORA_WEIGHTS, PEFT_FOLDER_WEIGHTS)


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
    """Never replace a finished adapter (any kind's final file) unless asked."""
    for name in FINAL_NAMES:
        if (output_dir / name).exists() and not overwrite and not resuming:
            raise TrainingError(f"{str(output_dir / name)!r} already exists; pass --overwrite_output_dir to replace "
                                "it or pick another --output_dir.")


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, save_weights) -> Path:
    """accelerate state (optimizer, scheduler, RNG) + the factors (`save_weights(dir)`) + our step counter,
    written to a temp dir and renamed into place (atomic)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG file is in tmp before the main one renames it
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


class AdapterEMA:
    """An exponential moving average of the trainable parameters, swapped in to validate and to save.

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

    @torch.no_grad()
    def capture(self) -> None:
        """Take the parameters as they are now as the average (resume: the checkpoint's EMA file, loaded)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach())


def averaged(ema: AdapterEMA | None):
    """With --use_ema, the averaged factors for the block (validation, the final file); else as they are."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def checkpoint(run: Run, step: int, ema: AdapterEMA | None) -> Path:
    """checkpoint-`step`: accelerate's state, the raw factors (to resume from) and, with EMA, their average."""
    adapter = run.adapter

    def write_weights(directory: Path) -> None:
        adapter.save(directory / adapter.weight_name)
        if ema is not None:
            with ema.swapped_in():
                adapter.save(directory / adapter.ema_weight_name)

    return save_checkpoint(run.accelerator, Path(run.cfg.output_dir), step, run.cfg.checkpoints_total_limit,
                           write_weights)


def restore(run: Run, resume: Path, ema: AdapterEMA | None) -> int:
    """Load checkpoint `resume` into the run (optimizer, scheduler, RNG, factors, EMA); its step."""
    run.accelerator.load_state(str(resume))
    adapter = run.adapter
    adapter.load(resume / adapter.weight_name)
    if ema is not None:
        if not (resume / adapter.ema_weight_name).is_file():
            raise TrainingError(f"{resume} holds no EMA weights ({adapter.ema_weight_name}); resume it without "
                                "--use_ema.")
        with ema.swapped_in():  # read the average through the adapter, then keep it as the shadow
            adapter.load(resume / adapter.ema_weight_name)
            ema.capture()
    step = json.loads((resume / STATE_FILE).read_text())["global_step"]
    logger.info("resumed from %s at step %d", resume, step)
    return step
