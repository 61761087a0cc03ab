"""Pretrain the embedded toy text-to-image base model from scratch on the procedural world.

Stages (run in order; each resumes from its own checkpoint in ``--work_dir``):

  python -m superlora_diffusers.toy.pretrain vae    --work_dir out/pretrain      # AutoencoderKL
  python -m superlora_diffusers.toy.pretrain unet   --work_dir out/pretrain      # UNet + CLIP text encoder
  python -m superlora_diffusers.toy.pretrain export --work_dir out/pretrain      # diffusers folder
  python -m superlora_diffusers.toy.pretrain export_vae --work_dir out/refine    # swap in a refined decoder

``--device`` (default: cuda if available) picks where the VAE and UNet stages run; on CUDA they
use TF32 and bf16 autocast (``--no_amp`` turns that off).  ``--vae_minutes`` / ``--unet_minutes``
give a stage a fixed length in wall-clock minutes: the cosine LR schedule follows elapsed time
(or steps, whichever is further along) and the stage ends when the time is up.  Data renders use
``--workers`` processes (the result does not depend on their number).

Checkpoints (model + optimizer + LR scheduler + step + RNG states) are written atomically
(``<name>.tmp`` then rename) every ``--save_every`` steps and when the time budget runs out, so a
stopped run (Ctrl-C, kill, reboot) continues exactly where it was when started again with the same
command.  Progress (step, loss, it/s, elapsed) is printed every ``--log_every`` steps.

The UNet and text encoder never see subject renders or the token "sks".

Continuing from an exported folder (`--init_from toy`) refines the shipped model: `vae --decoder_only`
retrains the decoder on a frozen encoder (the latent space, hence the UNet, stays valid), and
`unet --unet_textured_frac F` adds generic two-colour textured objects, captioned without a colour.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import resolve_base_model, world

SIZE = 32
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "assets", "base")


# ----------------------------------------------------------------------------------------------
# model configs
# ----------------------------------------------------------------------------------------------

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=SIZE,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=128,
        attention_head_dim=4, norm_num_groups=16,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=128,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def make_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, algorithm_type="dpmsolver++", solver_order=2,
    )


# ----------------------------------------------------------------------------------------------
# checkpoint helpers
# ----------------------------------------------------------------------------------------------

def _rng_state(np_rng: np.random.Generator | None) -> dict:
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {  # tensors and plain Python values only, so checkpoints load with weights_only=True
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy_global": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "numpy": np_rng.bit_generator.state if np_rng is not None else None,
    }


def _set_rng_state(state: dict, np_rng: np.random.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy_global"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if np_rng is not None and state.get("numpy") is not None:
        np_rng.bit_generator.state = state["numpy"]


def save_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path/state.pt`` atomically: write a temp dir, then rename."""
    tmp = path + ".tmp"
    old = path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(payload, os.path.join(tmp, "state.pt"))
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_ckpt(path: str) -> dict | None:
    for p in (path, path + ".old"):  # .old survives a crash between the two renames
        f = os.path.join(p, "state.pt")
        if os.path.exists(f):
            return torch.load(f, map_location="cpu", weights_only=True)
    return None


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float = 0.1,
          time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * base`` over the steps after warmup, or
    over the time budget (``time_frac``: fraction used) if that is further along."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, max(time_frac, (step - warmup) / max(1, total - warmup)))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _time_frac(elapsed: float, minutes: float) -> float:
    return elapsed / (60 * minutes) if minutes else 0.0


def _stage_done(step: int, total: int, elapsed: float, minutes: float) -> bool:
    return step >= total or (minutes > 0 and elapsed >= 60 * minutes)


def _autocast(args):
    """bf16 autocast on CUDA (unless ``--no_amp``); a no-op elsewhere."""
    on = args.device.startswith("cuda") and not args.no_amp
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


_CHUNK = 2500


def _render_chunk(job: tuple) -> tuple:
    n, seed, kw = job
    return world.make_dataset(n, seed=seed, size=SIZE, **kw)


