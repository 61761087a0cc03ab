"""Train the frozen judge on procedural renders (subjects included) and ship its weights.

    python -m superlora_diffusers.toy.train_judge --seed 0 --out superlora_diffusers/toy/assets/judge.safetensors

A pool of renders is drawn from the world (30% subjects, 10% generic textured objects labelled
"not a subject", the rest plain objects), re-drawn every epoch from a new seed, and augmented with
blur, noise and brightness jitter so the judge is robust to the softer look of generated images.
Accuracy of every head is reported on fresh renders from a held-out seed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from . import world
from .judge import HEADS, Judge, save_judge, SUBJECT_CLASSES

IGNORE = -100


def labels(scenes) -> dict[str, torch.Tensor]:
    sh, co, bg, su = [], [], [], []
    for s in scenes:
        sh.append(world.SHAPES.index(s.shape))
        co.append(world.COLOR_NAMES.index(s.color) if s.color is not None else IGNORE)
        bg.append(world.BACKGROUND_NAMES.index(s.background))
        su.append(SUBJECT_CLASSES.index(s.subject) if s.subject else 0)
    return {"shape": torch.tensor(sh), "color": torch.tensor(co), "background": torch.tensor(bg),
            "subject": torch.tensor(su)}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # blur half of the batch with a random-strength 3x3 kernel
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x * (1 - a) + blurred * a
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(model: Judge, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    model.eval()
    imgs, scenes = world.make_dataset(n, seed=seed, subject_frac=0.3, textured_frac=0.1)
    x = world.to_tensor(imgs)
    y = labels(scenes)
    out = model(x)
    res = {}
    for k in HEADS:
        m = y[k] != IGNORE
        res[k] = float((out[k].argmax(1)[m] == y[k][m]).float().mean())
    # subject head on subjects only (recall) and on plain renders (false positives)
    s = y["subject"] > 0
    res["subject_on_subjects"] = float((out["subject"].argmax(1)[s] == y["subject"][s]).float().mean())
    model.train()
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="superlora_diffusers/toy/assets/judge.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--pool", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = Judge()
    print(f"judge params: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k", flush=True)
    total = args.epochs * (args.pool // args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    t0 = time.time()
    step = 0
    for ep in range(args.epochs):
        imgs, scenes = world.make_dataset(args.pool, seed=args.seed * 1000 + ep, subject_frac=0.3, textured_frac=0.1)
        x_all = world.to_tensor(imgs)
        y_all = labels(scenes)
        perm = torch.randperm(args.pool, generator=g)
        for i in range(0, args.pool - args.batch + 1, args.batch):
            idx = perm[i : i + args.batch]
            x = augment(x_all[idx], g)
            out = model(x)
            loss = sum(F.cross_entropy(out[k], y_all[k][idx], ignore_index=IGNORE) for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {ep} step {step}/{total} loss {loss.item():.4f} elapsed {time.time() - t0:.0f}s", flush=True)
    res = evaluate(model)
    res["train_seconds"] = round(time.time() - t0, 1)
    res["seed"] = args.seed
    print("fresh-render accuracy:", json.dumps(res), flush=True)
    save_judge(model, args.out, extra=res)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
