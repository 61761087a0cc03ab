"""Which feature and score give the judge a subject fidelity with a wide, calibrated floor-to-ceiling range (issue 21)?

    python benchmarks/judge_calibration.py [--n_base 16] [--json benchmarks/results/judge-calibration.json]

For the six bundled subjects and three new ones (the world's generic textures on other classes and colours), every
candidate feature is scored two ways: `cosine` (mean cosine to the 16 reference renders: today's
`judge.subject_fidelity` for the embedding) and `nn` (superlora_diffusers/toy/fidelity.py: nearest-neighbour
ratio against plain renders of the class in the world's and the subject's colours). Per subject: the floor (plain
renders of the class after the VAE round trip), the ceiling (fresh renders of the subject after the VAE round
trip), their separation in within-set standard deviations and, as fractions of floor-to-ceiling: the base model's
"a photo of a <class>", the class recoloured in the subject's dominant / second colour (hard negatives: want ~0),
blurred renders (Gaussian sigma 1 px after the VAE, 0.7 px without it; want ~1) and, for `nn`, the leave-one-out
ceiling the API measures from the references alone (want ~1). Deterministic: fixed seeds throughout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from superlora_diffusers.toy import fidelity as Fd
from superlora_diffusers.toy import judge as J
from superlora_diffusers.toy import world

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class NewSubject:
    """A subject outside the bundled six: one of the world's generic two-colour textures on a class."""

    shape: str
    texture: str
    colors: tuple  # (rgb, rgb, period), as world's generic textures take them
    description: str


NEW_SUBJECTS = {
    "vstripe_triangle": NewSubject("triangle", "vstripes", ((250, 125, 5), (20, 30, 110), 0.3),
                                   "a triangle with orange and navy vertical stripes"),
    "ringed_square": NewSubject("square", "bands", ((150, 220, 40), (120, 60, 20), 0.3),
                                "a lime square with brown concentric rings"),
    "dotted_heart": NewSubject("heart", "dots", ((240, 110, 90), (20, 30, 110), 0.5), "a coral heart with navy dots"),
}
SUBJECTS = world.SUBJECT_NAMES + list(NEW_SUBJECTS)


def class_of(subject: str) -> str:
    return world.SUBJECTS[subject].shape if subject in world.SUBJECTS else NEW_SUBJECTS[subject].shape


def render_new_subject(name: str, n: int, seed: int) -> list[Image.Image]:
    """Like `world.render_subject` (pose, size, background, brightness) for a `NEW_SUBJECTS` entry."""
    sub, rng, out = NEW_SUBJECTS[name], np.random.default_rng(seed), []
    for _ in range(n):
        scene = world.sample_scene(rng, shape=sub.shape, textured=True)
        gain = min(1.0, scene.jitter[0] + 0.05)
        cols = tuple(tuple(c * gain for c in rgb) for rgb in sub.colors[:2]) + sub.colors[2:]
        scene = dataclasses.replace(scene, texture=sub.texture, texture_colors=cols)
        out.append(Image.fromarray(world.render_scene(scene)))
    return out


def render_any(subject: str, n: int, seed: int) -> list[Image.Image]:
    return world.render_subject(subject, n, seed) if subject in world.SUBJECTS else render_new_subject(subject, n, seed)


def reference_images(subject: str) -> list[Image.Image]:
    """16 held-out renders: the bundled subjects' own, the new ones' from the seeds after them."""
    return world.reference_images(subject) if subject in world.SUBJECTS else \
        render_new_subject(subject, 16, world.REFERENCE_SEED + SUBJECTS.index(subject))


def colors_by_area(subject: str) -> list[RGB]:
    """The subject's colours, largest area first, read from the world's texture functions (not from renders)."""
    g = np.linspace(-1.2, 1.2, 241, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    inside = world._shape_mask(class_of(subject), u, v)
    if subject in world.SUBJECTS:
        colors = world._subject_colors(subject, u, v)
    else:
        colors = world._generic_texture(NEW_SUBJECTS[subject].texture, NEW_SUBJECTS[subject].colors, u, v)
    values, counts = np.unique(colors[inside].astype(int), axis=0, return_counts=True)
    return [tuple(int(c) for c in values[i]) for i in np.argsort(-counts)]


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    ims = [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)) for t in x]
    return world.to_tensor([im.filter(ImageFilter.GaussianBlur(sigma)) for im in ims])


def hard_sets(subject: str) -> dict[str, torch.Tensor]:
    """The ceiling and the hard negatives of a subject, as [-1, 1] tensors (32 images each)."""
    shape, colors = class_of(subject), colors_by_area(subject)
    fresh = Fd.vae_round_trip(render_any(subject, 32, seed=5))
    return {
        "ceiling": fresh,
        "recolour": Fd.vae_round_trip(Fd.render_plain(shape, colors[:1], 32, seed=13)),
        "recolour_2nd": Fd.vae_round_trip(Fd.render_plain(shape, colors[1:2], 32, seed=13)),
        "blur_vae_s1": blur(Fd.vae_round_trip(render_any(subject, 32, seed=17)), 1.0),
        "blur_s0.7": blur(world.to_tensor(render_any(subject, 32, seed=17)), 0.7),
    }


