"""The procedural world: simple coloured shapes on simple backgrounds, with captions.

Everything is deterministic from a seed (``numpy.random.default_rng``).  Images are rendered with
4x super-sampling (anti-aliased edges) at ``size`` x ``size`` pixels (default 32).

Public API
----------
- ``SHAPES``, ``COLORS``, ``BACKGROUNDS``: attribute vocabularies (the caption grammar's words).
- ``SUBJECTS``: personalisation subjects (distinctive instances of a known shape class) that the
  base model never sees in pretraining.
- ``Scene``: one object's attributes and pose.
- ``sample_scene(rng, ...)`` / ``render_scene(scene, size)`` / ``render(...)``: one image.
- ``render_class_images(shape, n, seed, ...)``: plain renders of a class (e.g. prior images).
- ``render_subject(subject, n, seed, ...)``: instance images of a subject with pose/size/bg variation.
- ``make_caption(scene, rng)`` / ``caption_for(...)``: captions from the grammar.
- ``parse_prompt(prompt)``: a grammar prompt back to its intended attributes.
- ``make_dataset(n, seed)``: arrays of images plus scenes, for training.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: the world renders without it
    import torch

SHAPES = ["circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond"]

# Object colours: six well separated hues.
COLORS = {
    "red": (215, 25, 25),
    "green": (25, 165, 40),
    "blue": (25, 65, 225),
    "yellow": (245, 220, 15),
    "purple": (135, 35, 190),
    "orange": (250, 125, 5),
}

# Backgrounds: neutral or pale, clearly distinct from every object colour.
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "light blue": (165, 215, 245),
}

COLOR_NAMES = list(COLORS)
BACKGROUND_NAMES = list(BACKGROUNDS)


@dataclass(frozen=True)
class Subject:
    name: str  # folder / identifier
    shape: str  # the known class it is an instance of
    description: str  # what makes it distinctive
    token: str = "sks"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.shape}"


SUBJECTS = {
    s.name: s
    for s in [
        Subject("striped_star", "star", "a star with purple and yellow horizontal stripes"),
        Subject("checker_square", "square", "a square with a red and white checkerboard face"),
        Subject("polka_circle", "circle", "a teal circle with white polka dots"),
        Subject("rainbow_heart", "heart", "a heart with red, orange, yellow, green and blue bands"),
        Subject("split_diamond", "diamond", "a diamond, left half green, right half pink"),
        Subject("bullseye_ring", "ring", "a ring with an outer cyan band and an inner magenta band"),
    ]
}
SUBJECT_NAMES = list(SUBJECTS)


@dataclass
class Scene:
    shape: str
    color: str | None  # None for subjects and textured objects
    background: str
    cx: float  # centre, in [0, 1] image coordinates
    cy: float
    radius: float  # half extent of the object, fraction of the image side
    angle: float  # rotation in degrees
    subject: str | None = None
    texture: str | None = None  # for generic textured objects (VAE data only)
    texture_colors: tuple = field(default_factory=tuple)
    jitter: tuple = (1.0, 1.0)  # brightness multipliers (object, background)
    noise_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# shape geometry: inside tests in the object frame (u right, v up, object spans about [-1, 1])
# --------------------------------------------------------------------------------------------

def _star_inside(u, v, outer=1.0, inner=0.42):
    rho = np.hypot(u, v)
    theta = np.arctan2(u, v)  # 0 = up
    a = math.pi / 5
    phi = np.mod(theta, 2 * a)
    phi = np.minimum(phi, 2 * a - phi)
    p1 = np.array([outer, 0.0])
    p2 = np.array([inner * math.cos(a), inner * math.sin(a)])
    e = p2 - p1
    cross_e_p1 = e[0] * p1[1] - e[1] * p1[0]
    cross_e_d = e[0] * np.sin(phi) - e[1] * np.cos(phi)
    t = cross_e_p1 / cross_e_d
    return rho <= t


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 0.9 ** 2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        # equilateral, pointing up, centroid at the origin
        return (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * np.abs(u) * 1.0)
    if shape == "star":
        return _star_inside(u, v * 1.0 + 0.05)
    if shape == "heart":
        x = u * 1.25
        y = v * 1.25 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.95 ** 2) & (r2 >= 0.55 ** 2)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "diamond":
        return np.abs(u) / 0.62 + np.abs(v) / 1.0 <= 1.0
    raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------------------------
# textures (subjects and generic VAE textures): colour as a function of (u, v)
# --------------------------------------------------------------------------------------------

_PURPLE, _YELLOW = (135, 35, 190), (245, 220, 15)
_RAINBOW = [(215, 25, 25), (250, 125, 5), (245, 220, 15), (25, 165, 40), (25, 65, 225)]


def _subject_colors(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(u.shape + (3,), np.float32)
    if name == "striped_star":
        band = np.floor((v + 1.2) / 0.36).astype(int) % 2
        out[:] = np.where(band[..., None] == 0, _PURPLE, _YELLOW)
    elif name == "checker_square":
        cell = (np.floor((u + 0.75) / 0.375).astype(int) + np.floor((v + 0.75) / 0.375).astype(int)) % 2
        out[:] = np.where(cell[..., None] == 0, (220, 20, 30), (250, 250, 250))
    elif name == "polka_circle":
        du = np.mod(u + 0.2, 0.55) - 0.275
        dv = np.mod(v + 0.2, 0.55) - 0.275
        dot = du * du + dv * dv <= 0.13 ** 2
        out[:] = np.where(dot[..., None], (255, 255, 255), (0, 150, 150))
    elif name == "rainbow_heart":
        idx = np.clip(np.floor((1.0 - v) / 0.36).astype(int), 0, 4)
        out[:] = np.asarray(_RAINBOW, np.float32)[idx]
    elif name == "split_diamond":
        out[:] = np.where((u < 0)[..., None], (25, 165, 40), (255, 105, 180))
    elif name == "bullseye_ring":
        r = np.hypot(u, v)
        out[:] = np.where((r >= 0.75)[..., None], (0, 215, 230), (220, 0, 200))
    else:
        raise ValueError(f"unknown subject {name!r}")
    return out


GENERIC_TEXTURES = ["stripes", "vstripes", "checker", "dots", "split", "bands"]


def _generic_texture(kind: str, cols: tuple, u, v) -> np.ndarray:
    c0, c1 = np.asarray(cols[0], np.float32), np.asarray(cols[1], np.float32)
    period = cols[2] if len(cols) > 2 else 0.4
    if kind == "stripes":
        sel = np.floor((v + 2) / period).astype(int) % 2 == 0
    elif kind == "vstripes":
        sel = np.floor((u + 2) / period).astype(int) % 2 == 0
    elif kind == "checker":
        sel = (np.floor((u + 2) / period).astype(int) + np.floor((v + 2) / period).astype(int)) % 2 == 0
    elif kind == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        sel = du * du + dv * dv > (period * 0.25) ** 2
    elif kind == "split":
        sel = u < 0
    elif kind == "bands":
        sel = np.floor(np.hypot(u, v) / period).astype(int) % 2 == 0
    else:
        raise ValueError(kind)
    return np.where(sel[..., None], c0, c1)


# --------------------------------------------------------------------------------------------
# sampling and rendering
# --------------------------------------------------------------------------------------------

def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    subject: str | None = None,
    textured: bool = False,
) -> Scene:
    """Draw a random scene; any attribute given is fixed.  ``subject`` renders that subject
    (its shape class is implied); ``textured`` draws a generic two-colour texture (VAE data)."""
    if subject is not None:
        shape = SUBJECTS[subject].shape
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    bg = background or BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    if subject is None and not textured:
        color = color or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    else:
        color = None
    radius = float(rng.uniform(0.24, 0.40))
    margin = radius * 0.95
    cx = float(rng.uniform(margin, 1 - margin))
    cy = float(rng.uniform(margin, 1 - margin))
    angle = float(rng.uniform(-20, 20))
    jitter = (float(rng.uniform(0.88, 1.08)), float(rng.uniform(0.95, 1.03)))
    texture, tcols = None, ()
    if textured and subject is None:
        texture = GENERIC_TEXTURES[rng.integers(len(GENERIC_TEXTURES))]
        tcols = (
            tuple(int(x) for x in rng.integers(0, 256, 3)),
            tuple(int(x) for x in rng.integers(0, 256, 3)),
            float(rng.uniform(0.25, 0.6)),
        )
    return Scene(
        shape=shape, color=color, background=bg, cx=cx, cy=cy, radius=radius, angle=angle,
        subject=subject, texture=texture, texture_colors=tcols, jitter=jitter,
        noise_seed=int(rng.integers(2 ** 31)),
    )


_SS = 4  # super-sampling factor


def render_scene(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene to a uint8 array (size, size, 3)."""
    n = size * _SS
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    X, Y = np.meshgrid(coords, coords)  # Y grows downwards
    dx = (X - scene.cx) / scene.radius
    dy = -(Y - scene.cy) / scene.radius
    t = math.radians(scene.angle)
    c, s = math.cos(t), math.sin(t)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    mask = _shape_mask(scene.shape, u, v)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32) * scene.jitter[1]
    img = np.empty((n, n, 3), np.float32)
    img[:] = bg
    if scene.subject is not None:
        fg = _subject_colors(scene.subject, u, v) * min(1.0, scene.jitter[0] + 0.05)
    elif scene.texture is not None:
        fg = _generic_texture(scene.texture, scene.texture_colors, u, v)
    else:
        fg = np.asarray(COLORS[scene.color], np.float32) * scene.jitter[0]
        fg = np.broadcast_to(fg, img.shape)
    img = np.where(mask[..., None], fg, img)
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    nrng = np.random.default_rng(scene.noise_seed)
    img = img + nrng.normal(0, 3.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(seed: int = 0, size: int = 32, **attrs) -> Image.Image:
    """Render one random scene (attributes in ``attrs`` fixed) as a PIL image."""
    return Image.fromarray(render_scene(sample_scene(np.random.default_rng(seed), **attrs), size))


def render_class_images(shape: str, n: int, seed: int = 0, size: int = 32, **attrs) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(render_scene(sample_scene(rng, shape=shape, **attrs), size)) for _ in range(n)]


