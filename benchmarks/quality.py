"""Quality per parameter: DreamBooth on the embedded toy base model, peft tuners vs SuperLoRA presets.

Every method shares exactly the same data, steps, batch and randomness; only the adapter differs. Peers of
SuperLoRA: peft LoRA / LoKr; peft's shared-vector tuners VeRA, VB-LoRA, UniLoRA and TinyLoRA (sized near 1.5k, 5k,
15k and 40k trainable params on attention + text; Linear layers only, so not with `--targets conv`; one shared
state over the UNet and CLIP); textual inversion alone (`ti`: a zero-initialised delta on the "sks" input
embedding, 128 params); pivotal tuning (`*_ti`: that embedding trained beside the adapter at `--ti_lr`).

    # the whole benchmark (one GPU machine, many runs at once on one GPU; results appended as JSON lines)
    python benchmarks/quality.py run --out out/quality.jsonl --device cuda --workers 14
    # the README demo's recipe for every method (conv targets, CLIP attention, prior preservation)
    python benchmarks/quality.py run --out out/quality-te.jsonl --targets conv --train_text_encoder --prior_weight 1 \
        --steps 1500 --lr_grid 1e-3,3e-3,1e-2
    # a tiny end-to-end check on CPU
    python benchmarks/quality.py run --out /tmp/q.jsonl --device cpu --workers 1 --steps 5 --n_eval 2 \
        --eval_steps 2 --subjects striped_star --methods lora_r4,t3_g12_r5 --lr_grid 3e-3
    # the same jobs through the shipped trainer, train(TrainingConfig) (issue 23; equal figures with equal draws:
    # benchmarks/loop_agreement.py; the committed results are still the own loop's)
    python benchmarks/quality.py run --out /tmp/q-trainer.jsonl --device cpu --workers 1 --targets conv \
        --train_text_encoder --prior_weight 1 --steps 1500 --seeds 1 --lr_grid 3e-3 --methods lora_r1 --loop trainer
    # table (markdown) + plot (docs/quality.png) from the JSON lines
    python benchmarks/quality.py report benchmarks/results/quality.jsonl

Protocol (one run = one method, one subject, one seed, one learning rate):
- data: 5 instance images `world.render_subject(subject, 5, seed=0)` with "a photo of sks <class>";
  24 prior images generated once per subject by the base model from "a photo of a <class>" (20 DPM-Solver++
  steps, guidance 5, fixed seeds); VAE posteriors (mean, std) and the frozen CLIP embeddings are computed once.
- training: 400 steps, batch 4 instance latents (+ 4 prior latents when --prior_weight > 0), epsilon MSE, AdamW
  (weight decay 1e-2), constant learning rate, gradient clipping 1.0, fp32 (+TF32 on CUDA). All randomness
  (which images, latent sampling, noise, timesteps) comes from one CPU generator seeded by the run's seed, and
  the adapter's initialisation from `torch.manual_seed(seed)`. Text encoder frozen, except the SuperLoRA
  "unet+text" variant, where the shared SuperLoRA also adapts CLIP's attention and CLIP runs every step, and
  with `--train_text_encoder`, where every method (peft LoRA/LoKr on q/k/v/out_proj too) does so, and with
  textual inversion (its embedding delta needs CLIP every step).
- prior preservation: the default weight is 0. On this toy base model "a photo of sks star" and
  "a photo of a star" give CLIP states that differ by ~6% of their norm (vs ~35% between two shapes), and with
  the prior loss at weight 1 (or 0.25) no adapter moved the judge's subject fidelity off the base model's level
  within 1,000 steps (CPU diagnostics, LoRA r8 at lr 3e-3), while without it the subject's stripes appear.
  Prior drift is therefore measured, not trained against: it shows how much each adapter leaks into the class.
- learning rate: every method tries `--lr_grid` (default `LR_GRID`) on the first subject with a separate
  search seed (100); the value with the highest subject fidelity is then used for all subjects x seeds 0, 1, 2.
- evaluation (adapter active, DPM-Solver++ over the same modules, guidance 5, fixed generator seeds that
  are the same for every run): n images each of "a photo of sks <class>" (judge subject accuracy and subject
  fidelity), "a photo of sks <class> on a <bg> background" cycling over the world's 4 backgrounds (background
  accuracy) and "a photo of a <class>" (shape accuracy; its drift is measured against the base model's
  score on the same prompts and seeds).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # --train_text_encoder: CLIP attention, every method
# --targets conv: the same layers as SuperLoRA's "unet+conv" preset (attention + ResNet conv1/conv2), for peft too
PEFT_CONV_TARGETS = r".*(\.to_q|\.to_k|\.to_v|\.to_out\.0|resnets\.\d+\.conv1|resnets\.\d+\.conv2)"
SUBJECTS = ["striped_star", "checker_square", "polka_circle", "rainbow_heart"]
SEEDS = [0, 1, 2]
SEARCH_SEED = 100
N_PRIOR = 24
BATCH = 4
INSTANCE_SEED = 0

# learning-rate grid (AdamW, constant), the same for every method; each method keeps its best value
LR_GRID = [1e-3, 3e-3, 1e-2]
LR_LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # where a grid is extended when its best is at an edge


def _s(family: str, **cfg) -> dict:
    return {"kind": "superlora", "family": family, "config": cfg}


# peft tuners whose trainable state is shared across layers: kind -> (config class, family)
PEFT_SHARED = {"vera": ("VeraConfig", "peft VeRA"), "vblora": ("VBLoRAConfig", "peft VB-LoRA"),
               "unilora": ("UniLoraConfig", "peft UniLoRA"), "tinylora": ("TinyLoraConfig", "peft TinyLoRA")}
TI_TOKEN = "sks"
TI_LR = 5e-3  # --ti_lr default: the "sks" embedding's rate in pivotal tuning


def _peft(kind: str, **cfg) -> dict:
    return {"kind": kind, "family": PEFT_SHARED[kind][1], "config": cfg}


# name -> method. Order = priority (what runs first if the machine's time runs out).
METHODS: dict[str, dict] = {
    "lora_r4": {"kind": "lora", "family": "peft LoRA", "r": 4},
    "t3_g12_r5": _s("SuperLoRA Tucker", factorization="tucker", fold=3, groups=12, rank=5),
    "lora_r1": {"kind": "lora", "family": "peft LoRA", "r": 1},
    "t3_g1_r4": _s("SuperLoRA Tucker", factorization="tucker", fold=3, groups=1, rank=4),
    "t5_g1_r1": _s("SuperLoRA Tucker", factorization="tucker", fold=5, groups=1, rank=1),
    "d2_g1_r4": _s("SuperLoRA 2-D reshape", factorization="lora", groups=1, rank=4),
    "kron_g1_r10": _s("SuperLoRA Kronecker", factorization="kronecker", groups=1, rank=10, kron_factor=6),
    "lora_r8": {"kind": "lora", "family": "peft LoRA", "r": 8},
    "lora_r2": {"kind": "lora", "family": "peft LoRA", "r": 2},
    "lokr_r4": {"kind": "lokr", "family": "peft LoKr", "r": 4},
    "t3_g4_r4": _s("SuperLoRA Tucker", factorization="tucker", fold=3, groups=4, rank=4),
    "t4_g12_r5": _s("SuperLoRA Tucker", factorization="tucker", fold=4, groups=12, rank=5),
    "t5_g1_r1_ff001": _s("SuperLoRA Tucker + Fastfood", factorization="tucker", fold=5, groups=1, rank=1,
                         projection="fastfood", projection_ratio=0.01),
    "t3_g1_r8_ff01": _s("SuperLoRA Tucker + Fastfood", factorization="tucker", fold=3, groups=1, rank=8,
                        projection="fastfood", projection_ratio=0.1),
    "t3_g12_r5_shuffle": _s("SuperLoRA Tucker + shuffle", factorization="tucker", fold=3, groups=12, rank=5,
                            shuffle=True),
    "t3_g12_r5_text": _s("SuperLoRA UNet + text", factorization="tucker", fold=3, groups=12, rank=5,
                         target_modules="unet+text"),
    "d2_g1_r1": _s("SuperLoRA 2-D reshape", factorization="lora", groups=1, rank=1),
    "d2_g1_r16": _s("SuperLoRA 2-D reshape", factorization="lora", groups=1, rank=16),
    "d2_g4_r8": _s("SuperLoRA 2-D reshape", factorization="lora", groups=4, rank=8),
    "d2_g4_r16": _s("SuperLoRA 2-D reshape", factorization="lora", groups=4, rank=16),
    "kron_g1_r2": _s("SuperLoRA Kronecker", factorization="kronecker", groups=1, rank=2, kron_factor=6),
    # group-wise without reshape (issue 21): each shape's weights, Tucker along (layer, d_out, d_in)
    "ax_r1": _s("SuperLoRA Tucker axes", factorization="tucker", fold=3, groups="shape", rank=1),
    "ax_r2": _s("SuperLoRA Tucker axes", factorization="tucker", fold=3, groups="shape", rank=2),
    "ax_r4": _s("SuperLoRA Tucker axes", factorization="tucker", fold=3, groups="shape", rank=4),
    "ax_r8": _s("SuperLoRA Tucker axes", factorization="tucker", fold=3, groups="shape", rank=8),
    "ax_r1_ti": {**_s("SuperLoRA Tucker axes + TI", factorization="tucker", fold=3, groups="shape", rank=1), "ti": True},
    "ax_r2_ti": {**_s("SuperLoRA Tucker axes + TI", factorization="tucker", fold=3, groups="shape", rank=2), "ti": True},
    "ax_r8_ti": {**_s("SuperLoRA Tucker axes + TI", factorization="tucker", fold=3, groups="shape", rank=8), "ti": True},
    "t3_g1_r4_ti": {**_s("SuperLoRA Tucker + TI", factorization="tucker", fold=3, groups=1, rank=4), "ti": True},
    # the control at the recipe's own size: the cube fold G=12 (12,840) with the same embedding
    "t3_g12_r5_ti": {**_s("SuperLoRA Tucker + TI", factorization="tucker", fold=3, groups=12, rank=5), "ti": True},
    # textual inversion alone: the "sks" input embedding (128 params; ignores --targets/--train_text_encoder), and
    # pivotal tuning ("ti": the same embedding trained beside the adapter, at --ti_lr)
    "ti": {"kind": "ti", "family": "textual inversion"},
    "lora_r1_ti": {"kind": "lora", "family": "peft LoRA + TI", "r": 1, "ti": True},
    "lora_r4_ti": {"kind": "lora", "family": "peft LoRA + TI", "r": 4, "ti": True},
    # peft's shared-vector tuners (Linear layers only), sized on attention + text (92 layers: sum d_out 7,936,
    # sum d_in + d_out 16,832). VeRA: lambda_b (d_out) + lambda_d (r) per layer, >= 8,028 (r=1): no 1.5k/5k.
    "vera_15k": _peft("vera", r=77),  # 7,936 + 92 x 77 = 15,020
    "vera_40k": _peft("vera", r=349),  # 40,044
    # VB-LoRA: one bank (n x 32) + per layer r x n logits per 32-slice of d_in and d_out: n x (32 + r x 16,832 / 32)
    "vblora_1k5": _peft("vblora", r=1, num_vectors=3, vector_length=32),  # 1,674
    "vblora_5k": _peft("vblora", r=1, num_vectors=9, vector_length=32),  # 5,022
    "vblora_15k": _peft("vblora", r=1, num_vectors=27, vector_length=32),  # 15,066
    "vblora_40k": _peft("vblora", r=1, num_vectors=72, vector_length=32),  # 40,176
    # UniLoRA: one vector theta_d; each entry of a rank-4 LoRA (67,328 in all) is a scaled entry of it
    "unilora_1k5": _peft("unilora", theta_d_length=1500),
    "unilora_5k": _peft("unilora", theta_d_length=5000),
    "unilora_15k": _peft("unilora", theta_d_length=15000),
    "unilora_40k": _peft("unilora", theta_d_length=40000),
    # TinyLoRA: v (u) -> R = sum_i v_i P_i (r x r) in each layer's top-r SVD basis; r^2 x layers per v >= u, so no
    # entry of v is redundant. One v for all 92 layers (weight_tying 1) while the frozen P (u x r^2 per layer, saved
    # by default) stays small: 14 MB at 1.5k, 118 MB at 5k, 0.9 GB at 15k; so 15k and 40k have one v per layer.
    "tinylora_1k5": _peft("tinylora", r=5, u=1500, weight_tying=1.0),
    "tinylora_5k": _peft("tinylora", r=8, u=5000, weight_tying=1.0),
    "tinylora_15k": _peft("tinylora", r=13, u=163, weight_tying=0.0),  # 92 x 163 = 14,996
    "tinylora_40k": _peft("tinylora", r=21, u=435, weight_tying=0.0),  # 40,020
}


# ----------------------------------------------------------------------------------------------------------
# worker side: models are loaded once per process, each run works on fresh copies of the UNet / text encoder
# ----------------------------------------------------------------------------------------------------------
W: dict = {}


def init_worker(device: str, work_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as tlogging

    from superlora_diffusers.toy import resolve_base_model

    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    path = resolve_base_model("toy")
    W["device"] = torch.device(device)
    W["path"] = path
    W["work_dir"] = work_dir
    W["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    W["te"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32).to(device)
    W["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).to(device)
    W["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32).to(device)
    for m in (W["te"], W["vae"], W["unet"]):
        m.requires_grad_(False)
        m.eval()
    W["noise"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    data_file = Path(work_dir) / "data.pt"
    W["data"] = torch.load(data_file) if data_file.exists() else None


def make_pipeline(unet, te):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=W["vae"], text_encoder=te, tokenizer=W["tokenizer"], unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(W["noise"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(te, prompts: list[str]) -> torch.Tensor:
    tok = W["tokenizer"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(W["device"])
    return te(ids)[0]


@torch.no_grad()
def latent_stats(images) -> torch.Tensor:
    """(n, 2[mean/std], C, h, w) VAE posteriors of PIL images."""
    from superlora_diffusers.toy import world

    x = world.to_tensor(__import__("numpy").stack([__import__("numpy").asarray(im.convert("RGB")) for im in images]))
    dist = W["vae"].encode(x.to(W["device"])).latent_dist
    return torch.stack([dist.mean, dist.std], 1).float()


def eval_prompts(subject: str, n: int) -> tuple[list[str], list[str], dict]:
    from superlora_diffusers.toy import world

    shape = world.SUBJECTS[subject].shape
    bgs = [world.BACKGROUND_NAMES[i % len(world.BACKGROUND_NAMES)] for i in range(n)]
    prompts = ([f"a photo of sks {shape}"] * n + [f"a photo of sks {shape} on a {bg} background" for bg in bgs]
               + [f"a photo of a {shape}"] * n)
    return prompts, bgs, {"shape": shape}


@torch.no_grad()
def evaluate(unet, te, subject: str, n: int, steps: int, chunk: int = 96) -> dict:
    """Judge scores with the adapter active; the same prompts and generator seeds for every run."""
    from superlora_diffusers.evaluate import judge_scores

    pipe = make_pipeline(unet, te)
    prompts, bgs, info = eval_prompts(subject, n)
    images = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        gens = [torch.Generator("cpu").manual_seed(7_000 + start + i) for i in range(len(part))]
        out = pipe(part, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="pt").images
        images.append(out.float().cpu())
    images = torch.cat(images)
    if W.get("grid_path"):  # debugging aid: the evaluated images as one PNG, one prompt type per row
        from PIL import Image

        grid = (images.clamp(0, 1) * 255).round().byte().view(3, n, 3, *images.shape[2:])
        grid = grid.permute(0, 3, 1, 4, 2).reshape(3 * images.shape[2], n * images.shape[3], 3)
        Image.fromarray(grid.numpy()).resize((n * 64, 3 * 64), 0).save(W["grid_path"])
    subj, rectx, prior = images[:n], images[n:2 * n], images[2 * n:]
    return judge_scores(subj, rectx, bgs, prior, subject, value_range=(0, 1))


Built = tuple[list[torch.nn.Parameter], Callable[[], int], bool]  # trainable params, file bytes, text encoder trains


def add_adapter(method: str, unet, te, seed: int, targets: str = "attention", text: bool = False):
    """Inject the method's adapter on the attention projections (or, `targets="conv"`, also the ResNet convs;
    `text`: also CLIP's attention, for every method); returns (trainable params, textual-inversion params,
    file-bytes function, whether the text encoder trains). The TI params (pivotal tuning: a spec's "ti") get their
    own learning rate; for the method `ti` the embedding is the method's own parameter, at the searched rate."""
    spec = METHODS[method]
    if msg := unsupported(method, targets):
        raise ValueError(msg)
    torch.manual_seed(seed)
    if spec["kind"] == "ti":
        delta, file_bytes = add_token_delta(te)
        return [delta], [], file_bytes, True
    builders = {"lora": _add_peft_lora, "lokr": _add_peft_lora, "superlora": _add_superlora}
    build = builders.get(spec["kind"], _add_peft_shared)
    params, file_bytes, train_text = build(spec, unet, te, targets, text)
    if not spec.get("ti"):
        return params, [], file_bytes, train_text
    if spec["kind"] == "superlora":  # the shipped pivotal tuning: the offsets are the module's `tokens.delta`
        from superlora_diffusers.components import find_generators

        delta = find_generators({"unet": unet})["default"].tokens.delta
        return [p for p in params if p is not delta], [delta], file_bytes, True
    delta, ti_bytes = add_token_delta(te)  # after the adapter and zero: the adapter's random draws are unchanged
    return params, [delta], lambda: file_bytes() + ti_bytes(), True


def unsupported(method: str, targets: str) -> str | None:
    """Why `method` cannot run on `targets` (peft's shared-vector tuners adapt Linear layers only), else None."""
    if targets == "conv" and METHODS.get(method, {}).get("kind") in PEFT_SHARED:
        return f"{method} supports Linear layers only; run it with --targets attention"
    return None


def _add_peft_lora(spec: dict, unet, te, targets: str, text: bool) -> Built:
    """peft LoRA / LoKr: one `inject_adapter_in_model` per model (no state shared between layers)."""
    import safetensors.torch
    from peft import LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    r = spec["r"]
    peft_targets = PEFT_CONV_TARGETS if targets == "conv" else UNET_TARGETS
    if spec["kind"] == "lora":
        cfg = LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=peft_targets)
    else:
        cfg = LoKrConfig(r=r, alpha=r, target_modules=peft_targets)
    inject_adapter_in_model(cfg, unet)
    models = {"unet": unet}
    if text:
        inject_adapter_in_model(dataclasses.replace(cfg, target_modules=CLIP_TARGETS), te)
        models["text_encoder"] = te
    params = [p for m in models.values() for n, p in m.named_parameters() if ("lora_" in n or "lokr_" in n)]
    for p in params:
        p.requires_grad_(True)

    def file_bytes() -> int:
        sd = {f"{name}.{k}": v.detach().float().cpu().contiguous()
              for name, m in models.items() for k, v in get_peft_model_state_dict(m).items()}
        return len(safetensors.torch.save(sd))
    return params, file_bytes, text


