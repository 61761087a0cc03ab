"""Expressivity: how much of a trained LoRA's ΔW can each compact SuperLoRA layout represent at all?

Training can fail for two reasons: the layout cannot express what personalisation needs, or the optimiser
does not find it. This script separates the first. It fits every layout, through the shipped `SuperLoRA`
module, to the ΔW of trained adapters by least squares, and reports the relative residual
||fit - ΔW|| / ||ΔW|| overall and per layer type (UNet self-attention, cross-attention, ResNet convs, text
encoder). A residual near 1 means the layout can hold almost none of that ΔW, whatever the training.

The fit is Adam on all factors with a cosine-decayed rate (several restarts of the rate, best kept), from
the module's own initialisation. Per-weight LoRA of rank r also has the exact optimum (truncated SVD per
weight, Eckart-Young): fitting the `lora` layout by gradient must reach it, which checks the fitter.

    # ΔW files: dense {target name: (d_out, d_in·k·k)} safetensors, one per trained adapter
    python benchmarks/quality.py run ... --methods lora_r4 --save_deltas out/deltas
    python benchmarks/expressivity.py out/deltas/*.safetensors --json benchmarks/results/expressivity-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from superlora_diffusers import SuperLoRA, SuperLoRAConfig  # noqa: E402

# name -> SuperLoRAConfig kwargs: the compact layouts of the quality benchmark (same names as quality.py)
LAYOUTS = {
    "t5_g1_r1": dict(factorization="tucker", fold=5, groups=1, rank=1),
    "t3_g4_r4": dict(factorization="tucker", fold=3, groups=4, rank=4),
    "kron_g1_r10": dict(factorization="kronecker", groups=1, rank=10, kron_factor=6),
    "t3_g12_r5": dict(factorization="tucker", fold=3, groups=12, rank=5),
    "t3_g12_r10": dict(factorization="tucker", fold=3, groups=12, rank=10),
    "d2_g4_r8": dict(factorization="lora", groups=4, rank=8),
    "ax_r1": dict(factorization="tucker", fold=3, groups="shape", rank=1),
    "ax_r2": dict(factorization="tucker", fold=3, groups="shape", rank=2),
    "ax_r4": dict(factorization="tucker", fold=3, groups="shape", rank=4),
    "axk_r1": dict(factorization="tucker", fold=3, groups="shape", rank=1, kernel_axis=True),
    "axk_r4": dict(factorization="tucker", fold=3, groups="shape", rank=4, kernel_axis=True),
    "axks_r1": dict(factorization="tucker", fold=3, groups="shape", rank=1, kernel_axis=True, share_axes=True),
    "axks_r4": dict(factorization="tucker", fold=3, groups="shape", rank=4, kernel_axis=True, share_axes=True),
    "axks_r6": dict(factorization="tucker", fold=3, groups="shape", rank=6, kernel_axis=True, share_axes=True),
    "lora_r1": dict(factorization="lora", groups="weight", rank=1),
}
LAYER_TYPES = ("self-attention", "cross-attention", "resnet conv", "text encoder")


def layer_type(name: str) -> str:
    if name.startswith("text_encoder"):
        return "text encoder"
    if ".attn1." in name:
        return "self-attention"
    if ".attn2." in name:
        return "cross-attention"
    return "resnet conv" if "resnets" in name else "other"


def residuals(fit: list[torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative residual overall and per layer type (types with no ΔW energy are left out)."""
    err: dict[str, float] = {}
    norm: dict[str, float] = {}
    for f, (name, t) in zip(fit, targets.items()):
        for key in ("all", layer_type(name)):
            err[key] = err.get(key, 0.0) + float((f - t).pow(2).sum())
            norm[key] = norm.get(key, 0.0) + float(t.pow(2).sum())
    return {k: (err[k] / norm[k]) ** 0.5 for k in err if norm[k] > 0}