def render_subject(subject: str, n: int, seed: int = 0, size: int = 32, **attrs) -> list[Image.Image]:
    """``n`` instance images of ``subject`` (random pose, size, position and background)."""
    if subject not in SUBJECTS:
        raise KeyError(f"unknown subject {subject!r}; known: {SUBJECT_NAMES}")
    rng = np.random.default_rng(seed)
    return [Image.fromarray(render_scene(sample_scene(rng, subject=subject, **attrs), size)) for _ in range(n)]


# reference renders used by the judge's fidelity score are drawn from this held-out seed range
REFERENCE_SEED = 987_654


def reference_images(subject: str, n: int = 16, size: int = 32) -> list[Image.Image]:
    return render_subject(subject, n, seed=REFERENCE_SEED + SUBJECT_NAMES.index(subject), size=size)


# --------------------------------------------------------------------------------------------
# caption grammar
# --------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shape: str, color: str | None = None, background: str | None = None, photo: bool = False) -> str:
    """The grammar: ``[a photo of] a[n] [color] shape [on a[n] background background]``."""
    noun = f"{color} {shape}" if color else shape
    text = f"{_article(noun)} {noun}"
    if background:
        text += f" on {_article(background)} {background} background"
    return ("a photo of " + text) if photo else text


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Caption a (non-subject) scene with a random template: 65% full captions, the rest drop the
    colour and/or the background (class-only prompts like "a photo of a star" included)."""
    if scene.subject is not None:
        raise ValueError("subjects are never captioned for pretraining")
    r = rng.random()
    photo = bool(rng.random() < 0.5)
    if r < 0.65:
        return caption_for(scene.shape, scene.color, scene.background, photo)
    if r < 0.80:
        return caption_for(scene.shape, scene.color, None, photo)
    if r < 0.90:
        return caption_for(scene.shape, None, scene.background, photo)
    return caption_for(scene.shape, None, None, photo)


_PROMPT_RE = re.compile(
    r"^(?:a photo of )?(?:(?:a|an) |(?P<tok>[a-z0-9<>]+) )(?:(?P<color>[a-z]+) )?(?P<shape>[a-z]+)"
    r"(?: on (?:a|an) (?P<bg>[a-z ]+?) background)?$"
)


def parse_prompt(prompt: str) -> dict:
    """Parse a grammar prompt back to its intended attributes.

    Returns a dict with keys shape, color, background (None where unspecified) and ``token``
    (e.g. "sks" for "a photo of sks star", None otherwise)."""
    p = prompt.strip().lower().rstrip(".")
    m = _PROMPT_RE.match(p)
    out = {"shape": None, "color": None, "background": None, "token": None}
    if not m:
        # fall back to keyword spotting
        for s in SHAPES:
            if re.search(rf"\b{s}\b", p):
                out["shape"] = s
        for c in COLORS:
            if re.search(rf"\b{c} (?:{'|'.join(SHAPES)})\b", p):
                out["color"] = c
        for b in BACKGROUNDS:
            if f"{b} background" in p:
                out["background"] = b
        return out
    shape, color, bg, tok = m.group("shape"), m.group("color"), m.group("bg"), m.group("tok")
    if shape not in SHAPES:
        raise ValueError(f"cannot parse {prompt!r}")
    if color is not None and color not in COLORS:
        if tok is None and color not in COLORS:
            raise ValueError(f"unknown color in {prompt!r}")
    out.update(shape=shape, color=color, background=bg, token=tok)
    return out


def all_prompts(photo: bool = False) -> list[dict]:
    """Every full (shape, color, background) combination as dicts with a ``prompt`` key."""
    return [
        {"shape": s, "color": c, "background": b, "prompt": caption_for(s, c, b, photo)}
        for s in SHAPES for c in COLORS for b in BACKGROUNDS
    ]


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------

def make_dataset(n: int, seed: int, size: int = 32, textured_frac: float = 0.0,
                 subject_frac: float = 0.0) -> tuple[np.ndarray, list[Scene]]:
    """``n`` renders as a uint8 array (n, size, size, 3) and their scenes.

    ``textured_frac``: fraction of generic two-colour textured objects (VAE training only);
    ``subject_frac``: fraction of subject renders (judge training only).  Pretraining of the
    UNet and text encoder uses neither: subjects stay out of the base model's data."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    for i in range(n):
        r = rng.random()
        if r < subject_frac:
            sc = sample_scene(rng, subject=SUBJECT_NAMES[rng.integers(len(SUBJECT_NAMES))])
        elif r < subject_frac + textured_frac:
            sc = sample_scene(rng, textured=True)
        else:
            sc = sample_scene(rng)
        images[i] = render_scene(sc, size)
        scenes.append(sc)
    return images, scenes


def to_tensor(images: np.ndarray | Iterable) -> torch.Tensor:
    """uint8 (n, h, w, 3) or list of PIL images -> float tensor (n, 3, h, w) in [-1, 1]."""
    import torch

    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
