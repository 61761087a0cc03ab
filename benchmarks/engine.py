"""ΔW generation cost at Stable Diffusion 1.5 scale, next to one SD-1.5-shaped UNet forward + backward.

Generates the ΔW of every attention projection of SD 1.5 (UNet self/cross attention + CLIP ViT-L text
encoder: 121,823,232 entries) with forward + backward, per preset, and reports median time and the
peak extra memory (ru_maxrss growth in a fresh process per row). Run:

    .venv/bin/python benchmarks/engine.py [--repeats 3] [--skip-unet]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch

# (d_out, d_in) of every adapted weight, in target order: UNet transformer blocks then CLIP layers.
UNET_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def sd15_attention_shapes() -> list[tuple[int, int]]:
    shapes = []
    for d in UNET_WIDTHS:
        shapes += [(d, d)] * 4  # attn1: to_q, to_k, to_v, to_out.0
        shapes += [(d, d), (d, 768), (d, 768), (d, d)]  # attn2: cross-attention to 768-d text
    shapes += [(768, 768)] * 4 * 12  # CLIP ViT-L: q, k, v, out_proj in 12 layers
    return shapes


PRESETS = {
    "LoRA r=4 (per weight)": dict(factorization="lora", groups="weight", rank=4),
    "LoKr r=4 (per weight)": dict(factorization="kronecker", groups="weight", rank=4),
    "group LoRA G=4 r=16": dict(factorization="lora", groups=4, rank=16),
    "group LoRA G=1 r=8 + shuffle": dict(factorization="lora", groups=1, rank=8, shuffle=True),
    "LoNKr K=3 G=12 r=4": dict(factorization="kronecker", groups=12, kron_splits=3, rank=4),
    "Tucker 3-D G=12 r=5": dict(factorization="tucker", groups=12, fold=3, rank=5),
    "Tucker 5-D G=1 r=2": dict(factorization="tucker", groups=1, fold=5, rank=2),
    "Tucker 3-D G=12 r=5 + Fastfood ρ=0.1": dict(factorization="tucker", groups=12, fold=3, rank=5,
                                                  projection="fastfood", projection_ratio=0.1),
    "Tucker 3-D G=1 r=4 + Fastfood ρ=0.01": dict(factorization="tucker", groups=1, fold=3, rank=4,
                                                  projection="fastfood", projection_ratio=0.01),
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_deltas(kwargs: dict, repeats: int, queue: mp.Queue) -> None:
    from superlora_diffusers import SuperLoRA, SuperLoRAConfig

    torch.manual_seed(0)
    module = SuperLoRA(SuperLoRAConfig(**kwargs), sd15_attention_shapes())
    for p in module.parameters():
        p.data.normal_(0, 0.01)
    base = peak_mb()
    times = []
    for _ in range(repeats + 1):  # first run is warm-up
        start = time.perf_counter()
        deltas = module()
        loss = sum(d.sum() for d in deltas)  # cheapest loss that still backpropagates into every entry
        loss.backward()
        times.append(time.perf_counter() - start)
        del deltas, loss
        module.zero_grad(set_to_none=True)
    queue.put(dict(params=module.num_parameters(), seconds=statistics.median(times[1:]), extra_mb=peak_mb() - base))


def time_unet(repeats: int, queue: mp.Queue) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
    )
    unet.requires_grad_(False)
    sample = torch.randn(1, 4, 32, 32, requires_grad=True)  # input grad forces the full backward pass
    text = torch.randn(1, 77, 768)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        unet(sample, 10, text).sample.sum().backward()
        times.append(time.perf_counter() - start)
    queue.put(dict(params=sum(p.numel() for p in unet.parameters()), seconds=statistics.median(times[1:])))


def in_fresh_process(target, *args) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    entries = sum(o * i for o, i in sd15_attention_shapes())
    print(f"SD 1.5 attention ΔW: {len(sd15_attention_shapes())} weights, {entries:,} entries; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    unet = None if args.skip_unet else in_fresh_process(time_unet, args.repeats)
    if unet:
        print(f"SD-1.5-shaped UNet ({unet['params'] / 1e6:.0f}M params) fwd+bwd, batch 1, 32x32 latent: "
              f"{unet['seconds']:.2f} s")
    rows = []
    print("\n| preset | trainable params | ΔW fwd+bwd (s) | share of UNet fwd+bwd | extra peak memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, kwargs in PRESETS.items():
        r = in_fresh_process(time_deltas, kwargs, args.repeats)
        share = f"{100 * r['seconds'] / unet['seconds']:.1f}%" if unet else "-"
        print(f"| {name} | {r['params']:,} | {r['seconds']:.3f} | {share} | {r['extra_mb']:.0f} |", flush=True)
        rows.append(dict(preset=name, **r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(unet=unet, rows=rows, entries=entries), f, indent=1)


if __name__ == "__main__":
    main()
