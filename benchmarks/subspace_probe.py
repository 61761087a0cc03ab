"""Can a user's own training loss pick the random subspace of the <= 1,500 recipe?

The recipe (`quality.py` method `axksp_r4_ti`: the rank-4 shared axes layout read through a 1,360-entry Fastfood
vector, + the 128-entry embedding) scores 0.03-0.23 subject accuracy over four draws of its subspace
(`--projection_seed` 0-3) at one training seed, three to four times the judge's own noise. A rule that picks the
draw from the user's data alone, as random restarts do, would be legitimate where picking it by the judge is not.
This probe trains each draw for a few hundred steps through the shipped trainer, `train(config)`, and records every
step's loss. The training seed fixes the batches, noise and timesteps, so every draw sees the same ones and the
per-step differences between draws are paired: their mean over the second half of the probe is resolved to a few
1e-4. `report` sets the rule "lowest loss wins" beside the judge's scores of the same draws (quality.py rows).

After training, each probe also measures on draws fixed for every probe how much of the adapter's fit to the
instance images is bound to the identifier: their loss under the class prompt minus under the subject prompt
("binding"), what DreamBooth is after and the training loss does not isolate. `--methods` probes other quality.py
methods the same way (e.g. the layouts the subspace is cut from, trained whole), for comparison.

    python benchmarks/subspace_probe.py run --out F --work_dir D --subjects striped_star --draws 0,1,2,3 --steps 500
    python benchmarks/subspace_probe.py run --out F --work_dir D --draws "" --methods axks_r4_ti,axks_r6_ti
    python benchmarks/subspace_probe.py report F --quality benchmarks/results/quality-projected-r4-subspace-cpu.jsonl,...

D is a quality.py work dir (its images/ folders; `quality.py run` writes them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402


def method_of(draw: int) -> str:
    """quality.py's name for the recipe in subspace draw `draw`."""
    return "axksp_r4_ti" if draw == 0 else f"axksp_r4_ti_ps{draw}"


def probe_config(job: dict):
    """The quality protocol's training config of this draw and subject, cut to job["steps"] steps: at a constant
    rate, the first steps of the full run exactly."""
    full = dict(method=job["method"], subject=job["subject"], seed=job["seed"], lr=job["lr"], steps=1500,
                prior_weight=1.0, targets="conv", text=True, ti_lr=quality.TI_LR)
    cfg = quality.training_config(full, Path(job["work_dir"]))
    cfg.max_train_steps = cfg.checkpointing_steps = job["steps"]
    cfg.output_dir += f"-probe{job['steps']}"
    return cfg


def probe(job: dict) -> dict:
    """Train one draw for job["steps"] steps; the losses of every step.

    The trainer hands `on_step` the total; the instance and prior terms are read by wrapping the trainer's `losses`
    for the length of this probe (instrumentation of a benchmark worker, not a product hook)."""
    from superlora_diffusers.training import train
    from superlora_diffusers.training import trainer

    cfg = probe_config(job)
    total, instance, prior = [], [], []
    step_losses = trainer.losses

    def recorded(run, batch):
        out = step_losses(run, batch)
        instance.append(out["instance_loss"].item())
        prior.append(out["prior_loss"].item())
        return out

    trainer.losses = recorded
    t0 = time.time()
    try:
        weights = train(cfg, on_step=lambda step, max_steps, loss: total.append(loss))
    finally:
        trainer.losses = step_losses  # a worker's next probe wraps the trainer's own function, not this wrapper
    held_out = fixed_draw_losses(cfg, weights)
    shutil.rmtree(cfg.output_dir)
    return {**{k: job[k] for k in ("method", "subject", "draw", "seed", "steps", "lr")}, "seconds": round(time.time() - t0, 1),
            "loss": total, "instance_loss": instance, "prior_loss": prior, **held_out}


