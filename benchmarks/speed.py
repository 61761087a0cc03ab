"""Cost of SuperLoRA next to peft LoRA rank 4 on the same targets: training step, inference, adapter file.

Three sections, every ratio measured inside one run:

1. Training step (forward, MSE loss, backward, AdamW step) of the UNet with its attention projections
   adapted (`target_modules="unet"`: to_q, to_k, to_v, to_out.0 of every self- and cross-attention), for
   peft LoRA r=4 and several SuperLoRA presets, on (a) the toy base UNet and (b) a randomly initialised
   SD-1.5-shaped UNet. Step time: one process, the configurations interleaved round by round (order
   reversed every other round); ratio = the median over rounds of (configuration's median step in the
   round / peft LoRA's in the same round): paired within a round, so slow drifts of a shared machine's
   load cancel.
   Peak memory: each configuration in its own fresh process: peak resident memory (CPU: VmHWM, reset
   after the model is built; CUDA: max_memory_allocated) above the baseline after the model is built,
   and the total peak.
2. Inference: base vs unfused vs fused adapter, loaded with `load_superlora_weights` from a random
   non-zero adapter file: the toy pipeline end to end (text encoder, denoising loop, VAE decode) and the
   SD-1.5-shaped UNet forward only (batch 2 = classifier-free guidance). States interleaved round by round;
   ratio = the median over rounds of the per-round ratio to the base.
3. Adapter file: bytes, trainable parameters and `load_superlora_weights` time per preset, next to LoRA
   rank 4 of the same targets (formula 4 bytes x r x sum(d_out + d_in), and peft's own state dict saved).

Run (CPU, fp32):    .venv/bin/python benchmarks/speed.py --threads 1 [--quick]
Run (GPU, bf16):    python benchmarks/speed.py --device cuda --dtype bf16   (SD-1.5 at 64x64; also xformers)
Results: a markdown table on stdout and JSON in benchmarks/results/speed-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

# As the trainer: large CPU tensors on 2 MB pages (read once, at import; spawned processes inherit it).
# THP_MEM_ALLOC_ENABLE=0 measures without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# --targets conv: attention and the ResNet conv1/conv2, for peft as SuperLoRA's "unet+conv" preset (the demo's layers)
PEFT_CONV_TARGETS = r".*(\.to_q|\.to_k|\.to_v|\.to_out\.0|resnets\.\d+\.conv1|resnets\.\d+\.conv2)"
SUPERLORA_TARGETS = {"attention": "unet", "conv": "unet+conv"}

# Stable Diffusion 1.5's UNet and CLIP ViT-L text encoder configs (the same dicts as tests/test_sd_shapes.py).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

# name -> None for peft LoRA r=4, else SuperLoRAConfig kwargs (target_modules="unet" added).
TRAIN_CONFIGS: dict[str, dict | None] = {
    "peft LoRA r=4": None,
    "SuperLoRA lora preset r=4": dict(factorization="lora", groups="weight", fold=2, rank=4),
    "SuperLoRA lorta G=4 fold 3 r=4": dict(factorization="tucker", groups=4, fold=3, rank=4),
    "SuperLoRA lorta G=4 fold 3 r=4 + Fastfood ρ=0.1": dict(factorization="tucker", groups=4, fold=3, rank=4,
                                                             projection="fastfood", projection_ratio=0.1),
    "SuperLoRA lonkr K=3 G=1 r=4": dict(factorization="kronecker", groups=1, kron_splits=3, rank=4),
    "SuperLoRA Tucker axes r=8": dict(factorization="tucker", groups="shape", fold=3, rank=8),
    "SuperLoRA tucker-axes r=1 (the demo's preset)": dict(factorization="tucker", groups="shape", fold=3, rank=1),
    "SuperLoRA tucker-axes-shared r=6 (kernel axis + shared bases)": dict(
        factorization="tucker", groups="shape", fold=3, rank=6, kernel_axis=True, share_axes=True),
}
BASELINE = "peft LoRA r=4"
INFERENCE_PRESET = "SuperLoRA lorta G=4 fold 3 r=4"  # the trainer's default preset
TARGETS = dict(step_time=1.10, peak_memory=1.15, fused=1.02, unfused=1.10)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- machine -----------------------------------------------------------------------------------------
def machine(device: str) -> dict:
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = dict(cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers.__version__, peft=peft.__version__, transformers=transformers.__version__,
                python=platform.python_version(), ram_gb=round(_meminfo_gb(), 1),
                thp_mem_alloc_enable=os.environ["THP_MEM_ALLOC_ENABLE"])
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        with contextlib.suppress(ImportError):
            import xformers

            info["xformers"] = xformers.__version__
    return info


def _meminfo_gb() -> float:
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 (missing or broken build: either way, not available)
        return False
    return True


# ---- memory ------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class PeakMemory:
    """Peak memory in MB from `reset()` on: CUDA max_memory_allocated, or the process's peak RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def current(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return _status_mb("VmRSS")

    def reset(self) -> float:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
                f.write("5")
        return self.current()

    def peak(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_mb("VmHWM")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- models ------------------------------------------------------------------------------------------
def toy_base_dir() -> Path | None:
    from superlora_diffusers.toy import BASE_MODEL_DIR

    path = Path(BASE_MODEL_DIR)
    return path if (path / "model_index.json").exists() else None


def build_unet(model: str, device: str, dtype: torch.dtype, attention: str):
    """(unet, description): frozen, on `device` in `dtype`, with the requested attention backend."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "toy":
        base = toy_base_dir()
        if base is not None:
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32)
            what = "toy base UNet (trained, superlora_diffusers/toy/assets/base)"
        else:
            from superlora_diffusers.toy.pretrain import make_unet

            unet = make_unet()
            what = "toy UNet architecture (toy/pretrain.py make_unet), random init: the trained base was absent"
    else:
        with torch.device(device):  # initialise where it runs (on CUDA, seconds instead of a CPU init + copy)
            unet = UNet2DConditionModel(**SD15_UNET)
        what = "SD-1.5-shaped UNet, random init"
    unet.requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    set_attention(unet, attention)
    return unet, what


def set_attention(unet, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    # "sdpa": diffusers' default AttnProcessor2_0 (torch scaled_dot_product_attention)


def toy_pipeline(device: str, dtype: torch.dtype, attention: str):
    """The toy text-to-image pipeline: the trained base if shipped, else the same architecture at random."""
    from diffusers import StableDiffusionPipeline

    base = toy_base_dir()
    if base is not None:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        what = "toy pipeline (trained base, superlora_diffusers/toy/assets/base)"
    else:
        from superlora_diffusers.toy import pretrain
        from superlora_diffusers.toy.tokenizer import build_clip_tokenizer, byte_level_tokenizer

        torch.manual_seed(0)
        try:
            tokenizer = build_clip_tokenizer()
        except Exception:  # noqa: BLE001 (open_clip's BPE file missing: a byte-level vocabulary times the same)
            tokenizer = byte_level_tokenizer()
        pipe = StableDiffusionPipeline(
            vae=pretrain.make_vae(), text_encoder=pretrain.make_text_encoder(), tokenizer=tokenizer,
            unet=pretrain.make_unet(), scheduler=pretrain.make_sample_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        what = "toy pipeline architecture (toy/pretrain.py), random init: the trained base was absent"
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    set_attention(pipe.unet, attention)
    return pipe, what


def make_batch(unet, batch: int, latent: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c, d = unet.config.in_channels, unet.config.cross_attention_dim
    latents = torch.randn(batch, c, latent, latent, generator=gen).to(device, dtype)
    target = torch.randn(batch, unet.config.out_channels, latent, latent, generator=gen).to(device, dtype)
    text = torch.randn(batch, 77, d, generator=gen).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return latents, timesteps, text, target


# ---- adapters ----------------------------------------------------------------------------------------
class Adapter:
    """One training configuration attached to a UNet: its trainable parameters and how to remove it."""

    def __init__(self, name: str, unet, targets: str = "attention") -> None:
        self.name, self.unet, self.kwargs = name, unet, TRAIN_CONFIGS[name]
        if self.kwargs is None:
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            peft_targets = PEFT_CONV_TARGETS if targets == "conv" else PEFT_TARGETS
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=peft_targets))
            cast_training_params(unet, torch.float32)  # as diffusers' LoRA scripts do under mixed precision
            self.params = [p for p in unet.parameters() if p.requires_grad]
            self.module = None
        else:
            from superlora_diffusers import SuperLoRAConfig, inject_superlora

            config = SuperLoRAConfig(**self.kwargs, target_modules=SUPERLORA_TARGETS[targets])
            self.module = inject_superlora({"unet": unet}, config)
            self.params = list(self.module.parameters())  # fp32 whatever the UNet's dtype (as the trainer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def file_bytes(self) -> int:
        from safetensors.torch import save

        if self.module is None:
            from peft import get_peft_model_state_dict

            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
            return len(save(state))
        from superlora_diffusers.serialization import serialize

        return len(serialize(self.module, self.module.targets))

    def remove(self) -> None:
        if self.module is None:
            self.unet.unload_lora()
        else:
            from superlora_diffusers.components import remove_superlora

            remove_superlora({"unet": self.unet})
        self.params = []
        self.module = None
        gc.collect()


def train_step(unet, optimizer, batch) -> None:
    latents, timesteps, text, target = batch
    pred = unet(latents, timesteps, text).sample
    loss = F.mse_loss(pred.float(), target.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---- section 1: training -----------------------------------------------------------------------------
def train_memory_child(spec: dict) -> dict:
    """Fresh process: build the model, reset the peak, attach one configuration, run a few training steps."""
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    unet, _ = build_unet(spec["model"], device, dtype, spec["attention"])
    batch = make_batch(unet, spec["batch"], spec["latent"], device, dtype)
    memory = PeakMemory(device)
    baseline = memory.reset()
    adapter = Adapter(spec["config"], unet, spec["targets"])
    optimizer = torch.optim.AdamW(adapter.params, lr=1e-4)
    times = [timed(lambda: train_step(unet, optimizer, batch), device) for _ in range(spec["steps"])]
    peak = memory.peak()
    return dict(baseline_mb=baseline, peak_mb=peak, extra_mb=peak - baseline, params=adapter.num_parameters(),
                file_bytes=adapter.file_bytes(), seconds_fresh_process=times)


def train_timing(model: str, args, attention: str) -> dict:
    """One process, configurations interleaved: per configuration all timed step seconds, round by round."""
    device, dtype = args.device, DTYPES[args.dtype]
    unet, what = build_unet(model, device, dtype, attention)
    batch_size, latent = sizes(model, args)["train"]
    batch = make_batch(unet, batch_size, latent, device, dtype)
    warmup = 0 if (args.quick and model == "sd15" and device == "cpu") else args.warmup
    steps = args.toy_steps if model == "toy" else args.steps
    names = list(TRAIN_CONFIGS)
    rounds = [[] for _ in range(args.rounds)]
    generation = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            adapter = Adapter(name, unet, args.targets)
            optimizer = torch.optim.AdamW(adapter.params, lr=1e-4)
            for _ in range(warmup if r == 0 else 0):  # one-time costs (kernel set-up) land in the first round
                train_step(unet, optimizer, batch)
            secs = [timed(lambda: train_step(unet, optimizer, batch), device) for _ in range(steps)]
            rounds[r].append((name, secs))
            if adapter.module is not None and args.generation:  # the ΔW generation + its backward alone
                grads = [torch.randn(shape, device=device) for shape in adapter.module.shapes]
                generation[name].append(timed(lambda: generate_and_backward(adapter.module, grads), device))
                del grads
            del optimizer
            adapter.remove()
            print(f"  [{model} train, round {r + 1}/{args.rounds}] {name}: "
                  f"{', '.join(f'{s:.3f}' for s in secs)} s", file=sys.stderr, flush=True)
    times = {name: [s for rnd in rounds for n, secs in rnd if n == name for s in secs] for name in names}
    per_round = {name: [statistics.median(dict(rnd)[name]) / statistics.median(dict(rnd)[BASELINE]) for rnd in rounds]
                 for name in names}
    del unet
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the memory processes that follow get the whole GPU
    return dict(model=what, batch=batch_size, latent=latent, times=times, round_ratios=per_round,
                generation={k: statistics.median(v) for k, v in generation.items() if v})


def generate_and_backward(module, grads) -> None:
    """All ΔW from the factors, then backward from fixed upstream gradients (what F.linear's backward sends)."""
    deltas = module()
    torch.autograd.backward(deltas, grads)
    module.zero_grad(set_to_none=True)


def section_training(model: str, args, attention: str) -> dict:
    timing = train_timing(model, args, attention)
    batch_size, latent = sizes(model, args)["train"]
    memory = {}
    if args.memory and not (args.quick and model == "sd15" and args.device == "cpu"):
        for name in TRAIN_CONFIGS:
            spec = dict(model=model, config=name, device=args.device, dtype=args.dtype, attention=attention,
                        batch=batch_size, latent=latent, steps=args.memory_steps, targets=args.targets)
            memory[name] = in_fresh_process(train_memory_child, spec)
            print(f"  [{model} memory] {name}: +{memory[name]['extra_mb']:.0f} MB "
                  f"(peak {memory[name]['peak_mb']:.0f} MB)", file=sys.stderr, flush=True)
    rows = []
    base_t = statistics.median(timing["times"][BASELINE])
    for name in TRAIN_CONFIGS:
        t = statistics.median(timing["times"][name])
        row = dict(config=name, step_s=t, step_ratio=statistics.median(timing["round_ratios"][name]),
                   step_ratio_pooled=t / base_t, generation_s=timing["generation"].get(name),
                   round_ratio_min=min(timing["round_ratios"][name]), round_ratio_max=max(timing["round_ratios"][name]),
                   step_times=timing["times"][name])
        if name in memory:
            m, b = memory[name], memory[BASELINE]
            row.update(params=m["params"], file_bytes=m["file_bytes"], extra_mb=m["extra_mb"], peak_mb=m["peak_mb"],
                       extra_ratio=m["extra_mb"] / b["extra_mb"], peak_ratio=m["peak_mb"] / b["peak_mb"],
                       seconds_fresh_process=m["seconds_fresh_process"])
        rows.append(row)
    return dict(model=timing["model"], attention=attention, targets=args.targets, batch=timing["batch"],
                latent=timing["latent"], rows=rows)


# ---- section 2: inference ----------------------------------------------------------------------------
def unet_only(unet):
    """Just enough of a pipeline for the loader verbs (`pipe.load_superlora_weights` etc.): a UNet alone."""
    from superlora_diffusers import SuperLoRALoaderMixin

    class UNetOnly(SuperLoRALoaderMixin):
        def __init__(self, unet) -> None:
            self.unet = unet

    return UNetOnly(unet)


def random_adapter_file(components: dict, kwargs: dict, target_modules: str, folder: str, seed: int = 0) -> Path:
    """Inject a SuperLoRA, give every factor small random values (a non-zero ΔW), save it, remove it."""
    from superlora_diffusers import SuperLoRAConfig, inject_superlora
    from superlora_diffusers.components import remove_superlora
    from superlora_diffusers.serialization import WEIGHT_NAME, save_superlora_file

    module = inject_superlora(components, SuperLoRAConfig(**kwargs, target_modules=target_modules))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    path = save_superlora_file(Path(folder) / WEIGHT_NAME, module, module.targets, overwrite=True)
    remove_superlora(components)
    return path


def inference_states(loader, path: Path, run, device: str, rounds: int, calls: int) -> dict:
    """Interleave base / unfused / fused: per state the first call after switching, then `calls` timed calls."""
    states = ["base", "unfused", "fused"]
    out = {s: dict(first=[], times=[], rounds=[]) for s in states}
    loads, fuses = [], []
    for r in range(rounds):
        for state in states if r % 2 == 0 else states[::-1]:
            if loader.get_list_superlora_adapters():
                loader.unload_superlora_weights()
            gc.collect()
            if state != "base":
                loads.append(timed(lambda: loader.load_superlora_weights(path), device))
            if state == "fused":
                fuses.append(timed(loader.fuse_superlora, device))
            out[state]["first"].append(timed(run, device))  # unfused: includes the one ΔW generation
            secs = [timed(run, device) for _ in range(calls)]
            out[state]["times"] += secs
            out[state]["rounds"].append(statistics.median(secs))
        print(f"  [inference round {r + 1}/{rounds}] " + ", ".join(
            f"{s} {statistics.median(out[s]['times'][-calls:]):.3f} s" for s in states), file=sys.stderr, flush=True)
    if loader.get_list_superlora_adapters():
        loader.unload_superlora_weights()
    base = statistics.median(out["base"]["times"])
    rows = []
    for s in states:
        round_ratios = [a / b for a, b in zip(out[s]["rounds"], out["base"]["rounds"])]
        median = statistics.median(out[s]["times"])
        rows.append(dict(state=s, call_s=median, ratio=statistics.median(round_ratios), ratio_pooled=median / base,
                         round_ratio_min=min(round_ratios), round_ratio_max=max(round_ratios),
                         first_call_s=statistics.median(out[s]["first"]), times=out[s]["times"]))
    return dict(rows=rows, load_s=statistics.median(loads), fuse_s=statistics.median(fuses),
                file_bytes=path.stat().st_size)


def section_inference_toy(args, attention: str) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    pipe, what = toy_pipeline(device, dtype, attention)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    steps = args.pipe_steps

    def run():
        with torch.no_grad():
            pipe("a photo of a red star on a blue square", num_inference_steps=steps, guidance_scale=7.5,
                 height=size, width=size, output_type="np", generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as folder:
        path = random_adapter_file(components, TRAIN_CONFIGS[INFERENCE_PRESET], "unet", folder)
        result = inference_states(pipe, path, run, device, args.rounds, args.calls)
    return dict(model=what, what=f"pipeline call, {steps} steps, guidance 7.5 (UNet batch 2), {size}x{size} px, "
                f"text encoder + VAE decode included", preset=INFERENCE_PRESET, attention=attention, **result)


def section_inference_unet(model: str, args, attention: str) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    unet, what = build_unet(model, device, dtype, attention)
    batch_size, latent = sizes(model, args)["infer"]
    latents, timesteps, text, _ = make_batch(unet, batch_size, latent, device, dtype)
    loader = unet_only(unet)

    def run():
        with torch.no_grad():
            unet(latents, timesteps, text)

    with tempfile.TemporaryDirectory() as folder:
        path = random_adapter_file({"unet": unet}, TRAIN_CONFIGS[INFERENCE_PRESET], "unet", folder)
        result = inference_states(loader, path, run, device, args.rounds, args.calls)
    del unet, loader
    gc.collect()
    return dict(model=what, what=f"UNet forward only, batch {batch_size}, {latent}x{latent} latent",
                preset=INFERENCE_PRESET, attention=attention, **result)


# ---- section 3: adapter files ------------------------------------------------------------------------
def section_files(model: str, args) -> dict:
    """Per preset: trainable parameters, file bytes and load time, next to LoRA r=4 of the same targets."""
    device, dtype = args.device, DTYPES[args.dtype]
    unet, what = build_unet(model, device, dtype, "sdpa")
    loader = unet_only(unet)
    from superlora_diffusers import find_targets, lora_parameter_count

    shapes = [t.shape for t in find_targets({"unet": unet}, "unet")]
    lora_bytes = 4 * lora_parameter_count(shapes, rank=4)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, kwargs in TRAIN_CONFIGS.items():
            if kwargs is None:
                adapter = Adapter(name, unet)
                rows.append(dict(config=name, params=adapter.num_parameters(), file_bytes=adapter.file_bytes(),
                                 load_s=None))
                adapter.remove()
                continue
            sub = Path(folder) / str(len(rows))
            path = random_adapter_file({"unet": unet}, kwargs, "unet", str(sub))
            loads = []
            for _ in range(args.load_repeats):
                loads.append(timed(lambda: loader.load_superlora_weights(path), device))
                params = loader.get_superlora_info()["num_parameters"]
                loader.unload_superlora_weights()
            rows.append(dict(config=name, params=params, file_bytes=path.stat().st_size,
                             load_s=statistics.median(loads)))
    del unet, loader
    gc.collect()
    return dict(model=what, targets=len(shapes), adapted_entries=sum(o * i for o, i in shapes),
                lora_r4_params=lora_bytes // 4, lora_r4_bytes_formula=lora_bytes, rows=rows)


# ---- plumbing ----------------------------------------------------------------------------------------
def sizes(model: str, args) -> dict:
    """(batch, latent) of the training step and of the UNet-only inference call, per model."""
    if model == "toy":
        return dict(train=(args.toy_batch, 16), infer=(2, 16))
    return dict(train=(args.sd15_batch, args.sd15_latent), infer=(2, args.sd15_latent))


def _child(target, spec, q) -> None:
    try:
        torch.set_num_threads(spec.pop("threads"))
        q.put(dict(ok=target(spec)))
    except BaseException:  # noqa: BLE001 (report any failure to the parent instead of hanging it)
        q.put(dict(error=traceback.format_exc()))


def in_fresh_process(target, spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, dict(spec, threads=torch.get_num_threads()), q))
    proc.start()
    while True:
        try:
            result = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child exited with code {proc.exitcode} (out of memory?)") from None
    proc.join()
    if "error" in result:
        raise RuntimeError("benchmark child failed:\n" + result["error"])
    return result["ok"]


def verdict(value: float, target: float) -> str:
    return f"{value:.3f} {'met' if value <= target else 'NOT met'}"


def markdown(results: dict) -> str:
    out = []
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads"
    out.append(f"Machine: {where}; torch {m['torch']}, diffusers {m['diffusers']}, peft {m['peft']}; "
               f"dtype {results['args']['dtype']}; load average at start {results['load_average_start']}, "
               f"at end {results['load_average_end']}.")
    if results["args"]["quick"]:
        out.append("QUICK MODE: a smoke run of every path (one round; on CPU no warm-up, memory or ΔW-generation "
                   "timing for SD-1.5); its ratios are not results.")
    for t in results["training"]:
        out.append(f"\n### Training step: {t['model']} (batch {t['batch']}, {t['latent']}x{t['latent']} latent, "
                   f"attention {t['attention']}, adapted: {t.get('targets', 'attention')})\n")
        out.append("| config | trainable params | step (s) | step ratio vs LoRA: median of rounds (min-max) | "
                   "ΔW gen+bwd alone (s) | extra peak (MB) | extra ratio | total peak (MB) | total ratio |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in t["rows"]:
            gen = "-" if r.get("generation_s") is None else f"{r['generation_s']:.3f}"
            params = f"{r['params']:,}" if "params" in r else "-"
            mem = (f"{r['extra_mb']:,.0f} | {r['extra_ratio']:.2f} | {r['peak_mb']:,.0f} | {r['peak_ratio']:.2f}"
                   if "peak_mb" in r else "- | - | - | -")
            out.append(f"| {r['config']} | {params} | {r['step_s']:.3f} | {r['step_ratio']:.3f} "
                       f"({r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}) | {gen} | {mem} |")
        out.append("")
        for r in t["rows"]:
            if r["config"] == BASELINE:
                continue
            line = f"- {r['config']}: step time ratio {verdict(r['step_ratio'], TARGETS['step_time'])} (target <= 1.10)"
            if "peak_ratio" in r:
                line += (f"; peak memory ratio total {verdict(r['peak_ratio'], TARGETS['peak_memory'])}, "
                         f"above the model {verdict(r['extra_ratio'], TARGETS['peak_memory'])} (target <= 1.15)")
            out.append(line)
    for inf in results["inference"]:
        out.append(f"\n### Inference: {inf['model']}; {inf['what']}; adapter {inf['preset']}, attention "
                   f"{inf['attention']}\n")
        out.append("| state | call (s), median | ratio vs base: median of rounds (min-max) | "
                   "first call after switching (s) |")
        out.append("|---|---:|---:|---:|")
        for r in inf["rows"]:
            out.append(f"| {r['state']} | {r['call_s']:.4f} | {r['ratio']:.3f} ({r['round_ratio_min']:.2f}-"
                       f"{r['round_ratio_max']:.2f}) | {r['first_call_s']:.4f} |")
        fused, unfused = (next(r["ratio"] for r in inf["rows"] if r["state"] == s) for s in ("fused", "unfused"))
        out.append(f"\nFused {verdict(fused, TARGETS['fused'])} (target <= 1.02); unfused "
                   f"{verdict(unfused, TARGETS['unfused'])} (target <= 1.10). `load_superlora_weights` "
                   f"{inf['load_s'] * 1e3:.1f} ms, `fuse_superlora` {inf['fuse_s'] * 1e3:.1f} ms, file "
                   f"{inf['file_bytes']:,} bytes.")
    for f in results["files"]:
        out.append(f"\n### Adapter files: {f['model']} ({f['targets']} targets, {f['adapted_entries']:,} adapted "
                   f"entries); LoRA r=4 by formula: {f['lora_r4_params']:,} params, "
                   f"{f['lora_r4_bytes_formula']:,} bytes\n")
        out.append("| config | trainable params | file bytes | vs LoRA r=4 bytes (formula) | "
                   "load_superlora_weights (ms) |")
        out.append("|---|---:|---:|---:|---:|")
        for r in f["rows"]:
            load = "-" if r["load_s"] is None else f"{r['load_s'] * 1e3:.1f}"
            out.append(f"| {r['config']} | {r['params']:,} | {r['file_bytes']:,} | "
                       f"{r['file_bytes'] / f['lora_r4_bytes_formula']:.4f} | {load} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the frozen base models")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 3 min on CPU): 1 round; on CPU SD-1.5 at 8x8 without "
                        "warm-up, per-process memory or ΔW-generation timing")
    parser.add_argument("--models", default="toy,sd15", help="comma list of toy, sd15")
    parser.add_argument("--sections", default="train,infer,files", help="comma list of train, infer, files")
    parser.add_argument("--configs", default=None,
                        help="comma list of TRAIN_CONFIGS names to train (default: all; peft LoRA r=4 always runs)")
    parser.add_argument("--targets", choices=["attention", "conv"], default="attention",
                        help="training section: the UNet's attention projections (default), or also its ResNet "
                             "conv1/conv2, the README demo's UNet layers (peft LoRA r=4 on the same layers)")
    parser.add_argument("--attention", default="auto",
                        help="sdpa, xformers, or auto (sdpa; on CUDA also xformers when it imports)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 4, quick 1)")
    parser.add_argument("--steps", type=int,
                        help="timed training steps per configuration per round (default: CPU 1, CUDA 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed training steps per configuration in the first round (later rounds: none)")
    parser.add_argument("--calls", type=int,
                        help="timed inference calls per state per round (default: CPU 5, CUDA 10, quick 2)")
    parser.add_argument("--pipe-steps", type=int, default=10, help="denoising steps of the toy pipeline call")
    parser.add_argument("--sd15-latent", type=int, help="SD-1.5 latent size (default: CPU 16, quick 8; CUDA 64)")
    parser.add_argument("--sd15-batch", type=int, help="SD-1.5 training batch (default: CPU 1, CUDA 2)")
    parser.add_argument("--toy-batch", type=int, default=4, help="toy training batch (16x16 latent)")
    parser.add_argument("--toy-steps", type=int, help="timed toy training steps per configuration per round "
                        "(default 5, quick 2)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-process peak memory")
    parser.add_argument("--no-generation", dest="generation", action="store_false",
                        help="skip timing the ΔW generation + backward alone")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: keep fp32 matmuls exact (no TF32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (use 1 on a shared machine: oversubscribed OpenMP threads spin)")
    parser.add_argument("--json", help="output JSON (default benchmarks/results/speed-<device>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.dtype != "fp32":
        print("note: bf16/fp16 on CPU times the CPU's low-precision kernels, not a GPU", file=sys.stderr)
    gpu = args.device == "cuda"
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.steps = args.steps or (1 if args.quick or not gpu else 5)
    args.toy_steps = args.toy_steps or (2 if args.quick else 5)
    args.calls = args.calls or (2 if args.quick else (10 if gpu else 5))
    args.sd15_latent = args.sd15_latent or (64 if gpu else (8 if args.quick else 16))
    args.sd15_batch = args.sd15_batch or (2 if gpu else 1)
    if args.quick and not gpu:  # a smoke run of every path: SD-1.5 without warm-up, memory or generation timing
        args.pipe_steps = min(args.pipe_steps, 4)
        args.load_repeats = 1
        args.generation = False
    if gpu and not args.no_tf32:  # as diffusers' scripts with --allow_tf32: the fp32 factor math on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.configs:
        keep = {BASELINE, *(c.strip() for c in args.configs.split(","))}
        if unknown := keep - set(TRAIN_CONFIGS):
            parser.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(TRAIN_CONFIGS)}")
        if "infer" in args.sections and INFERENCE_PRESET not in keep:
            parser.error(f"--sections infer loads {INFERENCE_PRESET!r}; add it to --configs or use --sections train")
        for name in set(TRAIN_CONFIGS) - keep:
            del TRAIN_CONFIGS[name]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if args.attention == "auto":
        attentions = ["sdpa"] + (["xformers"] if gpu and xformers_available() else [])
    else:
        attentions = [args.attention]

    import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)

    results = dict(args=vars(args), machine=machine(args.device), load_average_start=load_average(),
                   training=[], inference=[], files=[], targets=TARGETS)
    results["errors"] = []
    started = time.perf_counter()

    def run(kind: str, label: str, fn, *fn_args) -> None:
        """One section; a failure (say, xformers without a kernel for this GPU) is recorded, the rest still runs."""
        print(f"{label}", file=sys.stderr, flush=True)
        try:
            results[kind].append(fn(*fn_args))
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
            print(f"FAILED: {label}\n{error}", file=sys.stderr, flush=True)
            results["errors"].append(dict(section=label, error=error))
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    for attention in attentions:
        if "train" in sections:
            for model in models:
                run("training", f"training: {model}, {attention}", section_training, model, args, attention)
        if "infer" in sections:
            if "toy" in models:
                run("inference", f"inference: toy pipeline, {attention}", section_inference_toy, args, attention)
            if "sd15" in models:
                run("inference", f"inference: SD-1.5 UNet, {attention}", section_inference_unet, "sd15", args,
                    attention)
    if "files" in sections:
        for model in models:
            run("files", f"files: {model}", section_files, model, args)
    results["load_average_end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    table = markdown(results)
    results["markdown"] = table
    print(table)
    for e in results["errors"]:
        print(f"\nFAILED section {e['section']}: {e['error'].strip().splitlines()[-1]}")
    print(f"\n({results['seconds']:.0f} s)")
    path = Path(args.json) if args.json else RESULTS / f"speed-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
