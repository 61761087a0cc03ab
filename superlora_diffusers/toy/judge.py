"""The frozen judge: a small CNN trained on unlimited procedural renders (subjects included).

Heads: shape (8), color (6), background (4) and subject identity ("none" + each subject), plus an
L2-normalised 128-d embedding (penultimate features) used for a DINO-style subject-fidelity score:
the mean cosine similarity between generated images and held-out reference renders of the subject
(``world.reference_images``).

Public API
----------
- ``load_judge(path=None) -> Judge`` (cached; default: the shipped ``assets/judge.safetensors``)
- ``predict(images, judge=None) -> dict`` of predicted labels per image
- ``embed(images, judge=None) -> Tensor`` (n, 128), L2-normalised
- ``score(images, shape=None, color=None, background=None, subject=None, judge=None) -> dict``
- ``score_prompts(images, prompts, judge=None) -> dict``: targets parsed from grammar prompts
- ``subject_fidelity(images, subject, judge=None) -> float``

``images``: a list of PIL images (any size; resized to 32x32) or a float tensor (n, 3, h, w) in
[-1, 1] (or [0, 1] with ``value_range=(0, 1)``).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

JUDGE_PATH = os.path.join(os.path.dirname(__file__), "assets", "judge.safetensors")
SUBJECT_CLASSES = ["none"] + world.SUBJECT_NAMES
HEADS = {
    "shape": world.SHAPES,
    "color": world.COLOR_NAMES,
    "background": world.BACKGROUND_NAMES,
    "subject": SUBJECT_CLASSES,
}


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Judge(nn.Module):
    def __init__(self, width: int = 32, emb_dim: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),  # 16
            _block(w, 2 * w), nn.MaxPool2d(2),  # 8
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4
        )
        self.proj = nn.Linear(4 * w * 2, emb_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(emb_dim, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        e = F.relu(self.proj(h))
        out = {k: head(e) for k, head in self.heads.items()}
        out["embedding"] = F.normalize(e, dim=1)
        return out


def save_judge(model: Judge, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
          if v.dtype.is_floating_point}
    meta = {"heads": json.dumps(HEADS), "info": json.dumps(extra or {})}
    save_file(sd, path, metadata=meta)


@lru_cache(maxsize=4)
def _load_cached(path: str) -> Judge:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    heads = json.loads(meta.get("heads", "{}"))
    if heads and heads != HEADS:
        raise ValueError(f"judge at {path} was trained for other classes: {heads}")
    m = Judge()
    sd = {k: v.float() for k, v in load_file(path).items()}
    m.load_state_dict(sd, strict=False)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def load_judge(path: str | None = None) -> Judge:
    """The shipped frozen judge (CPU, eval mode, no grads). Cached per path."""
    return _load_cached(os.path.abspath(path or JUDGE_PATH))


def _to_tensor(images, value_range=(-1, 1)) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        lo, hi = value_range
        return (x - lo) / (hi - lo) * 2 - 1
    if isinstance(images, np.ndarray):
        return world.to_tensor(images)
    ims = [im.convert("RGB") for im in images]
    ims = [im if im.size == (32, 32) else im.resize((32, 32), resample=3) for im in ims]  # 3 = BICUBIC
    return world.to_tensor(np.stack([np.asarray(im) for im in ims]))


@torch.no_grad()
def _forward(images, judge: Judge | None, value_range=(-1, 1)) -> dict[str, torch.Tensor]:
    judge = judge or load_judge()
    x = _to_tensor(images, value_range)
    outs = [judge(x[i : i + 256]) for i in range(0, len(x), 256)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def predict(images, judge: Judge | None = None, value_range=(-1, 1)) -> dict[str, list[str]]:
    out = _forward(images, judge, value_range)
    return {k: [HEADS[k][i] for i in out[k].argmax(1).tolist()] for k in HEADS}


def embed(images, judge: Judge | None = None, value_range=(-1, 1)) -> torch.Tensor:
    return _forward(images, judge, value_range)["embedding"]


@lru_cache(maxsize=32)
def _reference_embeddings(subject: str, n: int, judge_id: int) -> torch.Tensor:
    return embed(world.reference_images(subject, n), _JUDGES[judge_id])


_JUDGES: dict[int, Judge] = {}


def subject_fidelity(images, subject: str, judge: Judge | None = None, n_ref: int = 16,
                     value_range=(-1, 1), _emb: torch.Tensor | None = None) -> float:
    """Mean cosine similarity between the images' embeddings and ``n_ref`` held-out reference renders."""
    judge = judge or load_judge()
    _JUDGES[id(judge)] = judge
    ref = _reference_embeddings(subject, n_ref, id(judge))
    e = _emb if _emb is not None else embed(images, judge, value_range)
    return float((e @ ref.T).mean())


def _as_list(t, n):
    if t is None:
        return None
    if isinstance(t, str):
        return [t] * n
    t = list(t)
    if len(t) != n:
        raise ValueError(f"{len(t)} targets for {n} images")
    return t


def score(images, shape=None, color=None, background=None, subject=None, judge: Judge | None = None,
          value_range=(-1, 1), return_predictions: bool = False) -> dict:
    """Judge ``images`` against intended attributes.

    Each target is a label (same for every image), a list (one per image, ``None`` entries are
    skipped) or None (not scored).  ``subject``: a subject name (or "none" for "not a subject").
    Returns ``{"n", "shape_acc", "color_acc", "background_acc", "subject_acc", "subject_fidelity"}``
    restricted to the targets given (fidelity only for a real subject name).
    """
    judge = judge or load_judge()
    out = _forward(images, judge, value_range)
    n = out["shape"].shape[0]
    preds = {k: [HEADS[k][i] for i in out[k].argmax(1).tolist()] for k in HEADS}
    res: dict = {"n": n}
    for key, tgt in (("shape", shape), ("color", color), ("background", background), ("subject", subject)):
        tl = _as_list(tgt, n)
        if tl is None:
            continue
        pairs = [(p, t) for p, t in zip(preds[key], tl) if t is not None]
        if pairs:
            res[f"{key}_acc"] = sum(p == t for p, t in pairs) / len(pairs)
    sl = _as_list(subject, n)
    if sl is not None:
        names = sorted({s for s in sl if s is not None and s != "none"})
        fids = []
        for s in names:
            idx = [i for i, t in enumerate(sl) if t == s]
            fids.append((subject_fidelity(None, s, judge, _emb=out["embedding"][idx]), len(idx)))
        if fids:
            res["subject_fidelity"] = sum(f * k for f, k in fids) / sum(k for _, k in fids)
    if return_predictions:
        res["predictions"] = preds
    return res


def score_prompts(images, prompts: Sequence[str] | str, subject: str | None = None,
                  judge: Judge | None = None, value_range=(-1, 1)) -> dict:
    """Score images generated from grammar prompts; attributes are parsed from each prompt.
    Prompts with the ``sks`` token are scored against ``subject`` (if given)."""
    n = len(images)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    parsed = [world.parse_prompt(p) for p in prompts]
    subj = None
    if subject is not None:
        subj = [subject if p["token"] else None for p in parsed]
    return score(images, shape=[p["shape"] for p in parsed], color=[p["color"] for p in parsed],
                 background=[p["background"] for p in parsed], subject=subj, judge=judge,
                 value_range=value_range)