def render_dataset(n: int, seed: int, workers: int = 1, **kw) -> tuple[np.ndarray, list]:
    """``world.make_dataset`` in chunks of 2,500 renders seeded ``[seed, chunk]``, spread over
    ``workers`` processes; the result is the same for any number of workers."""
    jobs = [(min(_CHUNK, n - i), [seed, k], kw) for k, i in enumerate(range(0, n, _CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


class Progress:
    def __init__(self, start_step: int, elapsed0: float):
        self.t0 = time.time()
        self.elapsed0 = elapsed0
        self.last_t = self.t0
        self.last_step = start_step

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.t0

    def line(self, step: int, **vals) -> str:
        now = time.time()
        ips = (step - self.last_step) / max(1e-9, now - self.last_t)
        self.last_t, self.last_step = now, step
        v = " ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in vals.items())
        return f"step {step} {v} it/s {ips:.2f} elapsed {self.elapsed() / 60:.1f} min"


# ----------------------------------------------------------------------------------------------
# stage 1: VAE
# ----------------------------------------------------------------------------------------------

def train_vae(args) -> None:
    torch.manual_seed(args.seed)
    dev = args.device
    ck_path = os.path.join(args.work_dir, "vae_ckpt")
    imgs, _ = render_dataset(args.vae_data, args.seed + 1, args.workers, textured_frac=args.vae_textured_frac)
    data = world.to_tensor(imgs).to(dev)
    vae = make_vae()
    if args.init_from:
        vae.load_state_dict(_init_component(args.init_from, "vae"))
        with open(os.path.join(resolve_base_model(args.init_from), "vae", "config.json")) as f:
            vae.register_to_config(scaling_factor=json.load(f)["scaling_factor"])
    vae.to(dev)
    # --decoder_only: the encoder (hence the latent space the UNet learned) stays exactly as it is.
    for name, p in vae.named_parameters():
        p.requires_grad_(not args.decoder_only or name.startswith(("decoder.", "post_quant_conv.")))
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.vae_lr, weight_decay=0.0, fused=dev.startswith("cuda"))
    np_rng = np.random.default_rng(args.seed)
    step, elapsed = 0, 0.0
    ck = load_ckpt(ck_path)
    if ck is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        _set_rng_state(ck["rng"], np_rng)
        print(f"[vae] resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    prog = Progress(step, elapsed)
    vae.train()

    def save():
        save_atomic(ck_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                              "elapsed": prog.elapsed(), "rng": _rng_state(np_rng)})

    while not _stage_done(step, args.vae_steps, prog.elapsed(), args.vae_minutes):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_lr, 100, args.vae_steps,
                            time_frac=_time_frac(prog.elapsed(), args.vae_minutes))
        idx = torch.from_numpy(np_rng.integers(0, len(data), args.vae_batch)).to(dev)
        x = data[idx]
        with _autocast(args):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        loss = mse + 0.2 * F.l1_loss(rec, x) + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            psnr = 10 * math.log10(4.0 / mse.item())
            print("[vae] " + prog.line(step, loss=loss.item(), psnr_db=psnr), flush=True)
        if step % args.save_every == 0:
            save()
        if args.max_minutes and prog.elapsed() > args.max_minutes * 60:
            save()
            print("[vae] time budget reached; stopping (run again to resume)", flush=True)
            return
    save()
    # final: measure PSNR on fresh renders and the latent scaling factor
    vae.eval()
    test, _ = world.make_dataset(512, seed=args.seed + 99, size=SIZE)
    xt = world.to_tensor(test).to(dev)
    with torch.no_grad():
        post = vae.encode(xt).latent_dist
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
        z = post.sample()
    psnr = 10 * math.log10(4.0 / F.mse_loss(rec, xt).item())
    scale = vae.config.scaling_factor if args.decoder_only else float(1.0 / z.flatten().std())
    vae.register_to_config(scaling_factor=scale)
    out = os.path.join(args.work_dir, "vae")
    vae.to("cpu").save_pretrained(out)
    with open(os.path.join(args.work_dir, "vae_report.json"), "w") as f:
        json.dump({"psnr_db": psnr, "scaling_factor": scale, "steps": step, "minutes": prog.elapsed() / 60,
                   "batch": args.vae_batch, "device": _device_name(dev), "init_from": args.init_from,
                   "decoder_only": args.decoder_only, "textured_frac": args.vae_textured_frac,
                   "command": " ".join(["python -m superlora_diffusers.toy.pretrain"] + sys.argv[1:])}, f)
    print(f"[vae] done: {step} steps, test PSNR {psnr:.2f} dB, scaling_factor {scale:.4f}, saved {out}", flush=True)


# ----------------------------------------------------------------------------------------------
# stage 2: UNet + text encoder
# ----------------------------------------------------------------------------------------------

def _init_component(folder: str, name: str) -> dict[str, torch.Tensor]:
    """fp32 weights of one component of an exported base folder ("toy" = the shipped one), to continue from."""
    from safetensors.torch import load_file

    path = os.path.join(resolve_base_model(folder), name, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(path), "model.safetensors")
    return {k: v.float() for k, v in load_file(path).items()}


def _load_tokenizer(work_dir: str):
    from transformers import CLIPTokenizer

    tdir = os.path.join(work_dir, "tokenizer")
    if not os.path.exists(os.path.join(tdir, "tokenizer_config.json")):
        from .tokenizer import save_clip_tokenizer

        save_clip_tokenizer(tdir)
    return CLIPTokenizer.from_pretrained(tdir)


def _encode_dataset(args, vae) -> tuple[torch.Tensor, torch.Tensor, list]:
    cache = os.path.join(args.work_dir, f"latents_{args.unet_data}_{args.seed}_{args.unet_textured_frac:g}.pt")
    if os.path.exists(cache):
        d = torch.load(cache, map_location="cpu", weights_only=True)
        return d["mean"], d["std"], d["scenes"]
    imgs, scenes = render_dataset(args.unet_data, args.seed + 2, args.workers, textured_frac=args.unet_textured_frac)
    dev = next(vae.parameters()).device
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 500):
            post = vae.encode(world.to_tensor(imgs[i : i + 500]).to(dev)).latent_dist
            means.append(post.mean.half().cpu())
            stds.append(post.std.half().cpu())
    d = {"mean": torch.cat(means), "std": torch.cat(stds), "scenes": [(s.shape, s.color, s.background) for s in scenes]}
    torch.save(d, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return d["mean"], d["std"], d["scenes"]


class _CaptionCache:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids[0]
            out.append(self.cache[c])
        return torch.stack(out)


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def train_unet(args) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    dev = args.device
    vae = AutoencoderKL.from_pretrained(os.path.join(args.work_dir, "vae")).eval().to(dev)
    scale = vae.config.scaling_factor
    tokenizer = _load_tokenizer(args.work_dir)
    means, stds, scenes = _encode_dataset(args, vae)
    means, stds = means.to(dev), stds.to(dev)
    del vae
    captions = _CaptionCache(tokenizer)
    unet, te = make_unet(), make_text_encoder()
    if args.init_from:
        unet.load_state_dict(_init_component(args.init_from, "unet"))
        te.load_state_dict(_init_component(args.init_from, "text_encoder"))
    unet, te = unet.to(dev), te.to(dev)
    sched = make_train_scheduler()
    ac = sched.alphas_cumprod
    snr_all = (ac / (1 - ac)).to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    emb = te.get_input_embeddings().weight
    decay_params = [p for p in params if p is not emb and p.ndim >= 2]
    other = [p for p in params if p is emb or p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), fused=dev.startswith("cuda"))
    ema = [p.detach().clone() for p in params]
    np_rng = np.random.default_rng(args.seed + 3)
    ck_path = os.path.join(args.work_dir, "unet_ckpt")
    step, elapsed = 0, 0.0
    ck = load_ckpt(ck_path)
    if ck is not None:
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        opt.load_state_dict(ck["opt"])
        for e, v in zip(ema, ck["ema"]):
            e.copy_(v)
        step, elapsed = ck["step"], ck["elapsed"]
        _set_rng_state(ck["rng"], np_rng)
        print(f"[unet] resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    else:
        start = f"continuing from {args.init_from}" if args.init_from else "fresh start"
        print(f"[unet] {start}: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
              f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f}M, data {len(scenes)}", flush=True)
    prog = Progress(step, elapsed)
    unet.train(), te.train()

    def save():
        save_atomic(ck_path, {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                              "ema": ema, "step": step, "elapsed": prog.elapsed(), "rng": _rng_state(np_rng),
                              "args": vars(args), "lr_schedule": {"base": args.lr, "warmup": args.warmup,
                                                                  "total": args.steps, "minutes": args.unet_minutes},
                              "command": " ".join(["python -m superlora_diffusers.toy.pretrain"] + sys.argv[1:]),
                              "device": _device_name(dev)})

    run_loss = None
    while not _stage_done(step, args.steps, prog.elapsed(), args.unet_minutes):
        lr = lr_at(step, args.lr, args.warmup, args.steps, time_frac=_time_frac(prog.elapsed(), args.unet_minutes))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = np_rng.integers(0, len(scenes), args.batch)
        caps = []
        for i in idx:
            shape, color, bg = scenes[i]
            if np_rng.random() < args.caption_dropout:
                caps.append("")
            else:
                sc = world.Scene(shape, color, bg, 0, 0, 0, 0)
                caps.append(world.make_caption(sc, np_rng))
        ids = captions(caps).to(dev)
        ti = torch.from_numpy(idx).to(dev)
        lat = means[ti].float() + stds[ti].float() * torch.randn(args.batch, 4, SIZE // 2, SIZE // 2, device=dev)
        lat = lat * scale
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        noisy = sched.add_noise(lat, noise, t)
        with _autocast(args):
            enc = te(ids)[0]
            pred = unet(noisy, t, enc).sample.float()
        snr = snr_all[t]
        w = torch.clamp(snr, max=args.snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        _ema_update(ema, params, min(args.ema_decay, (1 + step) / (10 + step)))
        # running loss stays on the device: no host sync except when logging
        run_loss = loss.detach().clone() if run_loss is None else run_loss.lerp_(loss.detach(), 0.02)
        if step % args.log_every == 0:
            print("[unet] " + prog.line(step, loss=run_loss.item(), lr=lr), flush=True)
        if step % args.save_every == 0:
            save()
        if args.max_minutes and prog.elapsed() > args.max_minutes * 60:
            save()
            print("[unet] time budget reached; stopping (run again to resume)", flush=True)
            return
    save()
    print(f"[unet] done: {step} steps in {prog.elapsed() / 60:.1f} min", flush=True)


# ----------------------------------------------------------------------------------------------
# stage 3: export a diffusers folder
# ----------------------------------------------------------------------------------------------

def build_pipeline(work_dir: str, use_ema: bool = True):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(os.path.join(work_dir, "vae"))
    unet, te = make_unet(), make_text_encoder()
    ck = load_ckpt(os.path.join(work_dir, "unet_ckpt"))
    if ck is None:
        raise FileNotFoundError(f"no UNet checkpoint in {work_dir}")
    unet.load_state_dict(ck["unet"])
    te.load_state_dict(ck["te"])
    if use_ema:
        params = list(unet.parameters()) + list(te.parameters())
        with torch.no_grad():
            for p, e in zip(params, ck["ema"]):
                p.copy_(e)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=_load_tokenizer(work_dir), unet=unet,
        scheduler=make_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, ck["step"], ck["elapsed"]


def export(args) -> None:
    previous = None
    if args.init_from:  # lineage, read before --out (possibly the same folder) is replaced
        with open(os.path.join(resolve_base_model(args.init_from), "training_info.json")) as f:
            previous = json.load(f)
    pipe, step, elapsed = build_pipeline(args.work_dir, use_ema=not args.no_ema)
    pipe.to(torch.float16)
    out = args.out
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # self-contained: drop anything not needed for loading
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    ck = load_ckpt(os.path.join(args.work_dir, "unet_ckpt"))
    info = {"unet_steps": step, "unet_minutes": round(elapsed / 60, 1), "ema": not args.no_ema,
            "seed": args.seed, "unet_command": ck.get("command"), "unet_device": ck.get("device"),
            "unet_args": ck.get("args")}
    vr = os.path.join(args.work_dir, "vae_report.json")
    if os.path.exists(vr):
        info["vae"] = json.load(open(vr))
    if previous is not None:
        info["continued_from"] = previous
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"[export] wrote {out} ({total / 1e6:.1f} MB) from step {step}", flush=True)


def export_vae(args) -> None:
    """Swap ``work_dir/vae`` (a ``--decoder_only`` refinement) into the exported folder ``--out`` in fp16,
    recording the refinement in its training_info.json; the UNet and text encoder are left untouched."""
    from diffusers import AutoencoderKL

    report_path = os.path.join(args.work_dir, "vae_report.json")
    with open(report_path) as f:
        report = json.load(f)
    if not report.get("decoder_only"):
        raise SystemExit("export_vae only swaps in a --decoder_only VAE (same latent space); use `export` otherwise.")
    vae = AutoencoderKL.from_pretrained(os.path.join(args.work_dir, "vae")).to(torch.float16)
    out = args.out
    tmp = os.path.join(out, "vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    info_path = os.path.join(out, "training_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info.setdefault("refinements", []).append({"stage": "vae decoder (encoder frozen)", **report})
    shutil.rmtree(os.path.join(out, "vae"))
    os.rename(tmp, os.path.join(out, "vae"))
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(info_path + ".tmp", info_path)
    print(f"[export_vae] {out}/vae replaced (decoder refined: test PSNR {report['psnr_db']:.2f} dB)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "export", "export_vae", "all"])
    ap.add_argument("--work_dir", default="out/pretrain")
    ap.add_argument("--out", default=DEFAULT_OUT, help="export folder (default: the shipped assets/base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no_amp", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="render processes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--save_every", type=int, default=200)
    ap.add_argument("--max_minutes", type=float, default=0.0, help="stop (and checkpoint) after this many minutes")
    ap.add_argument("--init_from", default=None,
                    help="continue from an exported base folder's weights ('toy' = the shipped one) instead of random")
    # vae
    ap.add_argument("--vae_steps", type=int, default=1500)
    ap.add_argument("--vae_batch", type=int, default=64)
    ap.add_argument("--vae_lr", type=float, default=1e-3)
    ap.add_argument("--vae_kl", type=float, default=1e-6)
    ap.add_argument("--vae_data", type=int, default=20000)
    ap.add_argument("--vae_minutes", type=float, default=0.0, help="train the VAE this long (LR schedule by time)")
    ap.add_argument("--vae_textured_frac", type=float, default=0.35, help="share of generic textured objects")
    ap.add_argument("--decoder_only", action="store_true",
                    help="train only the decoder (keeps the latent space, so an existing UNet stays valid)")
    # unet
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--snr_gamma", type=float, default=5.0)
    ap.add_argument("--ema_decay", type=float, default=0.998)
    ap.add_argument("--caption_dropout", type=float, default=0.1)
    ap.add_argument("--unet_data", type=int, default=40000)
    ap.add_argument("--unet_minutes", type=float, default=0.0, help="train the UNet this long (LR schedule by time)")
    ap.add_argument("--unet_textured_frac", type=float, default=0.0,
                    help="share of generic textured objects (captioned without a colour) in the UNet data")
    ap.add_argument("--no_ema", action="store_true", help="export the raw weights instead of the EMA")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes
    os.makedirs(args.work_dir, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage in ("unet", "all"):
        train_unet(args)
    if args.stage in ("export", "all"):
        export(args)
    if args.stage == "export_vae":
        export_vae(args)


if __name__ == "__main__":
    main()