@torch.no_grad()
def fixed_draw_losses(cfg, weights: Path, n_noise: int = 32) -> dict[str, float]:
    """The trained adapter's denoising loss on draws fixed for every probe (noise, timesteps: one seed), base model
    beside it: the instance images under the subject prompt and under the class prompt, the class images under the
    class prompt. "binding" = loss(instance | class prompt) - loss(instance | subject prompt): how much of the fit
    rides on the identifier, which DreamBooth wants and the training loss does not isolate; "drift" = the class
    images' loss with the adapter minus without it."""
    from superlora_diffusers.training.data import encode_prompts, load_examples

    W = quality.W  # the base models, loaded once per worker (quality.init_worker)
    unet, te, _ = quality.adapted_models(cfg, weights)
    unet.eval(), te.eval()
    size = W["unet"].config.sample_size * 2 ** (len(W["vae"].config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(4321)

    def draws(directory: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = load_examples(directory, "", size, cfg.center_crop, ".txt", directory).pixels.repeat_interleave(n_noise, 0)
        latents = W["vae"].encode(pixels).latent_dist.mean * W["vae"].config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, W["noise"].config.num_train_timesteps, (len(latents),), generator=g)
        return W["noise"].add_noise(latents, noise, t), noise, t

    def loss(models, batch, prompt: str) -> float:
        (u, e), (noisy, noise, t) = models, batch
        hidden = encode_prompts(W["tokenizer"], e, [prompt]).expand(len(noisy), -1, -1)
        return torch.nn.functional.mse_loss(u(noisy, t, hidden).sample, noise).item()

    inst, cls = draws(cfg.instance_data_dir), draws(cfg.class_data_dir)
    out = {}
    for name, models in (("", (unet, te)), ("base_", (W["unet"], W["te"]))):
        out[name + "inst_subject"] = loss(models, inst, cfg.instance_prompt)
        out[name + "inst_class"] = loss(models, inst, cfg.class_prompt)
        out[name + "class_class"] = loss(models, cls, cfg.class_prompt)
    out["binding"] = out["inst_class"] - out["inst_subject"]
    out["drift"] = out["class_class"] - out["base_class_class"]
    return out


def run(args) -> None:
    runs = [(method_of(d), d) for d in args.draws] + [(m, None) for m in args.methods]
    jobs = [dict(method=m, subject=s, draw=d, seed=args.seed, steps=args.steps, lr=args.lr, work_dir=args.work_dir)
            for s in args.subjects.split(",") for m, d in runs]
    with ProcessPoolExecutor(args.workers, initializer=quality.init_worker,
                             initargs=("cpu", args.work_dir, 1)) as pool, open(args.out, "a") as f:
        for row in pool.map(probe, jobs):
            f.write(json.dumps(row) + "\n")
            f.flush()


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a - b over the second half of two equally long loss curves."""
    n = len(a)
    d = [a[i] - b[i] for i in range(n // 2, n)]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5


def judged(paths: list[str]) -> dict[tuple[str, str], dict]:
    """The judge's seed-0 final rows, by (subject, method)."""
    rows = [r for p in paths for r in quality.load(p)]
    return {(r["subject"], r["method"]): r for r in rows if r.get("phase") == "final" and r.get("seed") == 0}


def method(row: dict) -> str:
    return row.get("method") or method_of(row["draw"])  # rows of 0e40850 name the draw only


def summarise(rows: list[dict], scores: dict[tuple[str, str], dict]) -> list[str]:
    """Per subject and draw: the loss against the first draw's (paired), the judge's scores, the rule's pick."""
    lines, picked, mean_over = [], [], []
    rows = [r for r in rows if r.get("draw") is not None]
    for subject in dict.fromkeys(r["subject"] for r in rows):
        curves = {r["draw"]: r for r in rows if r["subject"] == subject}
        ref = min(curves)
        gaps = {d: {k: paired(c[k], curves[ref][k]) for k in ("loss", "instance_loss", "prior_loss") if c.get(k)}
                for d, c in sorted(curves.items())}
        best = min(gaps, key=lambda d: gaps[d]["loss"][0])
        judge = {d: scores.get((subject, method(curves[d]))) for d in gaps}
        for d, g in gaps.items():
            cells = [f"{g[k][0]:+.4f} ± {g[k][1]:.4f}" if k in g else "-" for k in ("loss", "instance_loss", "prior_loss")]
            c = curves[d]
            cells.append(f"{c['binding']:.4f} ({c['binding'] / (c['base_inst_subject'] - c['inst_subject']):.0%})"
                         if "binding" in c else "-")
            s = judge[d]
            cells.append(f"{s['subject_acc']:.2f} / {s['subject_fidelity']:.3f}" if s else "-")
            lines.append(f"| {subject} | {d}{' (picked)' if d == best else ''} | " + " | ".join(cells) + " |")
        if all(judge.values()):
            picked.append(judge[best]["subject_acc"])
            mean_over.append(statistics.mean(s["subject_acc"] for s in judge.values()))
    head = ["| subject | draw | training loss − draw 0's (steps n/2..n) | instance term | prior term | "
            "binding (share of the fit) | judge: subject acc / fidelity |", "|---|---:|---:|---:|---:|---:|---:|"]
    tail = []
    if picked:
        tail = [f"", f"lowest loss picks: subject acc {statistics.mean(picked):.3f} over {len(picked)} subjects; "
                     f"the mean over the draws: {statistics.mean(mean_over):.3f}"]
    return head + lines + tail


def binding(rows: list[dict], scores: dict[tuple[str, str], dict]) -> list[str]:
    """Per method, mean over subjects: how far the adapter lowered the instance images' loss under the subject
    prompt ("fit"), how much of that it keeps from the class prompt ("binding", and as a share of the fit), the class
    images' drift, and the judge's seed-0 subject accuracy."""
    out = ["| method | subjects | fit | binding | share of the fit | drift | judge: subject acc (seed 0) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for m in dict.fromkeys(method(r) for r in rows if "binding" in r):
        mine = [r for r in rows if method(r) == m and "binding" in r]
        fit = statistics.mean(r["base_inst_subject"] - r["inst_subject"] for r in mine)
        bind = statistics.mean(r["binding"] for r in mine)
        accs = [scores[(r["subject"], m)]["subject_acc"] for r in mine if (r["subject"], m) in scores]
        acc = f"{statistics.mean(accs):.2f}" + (f" ({len(accs)})" if len(accs) < len(mine) else "") if accs else "-"
        out.append(f"| {m} | {len(mine)} | {fit:.4f} | {bind:.4f} | {bind / fit:.1%} | "
                   f"{statistics.mean(r['drift'] for r in mine):+.4f} | {acc} |")
    return out


def report(args) -> None:
    rows = [json.loads(line) for path in args.jsonl.split(",") for line in open(path)]
    scores = judged(args.quality.split(",")) if args.quality else {}
    print("\n".join(summarise(rows, scores) + [""] + binding(rows, scores)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True, help="JSON lines, one per (subject, draw)")
    r.add_argument("--work_dir", required=True, help="a quality.py work dir (its images/)")
    r.add_argument("--subjects", default=",".join(quality.SUBJECTS))
    r.add_argument("--draws", type=lambda v: [int(x) for x in v.split(",") if x], default=[0, 1, 2, 3])
    r.add_argument("--methods", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="also probe these quality.py methods (at their --lr; e.g. the layouts trained whole)")
    r.add_argument("--steps", type=int, default=500)
    r.add_argument("--seed", type=int, default=0, help="the training seed (the judge's rows: seed 0)")
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("report")
    p.add_argument("jsonl", help="a probe's results, or several comma-separated")
    p.add_argument("--quality", default=None, help="comma-separated quality.py results with the draws' seed-0 rows")
    args = ap.parse_args(argv)
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
