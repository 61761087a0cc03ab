"""The embedded toy world, base model and judge.

- ``resolve_base_model(name_or_path)``: "toy" (or None / "") -> the shipped diffusers folder
  ``superlora_diffusers/toy/assets/base``; anything else is returned unchanged.
- ``world``: procedural renderer, caption grammar and personalisation subjects.
- ``judge``: frozen judge and scoring API (``load_judge``, ``score``, ``score_prompts``).
"""
from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BASE_MODEL_DIR = os.path.join(ASSETS_DIR, "base")
JUDGE_PATH = os.path.join(ASSETS_DIR, "judge.safetensors")
TOY_ALIASES = ("toy", "toy-base", "superlora-toy")


def resolve_base_model(name_or_path: str | os.PathLike | None = "toy") -> str:
    """Map the alias "toy" (and None or "") to the shipped base-model folder; pass anything else
    (a local folder or a Hub id) through unchanged."""
    if name_or_path is None or str(name_or_path).strip() == "" or str(name_or_path).strip().lower() in TOY_ALIASES:
        if not os.path.exists(os.path.join(BASE_MODEL_DIR, "model_index.json")):
            raise FileNotFoundError(f"the shipped toy base model is missing: {BASE_MODEL_DIR}")
        return BASE_MODEL_DIR
    return os.fspath(name_or_path)


def load_toy_pipeline(torch_dtype=None, device: str | None = None, name_or_path: str | None = "toy"):
    """``StableDiffusionPipeline.from_pretrained(resolve_base_model(name_or_path))`` with the
    progress bar off (fp32 by default: the weights are stored in fp16 and upcast)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_base_model(name_or_path), torch_dtype=torch_dtype or torch.float32,
        safety_checker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device:
        pipe.to(device)
    return pipe


__all__ = ["resolve_base_model", "load_toy_pipeline", "BASE_MODEL_DIR", "JUDGE_PATH", "ASSETS_DIR"]
