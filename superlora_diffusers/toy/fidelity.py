"""Subject fidelity for any subject, calibrated from the plain class (0) to the subject itself (1).

Why not ``judge.subject_fidelity``: its embedding cosine moves only a few hundredths from the base model to the
subject, rewards a plain recolouring of the class and penalises blur. Here each image is asked whether it lies
nearer to the subject's references or to plain renders of its class, both in the toy world's colours and in the
subject's own colours (so that a recolouring is explained by the plain class), in a feature space that describes the
object's surface: the judge's first conv block averaged over the object's pixels (colours and local pattern; blind
to position, size, background and outline, which the judge's shape head scores).

Per image: ``r = d_plain / (d_plain + d_subject)``, ``d`` the cosine distance to the nearest plain render or
reference (0.5: equidistant). The fidelity is the mean ``r``; its floor the mean ``r`` of held-out plain renders
of the class (the base model's output), its ceiling the mean ``r`` of each reference against the others. Every
reference and plain render goes through the VAE round trip first, so it carries the blur of a generated image.
``benchmarks/judge_calibration.py`` measures this choice against the alternatives.

Public API
----------
- ``calibrated_fidelity(images, reference_images, class_shape, vae=None) -> dict``: fidelity, floor, ceiling,
  calibrated, subject_match (share of images nearer the references than the plain class)
- ``subject_reference(reference_images, class_shape, vae=None) -> SubjectReference`` (cached per reference set);
  ``reference_sets`` and ``SubjectReference.from_features`` build one for another feature space
- ``surface_features(images)``, ``object_mask(x)``, ``object_palette(images)``, ``render_plain(shape, colors, ...)``,
  ``vae_round_trip(images, vae=None)``, ``load_instance_images(folder)``, ``reference_tensor(...)``
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import judge as J
from . import world

MASK_THRESHOLD = 0.3  # colour distance (in [-1, 1] units) from the background that makes a pixel the object's
PLAIN_PER_COLOR = 6  # plain renders per colour in the contrast set
N_FLOOR = 32  # held-out plain renders that measure the floor
CONTRAST_SEED, FLOOR_SEED = 424_242, 434_343
RGB = tuple[int, int, int]


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w): pixels far from the median border colour (the toy world's backgrounds are flat)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    return ((x - background).norm(dim=1, keepdim=True) > MASK_THRESHOLD).float()


def _judge_input(images, value_range=(-1, 1)) -> torch.Tensor:
    x = J._to_tensor(images, value_range)
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def surface_features(images, value_range=(-1, 1)) -> torch.Tensor:
    """(n, 32): the judge's first conv block averaged over the object's pixels: what its surface looks like."""
    x = _judge_input(images, value_range)
    h = J.load_judge().features[0](x)
    w = object_mask(x) + 1e-3  # an image without an object falls back to its whole area
    return (h * w).sum((2, 3)) / w.sum((2, 3))


def object_palette(images, min_share: float = 0.06, radius: float = 0.25) -> list[RGB]:
    """The colours covering at least ``min_share`` of the objects' pixels, densest first (greedy mode seeking),
    so that the contrast set can hold the plain class painted in the subject's own colours. Blends of two denser
    colours (a pattern's soft edges) are left out: painting the class in them would mimic the blurred pattern."""
    x = _judge_input(images)
    pixels = x.permute(0, 2, 3, 1)[object_mask(x)[:, 0].bool()]
    pixels = pixels[torch.linspace(0, len(pixels) - 1, min(len(pixels), 2000)).long()]  # a fixed subsample
    total, found = len(pixels), []
    while len(pixels):
        near = torch.cdist(pixels, pixels) < radius
        densest = near.sum(1).argmax()
        if near[densest].sum() < min_share * total:
            break
        found.append(pixels[near[densest]].mean(0))
        pixels = pixels[~near[densest]]
    kept = []
    for c in found:
        if not any(_segment_distance(c, a, b) < radius for i, a in enumerate(kept) for b in kept[i + 1:]):
            kept.append(c)
    return [tuple(int(v) for v in ((c + 1) * 127.5).round().clamp(0, 255)) for c in kept]


def _segment_distance(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    t = ((c - a) @ (b - a) / (b - a).dot(b - a).clamp_min(1e-8)).clamp(0, 1)
    return float((a + t * (b - a) - c).norm())


def render_plain(shape: str, colors: Sequence[RGB], n_per: int, seed: int) -> list[Image.Image]:
    """``n_per`` renders of the plain ``shape`` in each RGB colour (random pose, size, background, brightness)."""
    rng = np.random.default_rng(seed)
    out = []
    for color in colors:
        for _ in range(n_per):
            scene = world.sample_scene(rng, shape=shape, textured=True)
            rgb = tuple(min(255.0, c * scene.jitter[0]) for c in color)
            scene = dataclasses.replace(scene, texture="split", texture_colors=(rgb, rgb))
            out.append(Image.fromarray(world.render_scene(scene)))
    return out


@lru_cache(maxsize=1)
def toy_vae():
    """The shipped toy base model's VAE (CPU, eval mode)."""
    from diffusers import AutoencoderKL

    from . import BASE_MODEL_DIR

    return AutoencoderKL.from_pretrained(BASE_MODEL_DIR, subfolder="vae").eval()


@torch.no_grad()
def vae_round_trip(images, vae=None, batch: int = 64) -> torch.Tensor:
    """decode(encode(images)) in [-1, 1] on the CPU: the best a generated image of the same content can look."""
    vae = vae or toy_vae()
    x = _judge_input(images)
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch].to(vae.device, vae.dtype)
        out.append(vae.decode(vae.encode(chunk).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


@dataclasses.dataclass(frozen=True)
class SubjectReference:
    """A subject's references and its class's plain renders as unit features, with the calibration ends."""

    class_shape: str
    palette: tuple[RGB, ...]
    centre: torch.Tensor  # subtracted before normalising: the mean of references and plain renders
    refs: torch.Tensor
    plain: torch.Tensor
    floor: float = float("nan")
    ceiling: float = float("nan")

    @classmethod
    def from_features(cls, class_shape: str, palette: Sequence[RGB], refs: torch.Tensor, plain: torch.Tensor,
                      floor_set: torch.Tensor) -> "SubjectReference":
        """Centre and normalise, then measure the floor on ``floor_set`` and the ceiling on the references."""
        centre = torch.cat([refs, plain]).mean(0)
        ref = cls(class_shape, tuple(palette), centre, F.normalize(refs - centre, dim=1),
                  F.normalize(plain - centre, dim=1))
        return dataclasses.replace(ref, floor=float(ref.ratios(floor_set).mean()),
                                   ceiling=float(ref.ratios(refs, leave_one_out=True).mean()))

    def ratios(self, features: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
        """Per image ``d_plain / (d_plain + d_subject)``, averaged over leaving out each reference in turn so that
        fresh images meet as many references as each reference meets in the ceiling (``leave_one_out``: the
        ``features`` are the references themselves, each measured against the others)."""
        u = F.normalize(features - self.centre, dim=1)
        d_plain = 1 - (u @ self.plain.T).max(1).values
        sim_ref = u @ self.refs.T
        if leave_one_out:
            return _ratio(d_plain, 1 - sim_ref.fill_diagonal_(-1.0).max(1).values)
        top2 = sim_ref.topk(2, dim=1).values
        n = len(self.refs)
        return ((n - 1) * _ratio(d_plain, 1 - top2[:, 0]) + _ratio(d_plain, 1 - top2[:, 1])) / n


def _ratio(d_plain: torch.Tensor, d_ref: torch.Tensor) -> torch.Tensor:
    return d_plain / (d_plain + d_ref).clamp_min(1e-8)


def reference_sets(x: torch.Tensor, class_shape: str, vae=None) -> tuple[list[RGB], list[torch.Tensor]]:
    """The subject's palette and, after the VAE round trip: its references, the contrast set (plain renders of the
    class in the world's colours and in the palette) and the held-out plain renders that measure the floor."""
    palette = object_palette(x)
    contrast = render_plain(class_shape, list(world.COLORS.values()) + palette, PLAIN_PER_COLOR, CONTRAST_SEED)
    floor_set = world.render_class_images(class_shape, N_FLOOR, seed=FLOOR_SEED)
    return palette, [vae_round_trip(images, vae) for images in (x, contrast, floor_set)]


_REFERENCES: dict[tuple, SubjectReference] = {}


def reference_tensor(reference_images, class_shape: str, what: str = "reference folder") -> torch.Tensor:
    """Checked references (a list of PIL images or a folder) as (n, 3, 32, 32) in [-1, 1]; bad input is a
    ValueError that names the problem and the fix."""
    if class_shape not in world.SHAPES:
        raise ValueError(f"unknown class {class_shape!r}; use one the toy judge knows: {', '.join(world.SHAPES)}")
    if isinstance(reference_images, (str, os.PathLike)):
        reference_images = load_instance_images(reference_images, what)
    if len(reference_images) < 2:
        raise ValueError(f"{len(reference_images)} reference image(s); give at least 2 (each is left out in turn "
                         "to measure the ceiling)")
    return _judge_input(reference_images)


def subject_reference(reference_images, class_shape: str, vae=None) -> SubjectReference:
    """The reference set of a subject (a list of PIL images or a folder), built once per set, class and VAE."""
    x = reference_tensor(reference_images, class_shape)
    key = (hashlib.sha1(x.numpy().tobytes()).hexdigest(), class_shape, vae)
    if key not in _REFERENCES:
        palette, sets = reference_sets(x, class_shape, vae)
        _REFERENCES[key] = SubjectReference.from_features(class_shape, palette, *map(surface_features, sets))
    return _REFERENCES[key]


def calibrated_fidelity(images, reference_images, class_shape: str, vae=None, value_range=(-1, 1)) -> dict[str, float]:
    """How much ``images`` look like the subject of ``reference_images`` rather than a plain ``class_shape``.

    Returns ``fidelity`` (mean nearest-neighbour ratio, 0..1), ``floor`` and ``ceiling`` (the same on plain
    renders of the class and on the references left out one at a time), ``calibrated`` = (fidelity - floor) /
    (ceiling - floor) and ``subject_match``: the share of images nearer to a reference than to any plain render.
    ``images`` are generated images (PIL or a tensor in ``value_range``), already decoded by the VAE."""
    ref = subject_reference(reference_images, class_shape, vae)
    r = ref.ratios(surface_features(images, value_range))
    raw = float(r.mean())
    return {"fidelity": raw, "floor": ref.floor, "ceiling": ref.ceiling,
            "calibrated": (raw - ref.floor) / (ref.ceiling - ref.floor),
            "subject_match": float((r > 0.5).float().mean())}


def load_instance_images(folder: str | os.PathLike, what: str = "instance folder") -> list[Image.Image]:
    """A folder's images (sorted by name); a missing folder or one without images is a ValueError naming the fix
    (the training CLI's checks; ``what`` names the folder in the message, e.g. the option that gave it)."""
    from ..training.config import TrainingError
    from ..training.data import list_images, load_image

    try:
        return [load_image(p) for p in list_images(folder, what)]
    except TrainingError as e:
        raise ValueError(str(e)) from None
