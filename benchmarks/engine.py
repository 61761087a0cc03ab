"""ΔW generation cost at Stable Diffusion 1.5 scale, next to one SD-1.5-shaped UNet forward + backward.

Generates the ΔW of every attention projection of SD 1.5 (UNet self/cross attention + CLIP ViT-L text
encoder: 121,823,232 entries) with forward + backward, per preset, and reports median time and the
peak extra memory (ru_maxrss growth in a fresh process per row). The backward pass starts from fixed
random upstream gradients (what the UNet's backward hands each ΔW), so no synthetic loss is timed. The
UNet is timed before and after the presets (load on a shared machine drifts); the share uses the median of
all its timings. Last, the single N-sized passes the shuffle and Fastfood are made of are timed alone: the
floor those presets cannot go below with these kernels. Run:

    .venv/bin/python benchmarks/engine.py [--repeats 3] [--threads 1] [--skip-unet] [--skip-floors] [--presets Tucker,LoRA]
    python benchmarks/engine.py --device cuda --dtype bf16 [--latent 64]      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

# Large CPU tensors on 2 MB pages, as the trainer does (PyTorch reads this once, at import; the spawned
# processes inherit it): else every fresh N-sized tensor page-faults 487 MB back in. THP_MEM_ALLOC_ENABLE=0
# measures without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

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


def peak_mb(device: str = "cpu") -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_deltas(kwargs: dict, opts: dict, queue: mp.Queue) -> None:
    from superlora_diffusers import SuperLoRA, SuperLoRAConfig

    device = opts["device"]
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    shapes = sd15_attention_shapes()
    module = SuperLoRA(SuperLoRAConfig(**kwargs), shapes).to(device)  # fp32 factors, as in training
    for p in module.parameters():
        p.data.normal_(0, 0.01)
    # The upstream gradient of every ΔW, as the UNet's backward would deliver it (not counted in extra_mb).
    grads = [torch.randn(shape, device=device) for shape in shapes]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = peak_mb()
    times = []
    for _ in range(opts["repeats"] + 1):  # first run is warm-up
        sync(device)
        start = time.perf_counter()
        deltas = module()
        torch.autograd.backward(deltas, grads)
        sync(device)
        times.append(time.perf_counter() - start)
        del deltas
        module.zero_grad(set_to_none=True)
    queue.put(dict(params=module.num_parameters(), seconds=statistics.median(times[1:]), times=times[1:],
                   extra_mb=peak_mb(device) - base))


def time_unet(opts: dict, queue: mp.Queue) -> None:
    from diffusers import UNet2DConditionModel

    device, dtype, latent = opts["device"], DTYPES[opts["dtype"]], opts["latent"]
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
        )
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    # input grad forces the full backward pass
    sample = torch.randn(1, 4, latent, latent, device=device, dtype=dtype, requires_grad=True)
    text = torch.randn(1, 77, 768, device=device, dtype=dtype)
    times = timings(lambda: unet(sample, 10, text).sample.float().sum().backward(), opts["repeats"], device)
    queue.put(dict(params=sum(p.numel() for p in unet.parameters()), seconds=statistics.median(times), times=times))


def time_floors(opts: dict, queue: mp.Queue) -> None:
    """The single passes the shuffle and Fastfood presets cannot avoid, each timed alone over N entries.

    A permutation costs one gather forward and one backward (its inverse); Fastfood one Walsh-Hadamard
    transform over the padded length L forward and one backward (H is its own transpose). Twice these is
    what those presets cannot go below with these torch kernels on this machine; a plain copy of N entries
    shows how far that is from the memory-bandwidth floor.
    """
    from superlora_diffusers import SuperLoRAConfig
    from superlora_diffusers.layout import Layout, shuffle_index
    from superlora_diffusers.projection import fwht

    device = opts["device"]
    torch.set_num_threads(opts["threads"])
    shapes = sd15_attention_shapes()
    entries = sum(o * i for o, i in shapes)
    source = torch.randn(entries, device=device)
    index = shuffle_index(entries, 0).to(device=device, dtype=torch.int32)
    # A floor is the fastest call, not the median.
    out = {"copy of N entries (clone)": min(timings(source.clone, opts["repeats"], device)),
           "random gather of N entries (one shuffle pass)":
               min(timings(lambda: source.index_select(0, index), opts["repeats"], device))}
    del source, index
    for kwargs in PRESETS.values():  # the Fastfood presets' rows: one per chunk, padded to a power of two
        if kwargs.get("projection") != "fastfood":
            continue
        (block,) = Layout.build(SuperLoRAConfig(**kwargs), shapes).blocks
        bits = (block.size - 1).bit_length()
        rows = "L = " if block.count == 1 else f"{block.count} x "
        x = torch.randn(block.count, 1 << bits, device=device)
        out[f"WHT over {rows}2^{bits} (Fastfood G={block.count}, one pass)"] = min(
            timings(lambda: fwht(x), opts["repeats"], device))
        del x
    queue.put(out)


def timings(run, repeats: int, device: str) -> list[float]:
    """Seconds of `repeats` calls of `run`, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


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
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (use 1 on a shared machine: oversubscribed OpenMP threads spin)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="dtype of the UNet (the SuperLoRA factors and ΔW stay fp32, as in training)")
    parser.add_argument("--latent", type=int, default=32, help="latent size of the UNet step (32 = 256 px)")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-floors", action="store_true", help="do not time the single N-sized passes")
    parser.add_argument("--presets", help="comma list of substrings: only the presets whose name contains one")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    opts = dict(device=args.device, dtype=args.dtype, latent=args.latent, threads=args.threads, repeats=args.repeats)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 factor math on tensor cores
    presets = {name: kw for name, kw in PRESETS.items()
               if not args.presets or any(p.strip() in name for p in args.presets.split(","))}
    entries = sum(o * i for o, i in sd15_attention_shapes())
    print(f"SD 1.5 attention ΔW: {len(sd15_attention_shapes())} weights, {entries:,} entries; "
          f"torch {torch.__version__}, {args.threads} threads, {cpu_name()}, THP_MEM_ALLOC_ENABLE={thp()}; "
          f"load average {os.getloadavg()[0]:.1f}"
          + (f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    unet_runs = [] if args.skip_unet else [in_fresh_process(time_unet, opts)]
    unet = None
    if unet_runs:
        unet = dict(params=unet_runs[0]["params"], seconds=unet_runs[0]["seconds"])
        print(f"SD-1.5-shaped UNet ({unet['params'] / 1e6:.0f}M params, {args.dtype}) fwd+bwd, batch 1, "
              f"{args.latent}x{args.latent} latent: "
              f"{unet['seconds']:.2f} s (before the presets)")
    rows = []
    print("\n| preset | trainable params | ΔW fwd+bwd (s) | share of UNet fwd+bwd | extra peak memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, kwargs in presets.items():
        r = in_fresh_process(time_deltas, kwargs, opts)
        share = f"{100 * r['seconds'] / unet['seconds']:.1f}%" if unet else "-"
        print(f"| {name} | {r['params']:,} | {r['seconds']:.3f} | {share} (first UNet timing) | "
              f"{r['extra_mb']:.0f} |", flush=True)
        rows.append(dict(preset=name, **r))
    if unet_runs:
        unet_runs.append(in_fresh_process(time_unet, opts))
        unet["times"] = [t for run in unet_runs for t in run["times"]]
        unet["seconds"] = statistics.median(unet["times"])
        print(f"\nUNet fwd+bwd after the presets: {unet_runs[1]['seconds']:.2f} s; median of all "
              f"{len(unet['times'])} timings: {unet['seconds']:.2f} s. Shares against that median:\n")
        print("| preset | ΔW fwd+bwd (s) | share of UNet fwd+bwd | target < 15% |")
        print("|---|---:|---:|---|")
        for row in rows:
            row["share"] = row["seconds"] / unet["seconds"]
            print(f"| {row['preset']} | {row['seconds']:.3f} | {100 * row['share']:.1f}% | "
                  f"{'met' if row['share'] < 0.15 else 'NOT met'} |")
    floors = {} if args.skip_floors else in_fresh_process(time_floors, opts)
    if floors:
        print("\nSingle passes over N entries (fastest of the repeats); twice a gather is the shuffle's floor, "
              "twice a WHT Fastfood's:\n")
        print("| pass | seconds | share of UNet fwd+bwd, x2 (forward + backward) |")
        print("|---|---:|---:|")
        for name, seconds in floors.items():
            share = f"{200 * seconds / unet['seconds']:.1f}%" if unet else "-"
            print(f"| {name} | {seconds:.3f} | {share} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(unet=unet, rows=rows, floors=floors, entries=entries, cpu=cpu_name(), thp_mem_alloc_enable=thp(), **opts,
                           gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                           torch=torch.__version__, load_average_end=os.getloadavg()), f, indent=1)


def thp() -> str:
    return os.environ["THP_MEM_ALLOC_ENABLE"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