def svd_fit(targets: dict[str, torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Per-weight truncated SVD: the exact best rank-r fit of each ΔW."""
    out = []
    for t in targets.values():
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        out.append(((u[:, :rank] * s[:rank]) @ vh[:rank]).float())
    return out


def toy_kernels(names: list[str]) -> list[int]:
    """k_h·k_w of each named target (the ΔW files hold convs flattened to (d_out, c_in·k·k)), from the toy's layers."""
    from superlora_diffusers.targets import find_targets
    from superlora_diffusers.toy import load_toy_pipeline

    pipe = load_toy_pipeline()
    known = {t.name: t.kernel_numel for t in find_targets({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                                                          "unet+conv+text")}
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"{missing[0]} is not a layer of the toy model, so its kernel size is unknown; fit the "
                         "kernel-axis layouts only to ΔW files of the toy.")
    return [known[n] for n in names]


def gradient_fit(config: SuperLoRAConfig, targets: dict[str, torch.Tensor], steps: int = 1500,
                 lrs: tuple[float, ...] = (3e-2, 1e-2, 3e-3), seed: int = 0,
                 kernels: list[int] | None = None) -> tuple[list[torch.Tensor], int]:
    """The shipped module fitted to `targets` by Adam (one cosine run per rate, best kept); (ΔW, #params).
    `kernels`: each target's k_h·k_w, for layouts with `kernel_axis`."""
    shapes = [tuple(t.shape) for t in targets.values()]
    flat = torch.cat([t.reshape(-1) for t in targets.values()])
    total = flat.pow(2).sum()
    best, best_loss, n_params = None, float("inf"), 0
    for lr in lrs:
        torch.manual_seed(seed)
        module = SuperLoRA(config, shapes, kernels)
        n_params = module.num_parameters()
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            loss = (torch.cat([d.reshape(-1) for d in module()]) - flat).pow(2).sum() / total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            fit = [d.detach().clone() for d in module()]
            loss = float((torch.cat([d.reshape(-1) for d in fit]) - flat).pow(2).sum() / total)
        if loss < best_loss:
            best, best_loss = fit, loss
    return best, n_params


def analyse(path: str, layouts: list[str], steps: int, lrs: tuple[float, ...] = (3e-2, 1e-2, 3e-3)) -> dict:
    from safetensors.torch import load_file

    targets = {k: v.float() for k, v in load_file(path).items()}
    norms: dict[str, float] = {}
    for name, t in targets.items():
        for key in ("all", layer_type(name)):
            norms[key] = norms.get(key, 0.0) + float(t.pow(2).sum())
    out = {"file": Path(path).name, "layers": len(targets), "entries": sum(t.numel() for t in targets.values()),
           "energy_share": {k: round(v / norms["all"], 4) for k, v in norms.items() if k != "all"}, "fits": {}}
    for rank in (1, 2, 4):
        out["fits"][f"svd_r{rank}"] = {"params": rank * sum(sum(t.shape) for t in targets.values()),
                                       "residual": residuals(svd_fit(targets, rank), targets)}
    kernels = toy_kernels(list(targets)) if any(LAYOUTS[name].get("kernel_axis") for name in layouts) else None
    for name in layouts:
        t0 = time.time()
        fit, n = gradient_fit(SuperLoRAConfig(**LAYOUTS[name]), targets, steps=steps, lrs=lrs, kernels=kernels)
        out["fits"][name] = {"params": n, "residual": residuals(fit, targets), "seconds": round(time.time() - t0, 1)}
        print(f"{out['file']} {name:12s} {n:>7,} params  residual {out['fits'][name]['residual']['all']:.3f}", flush=True)
    return out


def table(results: list[dict]) -> str:
    """Markdown: one row per fit, relative residual overall and per layer type, mean over the files."""
    names = list(results[0]["fits"])
    lines = ["| fit | params | all | " + " | ".join(LAYER_TYPES) + " |", "|---|---:|---:|" + "---:|" * len(LAYER_TYPES)]
    for name in names:
        rows = [r["fits"][name] for r in results]
        cell = lambda key: f"{sum(x['residual'].get(key, float('nan')) for x in rows) / len(rows):.3f}"  # noqa: E731
        lines.append(f"| `{name}` | {rows[0]['params']:,} | {cell('all')} | " + " | ".join(cell(k) for k in LAYER_TYPES) + " |")
    share = {k: sum(r["energy_share"].get(k, 0.0) for r in results) / len(results) for k in LAYER_TYPES}
    lines.append("| ΔW energy share | - | 1 | " + " | ".join(f"{share[k]:.2f}" for k in LAYER_TYPES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="dense ΔW safetensors, one per trained adapter")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    ap.add_argument("--steps", type=int, default=1500, help="Adam steps per learning rate")
    ap.add_argument("--lrs", type=lambda v: tuple(float(x) for x in v.split(",")), default=(3e-2, 1e-2, 3e-3),
                    help="Adam rates, one cosine run each, best fit kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every fit here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [analyse(f, args.layouts.split(","), args.steps, args.lrs) for f in args.files]
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