@torch.no_grad()
def candidate_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every candidate feature of images in [-1, 1]: the judge's embedding, its conv blocks' statistics over the
    object's pixels (means: colours and local pattern; Gram: their co-occurrence) and the object's colours."""
    judge, mask = J.load_judge(), Fd.object_mask(x)
    block1 = judge.features[0](x)
    block2 = judge.features[2](judge.features[1](block1)).flatten(2)
    w1, w2 = (F.adaptive_avg_pool2d(mask, size).flatten(2) + 1e-3 for size in ((32, 32), (16, 16)))
    bins = ((x.clamp(-1, 1) + 1) / 2 * 3.999).floor().long()
    idx = (bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2]).flatten(1)
    hist = torch.zeros(len(x), 64).scatter_add_(1, idx, mask.flatten(1))
    return {
        "embedding": judge(x)["embedding"],
        "block-1 object mean": Fd.surface_features(x),  # the API's feature
        "block-1 object Gram": _gram(block1.flatten(2), w1),
        "block-2 object mean": (block2 * w2).sum(2) / w2.sum(2),
        "block-2 object Gram": _gram(block2, w2),
        "block-2 Gram (whole image)": _gram(block2, torch.ones_like(w2)),
        "object colour histogram": hist / hist.sum(1, keepdim=True).clamp_min(1),
    }


def _gram(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ((flat * weight) @ flat.transpose(1, 2) / weight.sum(2)[:, :, None]).flatten(1)


def summary(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    """Floor, ceiling, separation and every other set as a fraction of floor-to-ceiling."""
    lo, hi = per_image["floor"], per_image["ceiling"]
    res = {"floor": float(lo.mean()), "ceiling": float(hi.mean()),
           "separation": float((hi.mean() - lo.mean()) / ((lo.var() + hi.var()) / 2).sqrt().clamp_min(1e-6))}
    for name, v in per_image.items():
        if name not in ("floor", "ceiling"):
            res[name] = float((v.mean() - lo.mean()) / (hi.mean() - lo.mean()))
    return res


def measure_subject(subject: str, base_images: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """Every candidate x score on one subject."""
    shape, raw_refs = class_of(subject), reference_images(subject)
    palette, (refs, contrast, floor) = Fd.reference_sets(world.to_tensor(raw_refs), shape)
    sets = {"floor": floor, **hard_sets(subject)}
    if base_images is not None:
        sets["base_model"] = base_images
    feats = {name: candidate_features(x) for name, x in sets.items()}
    ref_feats, raw_feats, plain_feats = (candidate_features(x) for x in (refs, world.to_tensor(raw_refs), contrast))
    out = {}
    for cand in ref_feats:
        cos_refs = F.normalize(raw_feats[cand], dim=1)
        out[f"cosine: {cand}"] = summary({k: (F.normalize(f[cand], dim=1) @ cos_refs.T).mean(1)
                                          for k, f in feats.items()})
        ref = Fd.SubjectReference.from_features(shape, palette, ref_feats[cand], plain_feats[cand],
                                                feats["floor"][cand])
        nn = {k: ref.ratios(f[cand]) for k, f in feats.items()}
        out[f"nn: {cand}"] = {**summary(nn), "loo_ceiling": (ref.ceiling - float(nn["floor"].mean()))
                               / float(nn["ceiling"].mean() - nn["floor"].mean())}
    return out


@torch.no_grad()
def base_model_images(shapes: list[str], n: int, steps: int = 25) -> dict[str, torch.Tensor]:
    """The shipped base model's "a photo of a <class>" (fixed seeds), in [-1, 1]."""
    from superlora_diffusers.toy import load_toy_pipeline

    pipe = load_toy_pipeline()
    out = {}
    for shape in shapes:
        gens = [torch.Generator().manual_seed(7_000 + i) for i in range(n)]
        images = pipe([f"a photo of a {shape}"] * n, num_inference_steps=steps, guidance_scale=5.0, generator=gens,
                      output_type="pt").images
        out[shape] = images.float() * 2 - 1
    return out


CHOSEN = "nn: block-1 object mean"  # superlora_diffusers/toy/fidelity.py
COLUMNS = ["floor", "ceiling", "separation", "base_model", "recolour", "recolour_2nd", "blur_vae_s1", "blur_s0.7",
           "loo_ceiling"]
WORST = {"separation": min, "recolour": max, "recolour_2nd": max, "blur_vae_s1": min, "blur_s0.7": min,
         "base_model": max}


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per candidate: mean over subjects (worst subject in brackets where it matters); then the chosen
    candidate per subject."""
    cands = sorted(next(iter(results.values())), key=lambda c: c.startswith("nn"))
    cols = [c for c in COLUMNS if c in results[next(iter(results))][CHOSEN]]
    lines = ["| score | feature | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for cand in cands:
        cells = []
        for col in cols:
            vals = [results[s][cand][col] for s in results if col in results[s][cand]]
            cell = f"{np.mean(vals):.2f}" if vals else "n/a"
            cells.append(cell + (f" ({WORST[col](vals):.2f})" if vals and col in WORST else ""))
        row = cand.replace(": ", " | ", 1) + " | " + " | ".join(cells)
        lines.append(f"| **{row.replace(' | ', '** | **')}** |" if cand == CHOSEN else f"| {row} |")
    lines += ["", "| subject (chosen score) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for subject, res in results.items():
        lines.append(f"| {subject} | " + " | ".join(f"{res[CHOSEN][c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_base", type=int, default=16, help="base-model images per class (0: skip the base model)")
    ap.add_argument("--subjects", nargs="+", default=SUBJECTS, choices=SUBJECTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/judge-calibration.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    shapes = sorted({class_of(s) for s in args.subjects})
    base = base_model_images(shapes, args.n_base) if args.n_base else {}
    results = {s: measure_subject(s, base.get(class_of(s))) for s in args.subjects}
    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"subjects": results, "table": table, "n_base": args.n_base,
                                               "seconds": round(time.time() - t0, 1)}, indent=1))
    return results


if __name__ == "__main__":
    main()