def _add_peft_shared(spec: dict, unet, te, targets: str, text: bool) -> Built:
    """VeRA / VB-LoRA / UniLoRA / TinyLoRA keep their shared vector, bank or projections on the tuner, which
    `inject_adapter_in_model` refuses: `get_peft_model` on one container of the UNet (and the text encoder) adapts
    both in place around ONE shared state, as SuperLoRA's "+text" shares one module. `parameters()` yields a tensor
    that many layers reference once."""
    import peft
    import safetensors.torch

    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": te} if text else {"unet": unet})
    config_cls = getattr(peft, PEFT_SHARED[spec["kind"]][0])
    config = config_cls(target_modules=UNET_TARGETS + (CLIP_TARGETS if text else []), **spec["config"])
    peft_model = peft.get_peft_model(models, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def file_bytes() -> int:  # peft's defaults: VeRA/TinyLoRA save their projections, UniLoRA not its indices
        sd = peft.get_peft_model_state_dict(peft_model)
        return len(safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}))
    return params, file_bytes, text


def add_token_delta(te) -> tuple[torch.nn.Parameter, Callable[[], int]]:
    """Textual inversion of TI_TOKEN as a trainable delta on its input embedding, added by a forward hook where the
    ids are that token: the embedding table stays frozen, and the zero start draws no random number and leaves the
    base model's outputs unchanged."""
    import safetensors.torch

    ids = W["tokenizer"](TI_TOKEN, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{TI_TOKEN!r} is {len(ids)} tokens; textual inversion here needs one")
    emb = te.get_input_embeddings()
    delta = torch.nn.Parameter(torch.zeros(emb.embedding_dim, device=emb.weight.device))
    emb.register_forward_hook(lambda module, args, out: out + (args[0] == ids[0]).unsqueeze(-1) * delta)

    def file_bytes() -> int:
        return len(safetensors.torch.save({TI_TOKEN: delta.detach().cpu().contiguous()}))
    return delta, file_bytes


def _add_superlora(spec: dict, unet, te, targets: str, text: bool) -> Built:
    """One SuperLoRA module over every target of the UNet (and, "+text", CLIP's attention)."""
    from superlora_diffusers import SuperLoRAConfig
    from superlora_diffusers import inject_superlora
    from superlora_diffusers.serialization import serialize

    kwargs = dict(spec["config"])
    if targets == "conv" and kwargs.get("target_modules", "unet") == "unet":
        kwargs["target_modules"] = "unet+conv"
    if text and "text" not in kwargs.get("target_modules", "unet"):
        kwargs["target_modules"] = kwargs.get("target_modules", "unet") + "+text"
    if spec.get("ti"):  # pivotal tuning as the trainer's --train_text_encoder_ti does it
        kwargs.update(token=TI_TOKEN, token_ids=W["tokenizer"](TI_TOKEN, add_special_tokens=False).input_ids,
                      token_dim=te.get_input_embeddings().embedding_dim)
    config = SuperLoRAConfig(**kwargs)  # built once, validated with its final targets
    components = {"unet": unet, "text_encoder": te}
    module = inject_superlora(components, config)
    params = [p for p in module.parameters() if p.requires_grad]

    def file_bytes() -> int:
        return len(serialize(module, module.targets))
    return params, file_bytes, "text" in config.target_modules


def run_job(job: dict) -> dict:
    if job.get("loop") == "trainer" and job["method"] != "base":
        return run_job_with_trainer(job)
    t0 = time.time()
    dev = W["device"]
    method, subject, seed, lr = job["method"], job["subject"], job["seed"], job["lr"]
    unet = copy.deepcopy(W["unet"])
    te = copy.deepcopy(W["te"])
    out = dict(job)
    if method == "base":
        out.update(evaluate(unet, te, subject, job["n_eval"], job["eval_steps"]))
        out.update(params=0, file_bytes=0, seconds=round(time.time() - t0, 2))
        return out
    from superlora_diffusers.toy import world

    data = W["data"][subject]
    inst, prior = data["inst"].to(dev), data["prior"].to(dev)
    shape = world.SUBJECTS[subject].shape
    params, ti_params, file_bytes, train_text = add_adapter(method, unet, te, seed, job.get("targets", "attention"),
                                                            job.get("text", False))
    steps = job["steps"]
    scaling = W["vae"].config.scaling_factor
    sched = W["noise"]
    # every random number of the run, drawn up front from one CPU generator (identical for every method)
    g = torch.Generator("cpu").manual_seed(seed)
    ii = torch.randint(0, inst.shape[0], (steps, BATCH), generator=g)
    pi = torch.randint(0, prior.shape[0], (steps, BATCH), generator=g)
    eps_lat = torch.randn((steps, 2 * BATCH) + tuple(inst.shape[2:]), generator=g)
    noise = torch.randn((steps, 2 * BATCH) + tuple(inst.shape[2:]), generator=g)
    tsteps = torch.randint(0, sched.config.num_train_timesteps, (steps, 2 * BATCH), generator=g)
    ii, pi, eps_lat, noise, tsteps = (x.to(dev) for x in (ii, pi, eps_lat, noise, tsteps))
    alphas = sched.alphas_cumprod.to(dev)
    prompts = [f"a photo of sks {shape}"] * BATCH + [f"a photo of a {shape}"] * BATCH
    pw = job["prior_weight"]
    rows = 2 * BATCH if pw > 0 else BATCH  # without prior preservation only the instance half is used
    prompts = prompts[:rows]
    with torch.no_grad():
        fixed = encode(te, prompts)
    groups = [{"params": params, "lr": lr}] + ([{"params": ti_params, "lr": job["ti_lr"]}] if ti_params else [])
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    trainable = params + ti_params  # clipped together, counted together
    unet.train()
    if train_text:
        te.train()
    losses = []
    for step in range(steps):
        stats = torch.cat([inst[ii[step]], prior[pi[step]]])[:rows]
        lat = (stats[:, 0] + stats[:, 1] * eps_lat[step, :rows]) * scaling
        t = tsteps[step, :rows]
        a = alphas[t].view(-1, 1, 1, 1)
        eps = noise[step, :rows]
        noisy = a.sqrt() * lat + (1 - a).sqrt() * eps
        hidden = encode(te, prompts) if train_text else fixed
        pred = unet(noisy, t, hidden).sample
        per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = per[:BATCH].mean() + (pw * per[BATCH:].mean() if pw > 0 else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            losses.append(loss.detach())
        if job.get("eval_every") and (step + 1) % job["eval_every"] == 0 and step + 1 < steps:
            unet.eval()
            te.eval()
            ev = evaluate(unet, te, subject, job["n_eval"], job["eval_steps"])
            out.setdefault("curve", []).append(dict(step=step + 1, **{k: round(v, 4) for k, v in ev.items()}))
            print(job["method"], job["lr"], out["curve"][-1], flush=True)
            unet.train()
            if train_text:
                te.train()
    losses = [round(float(x), 5) for x in losses]
    train_s = time.time() - t0
    unet.eval()
    te.eval()
    finite = all(math.isfinite(x) for x in losses)
    if finite:
        out.update(evaluate(unet, te, subject, job["n_eval"], job["eval_steps"]))
    out.update(params=sum(p.numel() for p in trainable), file_bytes=file_bytes(), final_loss=losses[-1],
               loss_curve=losses, finite=finite, train_seconds=round(train_s, 2),
               seconds=round(time.time() - t0, 2), family=METHODS[method]["family"])
    if job.get("save_deltas"):  # the trained ΔW, dense, for benchmarks/expressivity.py
        import safetensors.torch

        path = Path(job["save_deltas"]) / f"{method}-{subject}-s{seed}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(trained_deltas(unet, te), str(path))
        out["deltas_file"] = str(path)
    return out


def training_config(job: dict, work_dir: Path):
    """The shipped trainer's `TrainingConfig` for a benchmark job: the same images, prompts, steps, batch, rate,
    prior weight and layers as `run_job`; its own per-step random draws (so a run matches the old loop's
    figures within seed noise, not draw for draw)."""
    from superlora_diffusers.toy import world
    from superlora_diffusers.training import TrainingConfig

    spec, shape = METHODS[job["method"]], world.SUBJECTS[job["subject"]].shape
    images = work_dir / "images" / job["subject"]
    cfg = dict(pretrained_model_name_or_path="toy", instance_data_dir=str(images / "instance"),
               instance_prompt=f"a photo of sks {shape}", max_train_steps=job["steps"], learning_rate=job["lr"],
               train_batch_size=BATCH, seed=job["seed"], train_text_encoder=job.get("text", False),
               target_modules="unet+conv" if job.get("targets") == "conv" else "unet", checkpointing_steps=job["steps"],
               num_validation_images=1, num_inference_steps=2, report_to="none", adam_weight_decay=1e-2,
               output_dir=str(work_dir / "runs" / f"{job['method']}-{job['subject']}-s{job['seed']}-lr{job['lr']:g}"),
               overwrite_output_dir=True)
    if job["prior_weight"] > 0:
        cfg.update(with_prior_preservation=True, class_prompt=f"a photo of a {shape}", class_data_dir=str(images / "class"),
                   num_class_images=N_PRIOR, prior_loss_weight=job["prior_weight"])
    if spec["kind"] == "superlora":
        own = dict(spec["config"])
        targets = own.pop("target_modules", None)
        if targets:
            cfg["target_modules"] = targets + ("+conv" if job.get("targets") == "conv" and "conv" not in targets else "")
        cfg.update({k: (str(v) if k == "groups" else v) for k, v in own.items()})
    elif spec["kind"] in ("lora", "lokr"):
        cfg.update(adapter=spec["kind"], rank=spec["r"])
    elif spec["kind"] in PEFT_SHARED:
        cfg.update(adapter=spec["kind"], peft_kwargs=json.dumps(spec["config"]))
    else:
        raise ValueError(f"{job['method']}: the shipped trainer has no {spec['kind']!r} adapter")
    if spec.get("ti"):
        if spec["kind"] != "superlora":
            raise ValueError(f"{job['method']}: the shipped trainer trains the embedding beside a SuperLoRA only")
        cfg.update(train_text_encoder_ti=True, text_encoder_lr=job["ti_lr"])
    return TrainingConfig(**cfg)


def run_job_with_trainer(job: dict) -> dict:
    """One job through the shipped trainer (`train(config)`), then the same judge on the saved adapter."""
    from superlora_diffusers.training import train

    t0 = time.time()
    work_dir = Path(W["work_dir"])
    config = training_config(job, work_dir)
    weights = train(config)
    unet, te = copy.deepcopy(W["unet"]), copy.deepcopy(W["te"])
    pipe = make_pipeline(unet, te)
    if config.adapter == "superlora":
        pipe.load_superlora_weights(str(weights.parent))
    elif config.adapter == "lora":
        pipe.load_lora_weights(str(weights.parent))
    else:
        from peft import PeftModel

        models = {"unet": unet} | ({"text_encoder": te} if config.train_text_encoder else {})
        PeftModel.from_pretrained(torch.nn.ModuleDict(models), str(weights.parent))
    train_s = time.time() - t0
    out = dict(job)
    out.update(evaluate(unet, te, job["subject"], job["n_eval"], job["eval_steps"]))
    # the trainable-parameter count of the same adapter built by `add_adapter` (whose counts are tested)
    params, ti_params, _, _ = add_adapter(job["method"], copy.deepcopy(W["unet"]), copy.deepcopy(W["te"]), job["seed"],
                                          job.get("targets", "attention"), job.get("text", False))
    out.update(params=sum(p.numel() for p in params + ti_params), file_bytes=weights.stat().st_size,
               train_seconds=round(train_s, 2), seconds=round(time.time() - t0, 2), loop="trainer",
               family=METHODS[job["method"]]["family"])
    return out


@torch.no_grad()
def trained_deltas(unet, te) -> dict[str, torch.Tensor]:
    """Every adapted weight's ΔW as a (d_out, d_in·k·k) matrix, named as SuperLoRA names its targets
    ("unet.<path>", "text_encoder.<path>"): peft LoRA / LoKr layers, or the one injected SuperLoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from superlora_diffusers.components import find_generators

    components = {"unet": unet, "text_encoder": te}
    generator = find_generators(components).get("default")
    if generator is not None:
        return {n: d.detach().float().cpu().contiguous() for n, d in zip(generator.targets, generator())}
    out = {}
    for component, module in components.items():
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer) and hasattr(layer, "get_delta_weight"):
                delta = layer.get_delta_weight("default")
                out[f"{component}.{path}"] = delta.reshape(delta.shape[0], -1).float().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------
# main side: data once, then a pool of workers on one device, jobs by priority, JSON lines as they come
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prepare_data(args) -> None:
    from superlora_diffusers.toy import world

    init_worker(args.device, args.work_dir, args.threads)
    pipe = make_pipeline(W["unet"], W["te"])
    data = {}
    for si, subject in enumerate(args.subjects):
        shape = world.SUBJECTS[subject].shape
        inst = world.render_subject(subject, 5, seed=INSTANCE_SEED)
        gens = [torch.Generator("cpu").manual_seed(50_000 + 100 * si + i) for i in range(N_PRIOR)]
        prior = pipe([f"a photo of a {shape}"] * N_PRIOR, num_inference_steps=20, guidance_scale=5.0,
                     generator=gens).images
        data[subject] = {"inst": latent_stats(inst).cpu(), "prior": latent_stats(prior).cpu()}
        for kind, images in (("instance", inst), ("class", prior)):  # the same images as folders, for --loop trainer
            folder = Path(args.work_dir) / "images" / subject / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / f"{i:03d}.png")
    torch.save(data, Path(args.work_dir) / "data.pt")


def hard_exit(executor, code: int) -> None:
    """Stop now: kill this pool's workers (runs in flight are lost) and exit without waiting for them."""
    for proc in list(getattr(executor, "_processes", {}).values()):
        proc.kill()
    os._exit(code)


def job_key(j: dict) -> tuple:
    key = (j["method"], j["subject"], j["seed"], float(j["lr"]), j["phase"], j.get("targets", "attention"),
           j.get("text", False), j["steps"], j["prior_weight"])
    key += (float(j["ti_lr"]),) if "ti_lr" in j else ()  # pivotal tuning's embedding rate
    return key + ((j["loop"],) if "loop" in j else ())  # rows of the shipped trainer (--loop trainer)


def run(args) -> None:
    """Base scores, then each method's learning-rate search, then its finals at the chosen rate.

    The search grid is extended by one ladder step (`LR_LADDER`) while the best value sits at its edge, up
    to `--lr_extend` times. Each choice is written as a {"phase": "choice"} line. Runs already in `--out`
    (same method, subject, seed, rate, phase and, for pivotal tuning, --ti_lr) are not run again, so an interrupted
    run resumes.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    t_start = time.time()
    args.subjects = args.subjects.split(",")
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    skipped = [m for m in methods if unsupported(m, args.targets)]
    if skipped and args.methods != "all":  # named: an error before any work; "all": the others run
        raise SystemExit("\n".join(unsupported(m, args.targets) for m in skipped))
    if skipped:
        print(f"skipped on --targets {args.targets} (Linear layers only): {', '.join(skipped)}", flush=True)
    methods = [m for m in methods if m not in skipped]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    previous = [r for r in (load(args.out) if Path(args.out).exists() else []) if "error" not in r]
    have = {job_key(r): r for r in previous if r.get("phase") != "choice"}
    prepare_data(args)
    print(f"[{time.time() - t_start:6.1f}s] data ready for {args.subjects}; {len(have)} earlier runs reused",
          flush=True)
    common = dict(steps=args.steps, n_eval=args.n_eval, eval_steps=args.eval_steps, prior_weight=args.prior_weight,
                  targets=args.targets, text=args.train_text_encoder)
    if args.save_deltas:
        common["save_deltas"] = args.save_deltas
    if args.loop == "trainer":
        common["loop"] = "trainer"
    seeds = SEEDS[:args.seeds]
    prio = {m: i for i, m in enumerate(methods)}
    tried: dict[str, list[float]] = {m: list(args.lr_grid) for m in methods}
    extensions = {m: 0 for m in methods}
    searched: dict[str, dict[float, dict]] = {m: {} for m in methods}
    ready: list[dict] = []

    def own(m: str) -> dict:  # the embedding's rate, in the rows (and keys) of methods with pivotal tuning only
        return {"ti_lr": args.ti_lr} if METHODS.get(m, {}).get("ti") else {}

    def search_job(m: str, lr: float) -> dict:
        return dict(method=m, subject=args.subjects[0], seed=args.search_seed, lr=lr, phase="search", **common,
                    **own(m))

    def finals(m: str, lr: float) -> list[dict]:
        return [dict(method=m, subject=s, seed=sd, lr=lr, phase="final", **common, **own(m))
                for sd in seeds for s in args.subjects]

    def choose(m: str, fout) -> None:
        """All of m's search runs are in: extend the grid at an edge, or pick the rate and queue the finals."""
        ok = {lr: r for lr, r in searched[m].items() if "subject_fidelity" in r}
        if not ok:
            return
        best = max(ok, key=lambda lr: ok[lr]["subject_fidelity"])
        grid = sorted(tried[m])
        step = -1 if best == grid[0] else 1 if best == grid[-1] else 0
        i = min(range(len(LR_LADDER)), key=lambda k: abs(math.log(LR_LADDER[k] / best)))
        if len(grid) > 1 and step and extensions[m] < args.lr_extend and 0 <= i + step < len(LR_LADDER):
            extensions[m] += 1
            lr = LR_LADDER[i + step]
            tried[m].append(lr)
            print(f"    best lr for {m} at the grid's edge ({best:g}); trying {lr:g}", flush=True)
            submit([search_job(m, lr)])
            return
        fout.write(json.dumps({"phase": "choice", "method": m, "lr": best, "tried": sorted(tried[m])}) + "\n")
        fout.flush()
        print(f"    best lr for {m}: {best:g} (tried {sorted(tried[m])})", flush=True)
        submit(finals(m, best))

    def submit(jobs: list[dict]) -> None:
        for j in jobs:
            r = have.get(job_key(j))
            if r is not None:
                record(j, r, reused=True)
            else:
                ready.append(j)

    def record(j: dict, res: dict, reused: bool = False) -> None:
        if j["phase"] == "search":
            searched[j["method"]][float(j["lr"])] = res
            if set(searched[j["method"]]) >= set(tried[j["method"]]):
                choose(j["method"], fout)

    def key(j: dict) -> tuple:  # search first, then finals seed-major, then subject, then method priority
        phase = {"base": 0, "search": 1, "final": 2}[j["phase"]]
        return (phase, j["seed"] if phase == 2 else 0, args.subjects.index(j["subject"]), prio.get(j["method"], -1))

    ctx = mp.get_context("spawn")
    done = ok_runs = 0
    deadline = t_start + args.max_minutes * 60
    with open(args.out, "a") as fout, ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=init_worker,
                                                          initargs=(args.device, args.work_dir, args.threads)) as ex:
        submit([dict(method="base", subject=s, seed=0, lr=0.0, phase="base", **common) for s in args.subjects])
        for m in methods:
            if len(tried[m]) == 1:
                fout.write(json.dumps({"phase": "choice", "method": m, "lr": tried[m][0], "tried": tried[m]}) + "\n")
                submit(finals(m, tried[m][0]))
            else:
                submit([search_job(m, lr) for lr in tried[m]])
        running = {}
        while ready or running:
            ready.sort(key=key)
            while ready and len(running) < args.workers + 2 and time.time() < deadline:
                j = ready.pop(0)
                running[ex.submit(run_job, j)] = j
            if not running:
                break
            finished, _ = wait(list(running), timeout=5, return_when=FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                try:
                    res = f.result()
                except Exception as e:  # noqa: BLE001 - a failed run is recorded, not fatal
                    res = dict(j, error=f"{type(e).__name__}: {e}")
                fout.write(json.dumps(res) + "\n")
                fout.flush()
                done += 1
                ok_runs += "error" not in res
                if done >= 4 and not ok_runs:  # nothing works (e.g. a broken GPU set-up): stop, let the caller retry
                    print(f"the first {done} runs all failed; giving up", flush=True)
                    hard_exit(ex, 3)
                print(f"[{time.time() - t_start:6.1f}s] {done} done, {len(ready) + len(running)} left: "
                      f"{j['phase']:6s} {j['method']:18s} {j['subject']:14s} seed {j['seed']:3d} lr {j['lr']:.0e}  "
                      f"fid {res.get('subject_fidelity', float('nan')):.3f} acc {res.get('subject_acc', float('nan')):.2f}"
                      f"  {res.get('seconds', 0):.1f}s {res.get('error', '')}", flush=True)
                record(j, res)
            if time.time() > deadline:
                print(f"[{time.time() - t_start:6.1f}s] deadline reached: {len(ready)} queued runs dropped, "
                      f"waiting for {len(running)} in flight", flush=True)
                ready.clear()
                if time.time() > deadline + args.grace_s:
                    print("grace period over; leaving the runs in flight", flush=True)
                    fout.flush()
                    hard_exit(ex, 0)
    print(f"[{time.time() - t_start:6.1f}s] all done: {done} runs", flush=True)


# ----------------------------------------------------------------------------------------------------------
# report: table + plot
# ----------------------------------------------------------------------------------------------------------
SCORES = [("subject_acc", "subject acc"), ("subject_fidelity", "subject fidelity"),
          ("fidelity_gain", "fidelity gain vs base"),
          ("recontext_background_acc", "background acc (recontext)"), ("prior_shape_drift", "prior shape-acc drift")]


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarise(rows: list[dict]) -> tuple[dict, dict, dict]:
    import numpy as np

    base = {r["subject"]: r for r in rows if r["method"] == "base" and "subject_fidelity" in r}
    choice = {r["method"]: r["lr"] for r in rows if r.get("phase") == "choice"}  # the last choice counts
    per_method: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("phase") == "final" and "subject_fidelity" in r and r["lr"] == choice.get(r["method"], r["lr"]):
            r = dict(r)
            if r["subject"] in base:
                r["prior_shape_drift"] = r["prior_shape_acc"] - base[r["subject"]]["prior_shape_acc"]
                r["fidelity_gain"] = r["subject_fidelity"] - base[r["subject"]]["subject_fidelity"]
            per_method.setdefault(r["method"], []).append(r)
    stats = {}
    for m, rs in per_method.items():
        st = {"n": len(rs), "params": rs[0]["params"], "file_bytes": rs[0]["file_bytes"], "lr": rs[0]["lr"],
              "ti_lr": rs[0].get("ti_lr"), "family": METHODS.get(m, {}).get("family", rs[0].get("family", m)),
              "subjects": len({r["subject"] for r in rs}), "seeds": len({r["seed"] for r in rs})}
        # per subject, mean over seeds: which subjects a method learns, hidden by the mean over subjects
        st["per_subject"] = {s: tuple(float(np.mean([r[k] for r in rs if r["subject"] == s]))
                                      for k in ("subject_acc", "subject_fidelity"))
                             for s in dict.fromkeys(r["subject"] for r in rs)}
        for k, _ in SCORES + [("prior_shape_acc", "")]:
            vals = np.array([r[k] for r in rs if k in r], dtype=float)
            if len(vals):
                st[k] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
            # seed noise: the std over seeds of the per-seed mean over subjects
            seeds = sorted({r["seed"] for r in rs})
            per_seed = [np.mean([r[k] for r in rs if r["seed"] == s and k in r]) for s in seeds
                        if any(r["seed"] == s and k in r for r in rs)]
            st[k + "_seedstd"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
            st[k + "_seedmeans"] = [float(x) for x in per_seed]
        stats[m] = st
    search = {}
    for r in rows:
        if r.get("phase") == "search":
            search.setdefault(r["method"], []).append((r["lr"], r.get("subject_fidelity")))
    return stats, base, search


def equal_quality(stats: dict, ref: str = "lora_r4") -> dict | None:
    """The smallest SuperLoRA whose mean subject fidelity is within the seed noise of `ref`.

    Seed noise: the larger of the two methods' standard deviations over seeds of the per-seed mean fidelity
    (each mean over the subjects); "within" = mean fidelity >= ref's mean - that noise. Only methods run on
    as many seeds as `ref` qualify: a mean over fewer seeds has no seed noise of its own to be judged by.
    """
    if ref not in stats:
        return None
    r_mean = stats[ref]["subject_fidelity"][0]
    cands = []
    for m, st in stats.items():
        if METHODS.get(m, {}).get("kind") != "superlora" or st["seeds"] < stats[ref]["seeds"]:
            continue
        noise = max(stats[ref]["subject_fidelity_seedstd"], st["subject_fidelity_seedstd"])
        if st["subject_fidelity"][0] >= r_mean - noise:
            cands.append((st["params"], m, noise))
    if not cands:
        return {"method": None, "ref": ref, "ref_fidelity": r_mean}
    params, m, noise = min(cands)
    return {"method": m, "params": params, "ref": ref, "ref_params": stats[ref]["params"],
            "ratio": stats[ref]["params"] / params, "fidelity": stats[m]["subject_fidelity"][0],
            "ref_fidelity": r_mean, "noise": noise}


def report(args) -> None:
    rows = [r for path in args.jsonl.split(",") for r in load(path)]  # several files: their rows together
    if getattr(args, "seeds", None) is not None:  # every method on the same training seeds: a like-for-like table
        rows = [r for r in rows if r.get("phase") != "final" or r["seed"] in args.seeds]
    stats, base, search = summarise(rows)
    # A method run on fewer subjects than the others has a mean over other subjects: listed, not compared.
    n_subjects = max((st["subjects"] for st in stats.values()), default=0)
    partial = {m for m, st in stats.items() if st["subjects"] < n_subjects}
    complete = {m: st for m, st in stats.items() if m not in partial}
    order = sorted(stats, key=lambda m: (stats[m]["family"], stats[m]["params"]))
    lines = ["| method | family | trainable params | LoRA-r4 params / params | file bytes | lr | subjects x seeds | " +
             " | ".join(label for _, label in SCORES) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(SCORES)]

    def cell(st: dict, k: str) -> str:
        if k not in st:
            return "-"
        mean = f"{st[k][0]:+.3f}" if k in ("prior_shape_drift", "fidelity_gain") else f"{st[k][0]:.3f}"
        return mean + (f" ± {st[k + '_seedstd']:.3f}" if st["seeds"] > 1 else "")

    for m in order:
        st = stats[m]
        ratio = f"{stats['lora_r4']['params'] / st['params']:,.1f}x" if "lora_r4" in stats else "-"
        name = f"`{m}`" + (f" (partial: {st['subjects']} of {n_subjects} subjects; not plotted)" if m in partial else "")
        lr = f"{st['lr']:g}" + (f" (TI {st['ti_lr']:g})" if st["ti_lr"] else "")  # pivotal tuning: both rates
        lines.append(f"| {name} | {st['family']} | {st['params']:,} | {ratio} | {st['file_bytes']:,} | {lr} | "
                     f"{st['subjects']} x {st['seeds']} | " + " | ".join(cell(st, k) for k, _ in SCORES) + " |")
    if base:
        b = list(base.values())
        mean = lambda k: sum(r[k] for r in b) / len(b)  # noqa: E731
        lines.append(f"| base model (no adapter) | - | 0 | - | 0 | - | {len(b)} x 1 | {mean('subject_acc'):.3f} | "
                     f"{mean('subject_fidelity'):.3f} | 0 | {mean('recontext_background_acc'):.3f} | "
                     f"(prior shape acc {mean('prior_shape_acc'):.3f}) |")
    subjects = list(dict.fromkeys(s for st in stats.values() for s in st["per_subject"]))
    lines += ["", "Per subject, mean over seeds: subject acc / subject fidelity (base model's fidelity in the header)",
              "", "| method | " + " | ".join(f"{s} ({base[s]['subject_fidelity']:.3f})" if s in base else s
                                           for s in subjects) + " |",
              "|---|" + "---:|" * len(subjects)]
    for m in order:
        cells = [("{:.2f} / {:.3f}".format(*stats[m]["per_subject"][s]) if s in stats[m]["per_subject"] else "-")
                 for s in subjects]
        lines.append(f"| `{m}` ({stats[m]['seeds']} seed{'s' * (stats[m]['seeds'] > 1)}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    eq = equal_quality(complete)
    grid_lines = [f"- `{m}`: " + ", ".join(f"{lr:g} → {f:.3f}" if f is not None else f"{lr:g} → failed"
                                          for lr, f in sorted(v)) for m, v in search.items()]
    text = table + "\n\nLearning-rate search (subject fidelity on the search run):\n\n" + (
        "\n".join(grid_lines) or "- none: every method trained at the one rate of its grid (the lr column)")
    if eq:
        text += "\n\nEqual quality vs LoRA rank 4: " + json.dumps(eq)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    if args.plot:
        plot(complete, base, args.plot)


def plot(stats: dict, base: dict, path: str, ref: str = "lora_r4") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list[str]] = {}
    for m, st in stats.items():
        fams.setdefault(st["family"], []).append(m)
    panels = [("fidelity_gain", "subject fidelity gain vs base model (judge cosine)"), ("subject_acc", "subject accuracy"),
              ("recontext_background_acc", "background accuracy, re-contextualised prompts"),
              ("prior_shape_drift", "prior shape-accuracy drift vs base model")]
    n_seed = max((st["seeds"] for st in stats.values()), default=0)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colors = plt.get_cmap("tab10")
    for ai, (ax, (k, label)) in enumerate(zip(axes.flat, panels)):
        if k in stats.get(ref, {}):  # the reference's mean +- seed noise: the "equal quality" band
            mu, noise = stats[ref][k][0], stats[ref][k + "_seedstd"]
            ax.axhspan(mu - noise, mu + noise, color="black", alpha=0.08, lw=0,
                       label=f"{ref} ± seed std" if ai == 0 else None)
        for fi, (fam, ms) in enumerate(sorted(fams.items(), key=lambda kv: (not kv[0].startswith("peft"), kv[0]))):
            ms = sorted((m for m in ms if k in stats[m]), key=lambda m: stats[m]["params"])
            x = [stats[m]["params"] for m in ms]
            y = [stats[m][k][0] for m in ms]
            e = [stats[m][k + "_seedstd"] for m in ms]
            peft = fam.startswith("peft")
            marker, color = "s" if peft else "o", "black" if fam == "peft LoRA" else colors(fi % 10)
            ax.errorbar(x, y, yerr=e, marker=marker, ms=6, lw=2.4 if peft else 1.4, ls="-" if peft else "--",
                        color=color, capsize=2, label=fam if ai == 0 else None)
            few = [i for i, m in enumerate(ms) if stats[m]["seeds"] < n_seed]  # hollow: fewer seeds, no error bar
            ax.plot([x[i] for i in few], [y[i] for i in few], marker, ms=6, ls="none", mfc="white", mec=color, zorder=3)
            if k in ("fidelity_gain", "prior_shape_drift"):
                for m, xi, yi in zip(ms, x, y):
                    ax.annotate(m, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6.5, alpha=0.8)
        if k in ("prior_shape_drift", "fidelity_gain"):
            ax.axhline(0, color="gray", ls=":", lw=1.2, label="base model (no adapter)" if ai == 0 else None)
        elif base:
            bv = sum(r[k] for r in base.values()) / len(base)
            ax.axhline(bv, color="gray", ls=":", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    n_sub = max((st["subjects"] for st in stats.values()), default=0)
    fig.legend(loc="lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.suptitle(f"DreamBooth on the embedded toy base model: quality vs trainable parameters\n(mean over "
                 f"{n_sub} subjects x {n_seed} seeds; error bars: std over seeds of the per-seed mean; hollow "
                 f"markers: fewer seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True, help="JSON lines, appended as runs finish")
    r.add_argument("--work_dir", default="out/quality")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--workers", type=int, default=14)
    r.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--targets", choices=["attention", "conv"], default="attention",
                   help="conv: every method also adapts the ResNet conv1/conv2 (the toy UNet needs them to learn a "
                        "subject; see the main-job section of docs/benchmarks.md)")
    r.add_argument("--train_text_encoder", action="store_true",
                   help="every method also adapts CLIP's attention (peft LoRA/LoKr on q/k/v/out_proj, SuperLoRA's "
                        "'+text' targets), as the README demo does")
    r.add_argument("--prior_weight", type=float, default=0.0,
                   help="weight of the prior-preservation loss (0: instance images only; see the docstring)")
    r.add_argument("--n_eval", type=int, default=16, help="images per prompt type")
    r.add_argument("--eval_steps", type=int, default=20)
    r.add_argument("--subjects", default=",".join(SUBJECTS))
    r.add_argument("--seeds", type=int, default=3, help="final runs on seeds 0..N-1 (0: the search alone)")
    r.add_argument("--search_seed", type=int, default=SEARCH_SEED,
                   help="training seed of the learning-rate search (0 makes search runs comparable, draw for draw, "
                        "with every method's seed-0 final on the first subject)")
    r.add_argument("--methods", default="all", help="comma-separated names of METHODS, or all")
    r.add_argument("--lr_grid", type=lambda v: [float(x) for x in v.split(",")], default=LR_GRID,
                   help="comma-separated learning rates every method tries first (default %(default)s)")
    r.add_argument("--ti_lr", type=float, default=TI_LR,
                   help="learning rate of the 'sks' embedding in pivotal tuning (methods *_ti; the method ti itself "
                        "uses --lr_grid)")
    r.add_argument("--save_deltas", default=None,
                   help="also save each trained adapter's dense ΔW here (<method>-<subject>-s<seed>.safetensors), "
                        "for benchmarks/expressivity.py")
    r.add_argument("--lr_extend", type=int, default=2, help="extend the grid at most this many times per method")
    r.add_argument("--loop", choices=["own", "trainer"], default="own",
                   help="own: this file's training loop (every committed result); trainer: the shipped trainer, "
                        "train(TrainingConfig) on the same images, prompts, steps and rates (issue 23)")
    r.add_argument("--max_minutes", type=float, default=1e9, help="stop queueing new runs after this")
    r.add_argument("--grace_s", type=float, default=60, help="then wait this long for the runs in flight")
    p = sub.add_parser("report")
    p.add_argument("jsonl", help="a results file, or several comma-separated (methods run into different files)")
    p.add_argument("--plot", default=None, help="also draw the plot to this PNG")
    p.add_argument("--table", default=None, help="also write the markdown table here")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma-separated training seeds to keep (default: all), e.g. 0 to set methods run on "
                        "seed 0 only beside the others' seed-0 runs")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
