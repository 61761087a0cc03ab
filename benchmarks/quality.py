"""Quality per parameter: DreamBooth on the embedded toy base model, peft tuners vs SuperLoRA presets.

Every run is the shipped trainer, `train(TrainingConfig)` (the same code as `train_dreambooth_superlora.py` and
`superlora train`), on the same data, steps, batch and seeds; only the adapter differs. Peers of SuperLoRA: peft
LoRA / LoKr; peft's shared-vector tuners VeRA, VB-LoRA, UniLoRA and TinyLoRA (sized near 1.5k, 5k, 15k and 40k
trainable params on attention + text; Linear layers only, so not with `--targets conv`; one shared state over the
UNet and CLIP); textual inversion alone (`ti`: the "sks" input embedding through peft's TrainableTokens, 128
params); pivotal tuning (`*_ti`: that embedding trained beside the adapter at `--ti_lr`).

    # the whole benchmark (one GPU machine, many runs at once on one GPU; results appended as JSON lines)
    python benchmarks/quality.py run --out out/quality.jsonl --device cuda --workers 14
    # the README demo's recipe for every method (conv targets, CLIP attention, prior preservation)
    python benchmarks/quality.py run --out out/quality-te.jsonl --targets conv --train_text_encoder --prior_weight 1 \
        --steps 1500 --lr_grid 1e-3,3e-3,1e-2
    # a tiny end-to-end check on CPU
    python benchmarks/quality.py run --out /tmp/q.jsonl --device cpu --workers 1 --steps 5 --n_eval 2 \
        --eval_steps 2 --subjects striped_star --methods lora_r4,t3_g12_r5 --lr_grid 3e-3
    # table (markdown) + plot (docs/quality.png) from the JSON lines
    python benchmarks/quality.py report benchmarks/results/quality.jsonl

Protocol (one run = one method, one subject, one seed, one learning rate):
- data: 5 instance images `world.render_subject(subject, 5, seed=0)` with "a photo of sks <class>";
  24 prior images generated per subject by the base model from "a photo of a <class>" (20 DPM-Solver++
  steps, guidance 5, fixed seeds), written as the folders the trainer reads.
- training: `train(config)` with `--max_train_steps --steps`, batch 4 instance images (+ 4 class images with
  prior preservation, `--prior_weight` > 0), epsilon MSE, AdamW (weight decay 1e-2; none on peft's token rows),
  constant learning rate, gradient clipping 1.0, fp32, seed = the run's seed (its batches, noise and timesteps
  come from the trainer's seeded generators, and the adapter's initialisation from `torch.manual_seed(seed)`).
  `--targets conv` adds the ResNet convs (`unet+conv`); `--train_text_encoder` adapts CLIP's attention with every
  method; textual inversion and pivotal tuning run CLIP every step.
- prior preservation: the default weight is 0; the README recipe's runs use 1 (docs/benchmarks.md says why).
- learning rate: every method tries `--lr_grid` (default `LR_GRID`) on the first subject with a separate
  search seed (100); the value with the highest subject fidelity is then used for all subjects x seeds 0, 1, 2.
- evaluation: the saved adapter loaded by its own loader (`load_superlora_weights`, `load_lora_weights`, or
  `PeftModel.from_pretrained`) into fresh copies of the base model; DPM-Solver++, guidance 5, fixed generator
  seeds that are the same for every run: n images each of "a photo of sks <class>" (judge subject accuracy and
  subject fidelity), "a photo of sks <class> on a <bg> background" cycling over the world's 4 backgrounds
  (background accuracy) and "a photo of a <class>" (shape accuracy; its drift is measured against the base
  model's score on the same prompts and seeds).
- rows carry "loop": "trainer". Rows without it (every result committed before 2026-12-03 evening) came from this
  file's former own loop, which drew its batches differently; with equal draws the two computed the same figures
  (docs/benchmarks.md, "Which loop made these numbers").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
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
N_EVAL = 16  # --n_eval default: images per prompt type the judge scores
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
    "ax_r10_ti": {**_s("SuperLoRA Tucker axes + TI", factorization="tucker", fold=3, groups="shape", rank=10), "ti": True},
    "ax_r16_ti": {**_s("SuperLoRA Tucker axes + TI", factorization="tucker", fold=3, groups="shape", rank=16), "ti": True},
    # UniLoRA's own map and vector size over the axes layout instead of LoRA's entries (attention + CLIP slice, for
    # --targets attention): ax_r16's 29,512 entries read a 14,872-entry isometric vector, + 128 = unilora_15k's 15,000
    "axi_r16_ti": {**_s("SuperLoRA Tucker axes, isometric projection + TI", factorization="tucker", fold=3,
                        groups="shape", rank=16, projection="isometric", projection_ratio=0.50393), "ti": True},
    # the same map and layout at the peers' smallest budget: 1,372 + 128 = 1,500, beside unilora_1k5 on the same slice
    "axi_r16_ti_1k5": {**_s("SuperLoRA Tucker axes, isometric projection + TI", factorization="tucker", fold=3,
                            groups="shape", rank=16, projection="isometric", projection_ratio=0.046489), "ti": True},
    # the kernel as a fourth axis (kernel_axis): the convs' U_in shrinks from c_in*9 to c_in + 9 rows, so rank 4 fits
    # under 15k (13,881 + 128) and rank 1 in 3,109 + 128
    "axk_r1_ti": {**_s("SuperLoRA Tucker axes + kernel + TI", factorization="tucker", fold=3, groups="shape", rank=1,
                       kernel_axis=True), "ti": True},
    "axk_r2_ti": {**_s("SuperLoRA Tucker axes + kernel + TI", factorization="tucker", fold=3, groups="shape", rank=2,
                       kernel_axis=True), "ti": True},
    "axk_r4_ti": {**_s("SuperLoRA Tucker axes + kernel + TI", factorization="tucker", fold=3, groups="shape", rank=4,
                       kernel_axis=True), "ti": True},
    # bases shared across shapes by axis length (share_axes): a shape keeps only its core and layer factor, so rank 1
    # fits in 1,131 + 128 (the <= 1.5k bar), rank 2 in 2,374 + 128, rank 4 in 5,969 + 128 and rank 6 in 12,249 + 128;
    # on the attention + text slice (no convs, so no kernel axis) rank 6 is 4,320 + 128 (the peers' 5k) and rank 12
    # 13,320 + 128 (ax_r10_ti's 13,200, the peers' 15k)
    **{f"axks_r{r}_ti": {**_s("SuperLoRA Tucker axes, shared bases + TI", factorization="tucker", fold=3,
                              groups="shape", rank=r, kernel_axis=True, share_axes=True), "ti": True}
       for r in (1, 2, 4, 6, 12)},
    # rank 2 without the five convs that read the up blocks' skip concatenations (inputs of 256, 192 and 96 channels):
    # their input bases are 1,088 of rank 2's 2,374 entries, and reading them through their parts' bases bent the
    # subject (concat_axes, a prototype), so here they are not adapted at all: 109 weights, 1,241 + 128 = 1,369
    "axks_r2_ti_noskip": {**_s("SuperLoRA Tucker axes, shared bases, no skip convs + TI", factorization="tucker",
                               fold=3, groups="shape", rank=2, kernel_axis=True, share_axes=True,
                               target_modules=r"to_q,to_k,to_v,to_out.0,unet\.(down_blocks\.\d+|mid_block)\.resnets\.\d+"
                                              r"\.conv[12],unet\.up_blocks\.\d+\.resnets\.\d+\.conv2,"
                                              r"unet\.up_blocks\.2\.resnets\.1\.conv1"), "ti": True},
    # the same five convs alone, each its own rank-1 Tucker (out, in, kernel), and the embedding: without them rank 2
    # learnt nothing (axks_r2_ti_noskip); are they enough? 1,303 + 128 = 1,431 (run without --train_text_encoder)
    "skip_axk_r1_ti": {**_s("SuperLoRA Tucker axes + kernel, skip convs only + TI", factorization="tucker", fold=3,
                            groups="shape", rank=1, kernel_axis=True,
                            target_modules=r"unet\.up_blocks\.[01]\.resnets\.[01]\.conv1,"
                                           r"unet\.up_blocks\.2\.resnets\.0\.conv1"),
                       "ti": True},
    # layouts trained in a random subspace: their factors are theta0 + F.v with v the one trainable vector of
    # ceil(ratio x N) = 1,360 entries (+ 128: the <= 1.5k bar). The shared layout at rank 6 (N = 12,249), with _ps1/_ps2
    # other subspaces (theta0 and F drawn from projection_seed) to see how much rests on the draw; then smaller layouts,
    # so the subspace keeps more of each: shared rank 4 (5,969) and rank 2 (2,374), per-shape kernel-axis rank 1
    # (3,109: the smallest layout that learns, 0.245 at 3,237) and rank 2 (6,330); then rank 4's neighbours, shared
    # rank 3 (3,923) and rank 5 (8,658); then the same vector through Uni-LoRA's isometric map (each entry reads one
    # coordinate, so Adam's per-coordinate step stays a per-entry step) instead of Fastfood's dense mix: axksi_* (rank 8:
    # N = 22,370)
    **{name: {**_s("SuperLoRA Tucker axes" + (", shared bases" if shared else " + kernel")
                   + (", projected + TI" if kind == "fastfood" else f", {kind} projection + TI"),
                   factorization="tucker", fold=3, groups="shape", rank=r, kernel_axis=True, share_axes=shared,
                   projection=kind, projection_ratio=ratio, projection_seed=seed), "ti": True}
       for name, r, shared, ratio, seed, kind in (
           ("axksp_r6_ti", 6, True, 0.111, 0, "fastfood"), ("axksp_r6_ti_ps1", 6, True, 0.111, 1, "fastfood"),
           ("axksp_r6_ti_ps2", 6, True, 0.111, 2, "fastfood"), ("axksp_r4_ti", 4, True, 0.22784, 0, "fastfood"),
           ("axksp_r4_ti_ps1", 4, True, 0.22784, 1, "fastfood"),  # the <= 1.5k recipe in other random subspaces
           ("axksp_r4_ti_ps2", 4, True, 0.22784, 2, "fastfood"), ("axksp_r4_ti_ps3", 4, True, 0.22784, 3, "fastfood"),
           ("axksp_r2_ti", 2, True, 0.57287, 0, "fastfood"), ("axkp_r1_ti", 1, False, 0.43744, 0, "fastfood"),
           ("axkp_r2_ti", 2, False, 0.21485, 0, "fastfood"), ("axksp_r3_ti", 3, True, 0.34667, 0, "fastfood"),
           ("axksp_r5_ti", 5, True, 0.15708, 0, "fastfood"), ("axksi_r4_ti", 4, True, 0.22784, 0, "isometric"),
           ("axksi_r6_ti", 6, True, 0.111, 0, "isometric"), ("axksi_r8_ti", 8, True, 0.06079, 0, "isometric"),
           ("axksi_r6_ti_ps1", 6, True, 0.111, 1, "isometric"),  # is the isometric map's rank 6 as draw-bound?
           # the rank-4 subspace over the UNet alone (run without --train_text_encoder: N = 5,921, the same 1,360-entry
           # vector): the embedding is then the only change to how prompts are read, context words included
           ("axksp_r4_ti_unet", 4, True, 0.2296, 0, "fastfood"),
           # at 15k on the conv slice: the rank-8 shared layout (22,370 entries) through a 14,872-entry isometric vector,
           # + 128 = 15,000, beside the fully trained rank-6 recipe (12,377)
           ("axksi_r8_ti_15k", 8, True, 0.66481, 0, "isometric"))},
    "t3_g1_r4_ti": {**_s("SuperLoRA Tucker + TI", factorization="tucker", fold=3, groups=1, rank=4), "ti": True},
    # the control at the recipe's own size: the cube fold G=12 (12,840) with the same embedding
    "t3_g12_r5_ti": {**_s("SuperLoRA Tucker + TI", factorization="tucker", fold=3, groups=12, rank=5), "ti": True},
    # a small-budget target (issue 21): Custom Diffusion's layers, the cross-attention K/V (20 weights), + the
    # embedding: 1,280 + 128 = 1,408 parameters, for the <= 1.5k bar; its own targets (run without --train_text_encoder)
    "kv_ax_r2_ti": {**_s("SuperLoRA Tucker axes, cross-attn K/V + TI", factorization="tucker", fold=3, groups="shape",
                         rank=2, target_modules="attn2.to_k,attn2.to_v"), "ti": True},
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
# training levers on the <= 1.5k recipe, everything else axksp_r4_ti's: Min-SNR loss weighting (diffusers' --snr_gamma),
# which the Min-SNR paper finds converges faster (the 1,360 random directions may be short of steps, not of rate), and
# diffusers' pivot halfway (--train_text_encoder_ti_frac 0.5): the embedding stops at step 750 and the vector goes on;
# then, as Min-SNR's push toward noisy timesteps bent the subjects' outlines, the other way: diffusers' timestep bias
# toward the less noisy half (x3, so 3/4 of the draws there), where a subject's pattern is drawn, not its layout
for _name, _lever in (("axksp_r4_ti_snr5", {"snr_gamma": 5.0}), ("axksp_r4_ti_frac", {"train_text_encoder_ti_frac": 0.5}),
                      ("axksp_r4_ti_early", {"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 3.0,
                                             "timestep_bias_portion": 0.5}),
                      # the class images regressed onto the base model's own prediction (the README demo's target):
                      # subspace_probe.py found every draw drifting the class images 10-20x more than the layouts that
                      # learn, and this prior term measures that drift alone, without the sampled noise
                      ("axksp_r4_ti_bm", {"prior_loss_target": "base_model"})):
    METHODS[_name] = {**METHODS["axksp_r4_ti"], "config": {**METHODS["axksp_r4_ti"]["config"], **_lever}}
# two embedding vectors instead of one (diffusers' advanced script trains two per identifier by default,
# --num_new_tokens_per_abstraction 2): the identifier "zwx", which the CLIP tokenizer splits into two ids that no
# prompt of the toy world uses, so each id gets its own offset (2 x 128), and the vector shrinks to keep 1,488:
# 1,232 + 256
METHODS["axksp_r4_ti2"] = {**METHODS["axksp_r4_ti"], "token": "zwx",
                           "config": {**METHODS["axksp_r4_ti"]["config"], "projection_ratio": 0.20639}}


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


def make_pipeline(unet, te):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=W["vae"], text_encoder=te, tokenizer=W["tokenizer"], unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(W["noise"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_prompts(subject: str, n: int, token: str = TI_TOKEN) -> tuple[list[str], list[str], dict]:
    from superlora_diffusers.toy import world

    shape = world.SUBJECTS[subject].shape
    bgs = [world.BACKGROUND_NAMES[i % len(world.BACKGROUND_NAMES)] for i in range(n)]
    prompts = ([f"a photo of {token} {shape}"] * n + [f"a photo of {token} {shape} on a {bg} background" for bg in bgs]
               + [f"a photo of a {shape}"] * n)
    return prompts, bgs, {"shape": shape}


@torch.no_grad()
def evaluate(unet, te, subject: str, n: int, steps: int, chunk: int = 96, token: str = TI_TOKEN) -> dict:
    """Judge scores with the adapter active; the same prompts and generator seeds for every run."""
    from superlora_diffusers.evaluate import judge_scores

    pipe = make_pipeline(unet, te)
    prompts, bgs, info = eval_prompts(subject, n, token)
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


def identifier(method: str) -> str:
    """The word a method's prompts name the subject by (a method may bring its own; the base model is judged on "sks")."""
    return METHODS.get(method, {}).get("token", TI_TOKEN)


def training_config(job: dict, work_dir: Path):
    """The shipped trainer's `TrainingConfig` for a benchmark job: the job's images, prompts, steps, batch, rate,
    prior weight and layers; SuperLoRA, a peft method, or the "sks" embedding (alone: peft's TrainableTokens;
    pivotal tuning: beside the adapter at `ti_lr`)."""
    from superlora_diffusers.toy import world
    from superlora_diffusers.training import TrainingConfig

    spec, shape = METHODS[job["method"]], world.SUBJECTS[job["subject"]].shape
    token = identifier(job["method"])
    images = work_dir / "images" / job["subject"]
    cfg = dict(pretrained_model_name_or_path="toy", instance_data_dir=str(images / "instance"),
               instance_prompt=f"a photo of {token} {shape}", max_train_steps=job["steps"], learning_rate=job["lr"],
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
        if targets:  # a preset widens with --targets conv; module patterns stay as they are
            widen = {"unet": "unet+conv", "unet+text": "unet+conv+text"} if job.get("targets") == "conv" else {}
            cfg["target_modules"] = widen.get(targets, targets)
        cfg.update({k: (str(v) if k == "groups" else v) for k, v in own.items()})
    elif spec["kind"] in ("lora", "lokr"):
        cfg.update(adapter=spec["kind"], rank=spec["r"])
    elif spec["kind"] in PEFT_SHARED:
        cfg.update(adapter=spec["kind"], peft_kwargs=json.dumps(spec["config"]))
    else:  # textual inversion alone: ignores --targets and --train_text_encoder
        cfg.update(adapter="trainable_tokens", train_text_encoder=False, target_modules=None)
    if spec.get("ti"):
        cfg.update(train_text_encoder_ti=True, token_abstraction=token, text_encoder_lr=job["ti_lr"])
    if "loraplus_lr_ratio" in job:
        cfg["loraplus_lr_ratio"] = job["loraplus_lr_ratio"]
    return TrainingConfig(**cfg)


def build(config, unet, te):
    """The adapter `config` trains, built by the trainer's own `build_adapter` on the given models."""
    from superlora_diffusers.training.adapters import build_adapter

    return build_adapter(config, W["tokenizer"], unet, te, log=False)


def adapted_models(config, weights: Path):
    """Fresh copies of the base UNet and text encoder with the trained file loaded by the adapter's own loader, and
    that adapter (built on two more copies by the trainer's `build_adapter`: its exact trainable count)."""
    unet, te = copy.deepcopy(W["unet"]), copy.deepcopy(W["te"])
    adapter = build(config, copy.deepcopy(W["unet"]), copy.deepcopy(W["te"]))
    adapter.load_into(make_pipeline(unet, te), weights)
    return unet, te, adapter


def run_job(job: dict) -> dict:
    """One run: the shipped trainer, `train(config)`, then the judge on the adapter it saved, loaded by its loader."""
    from superlora_diffusers.training import train

    t0 = time.time()
    out = dict(job)
    if job["method"] == "base":
        unet, te = copy.deepcopy(W["unet"]), copy.deepcopy(W["te"])
    else:
        config = training_config(job, Path(W["work_dir"]))
        weights = train(config)
        unet, te, adapter = adapted_models(config, weights)
        out.update(params=adapter.n_params, file_bytes=weights.stat().st_size, train_seconds=round(time.time() - t0, 2),
                   family=METHODS[job["method"]]["family"])
    unet.eval()
    te.eval()
    out.update(evaluate(unet, te, job["subject"], job["n_eval"], job["eval_steps"], token=identifier(job["method"])))
    if job["method"] == "base":
        out.update(params=0, file_bytes=0)
    elif job.get("save_deltas"):  # the trained ΔW, dense, for benchmarks/expressivity.py
        import safetensors.torch

        path = Path(job["save_deltas"]) / f"{job['method']}-{job['subject']}-s{job['seed']}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(trained_deltas(unet, te), str(path))
        out["deltas_file"] = str(path)
    if job["method"] != "base":
        shutil.rmtree(config.output_dir)  # TinyLoRA's folder alone can be a gigabyte
    out.update(seconds=round(time.time() - t0, 2))
    return out


@torch.no_grad()
def trained_deltas(unet, te) -> dict[str, torch.Tensor]:
    """Every adapted weight's ΔW as a (d_out, d_in·k·k) matrix, named as SuperLoRA names its targets
    ("unet.<path>", "text_encoder.<path>"): the one loaded SuperLoRA, or the active peft LoRA / LoKr layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from superlora_diffusers.components import find_generators

    components = {"unet": unet, "text_encoder": te}
    generators = list(find_generators(components).values())
    if generators:
        (generator,) = generators
        return {n: d.detach().float().cpu().contiguous() for n, d in zip(generator.targets, generator())}
    out = {}
    for component, module in components.items():
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer) and hasattr(layer, "get_delta_weight"):
                delta = layer.get_delta_weight(layer.active_adapters[0])
                out[f"{component}.{path}"] = delta.reshape(delta.shape[0], -1).float().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------
# main side: data once, then a pool of workers on one device, jobs by priority, JSON lines as they come
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prepare_data(args) -> None:
    """Each subject's instance images and the base model's prior images, as the folders the trainer reads."""
    from superlora_diffusers.toy import world

    init_worker(args.device, args.work_dir, args.threads)
    pipe = make_pipeline(W["unet"], W["te"])
    for si, subject in enumerate(args.subjects):
        folders = {kind: Path(args.work_dir) / "images" / subject / kind for kind in ("instance", "class")}
        shape = world.SUBJECTS[subject].shape
        inst = world.render_subject(subject, 5, seed=INSTANCE_SEED)
        gens = [torch.Generator("cpu").manual_seed(50_000 + 100 * si + i) for i in range(N_PRIOR)]
        prior = pipe([f"a photo of a {shape}"] * N_PRIOR, num_inference_steps=20, guidance_scale=5.0,
                     generator=gens).images
        for kind, images in (("instance", inst), ("class", prior)):
            folders[kind].mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folders[kind] / f"{i:03d}.png")


def hard_exit(executor, code: int) -> None:
    """Stop now: kill this pool's workers (runs in flight are lost) and exit without waiting for them."""
    for proc in list(getattr(executor, "_processes", {}).values()):
        proc.kill()
    os._exit(code)


def job_key(j: dict) -> tuple:
    key = (j["method"], j["subject"], j["seed"], float(j["lr"]), j["phase"], j.get("targets", "attention"),
           j.get("text", False), j["steps"], j["prior_weight"])
    key += (float(j["ti_lr"]),) if "ti_lr" in j else ()  # pivotal tuning's embedding rate
    key += (float(j["loraplus_lr_ratio"]),) if "loraplus_lr_ratio" in j else ()  # only where it is not 1
    return key + ((j["loop"],) if "loop" in j else ())  # "trainer": rows before it (the old own loop) never match


def loraplus(args) -> dict:
    """The LoRA+ ratio as a job field, only where it is not 1: earlier rows and keys keep matching."""
    return {"loraplus_lr_ratio": args.loraplus_lr_ratio} if args.loraplus_lr_ratio != 1 else {}


def refusal(method: str, args) -> str | None:
    """Why the trainer refuses `method` with these options (e.g. a Linear-only peft tuner on the convs), else None."""
    from superlora_diffusers.training import TrainingError

    job = dict(method=method, subject=args.subjects[0], seed=0, lr=args.lr_grid[0], steps=args.steps,
               prior_weight=args.prior_weight, targets=args.targets, text=args.train_text_encoder, ti_lr=args.ti_lr,
               **loraplus(args))
    try:
        training_config(job, Path(args.work_dir)).validate()
    except TrainingError as e:
        return str(e)
    return None


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
    refused = {m: why for m in methods if (why := refusal(m, args))}
    if refused and args.methods != "all":  # named: an error before any work; "all": the others run
        raise SystemExit("\n".join(f"{m}: {why}" for m, why in refused.items()))
    for m, why in refused.items():
        print(f"skipped {m}: {why}", flush=True)
    methods = [m for m in methods if m not in refused]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    previous = [r for r in (load(args.out) if Path(args.out).exists() else []) if "error" not in r]
    have = {job_key(r): r for r in previous if r.get("phase") != "choice"}
    prepare_data(args)
    print(f"[{time.time() - t_start:6.1f}s] data ready for {args.subjects}; {len(have)} earlier runs reused",
          flush=True)
    common = dict(steps=args.steps, n_eval=args.n_eval, eval_steps=args.eval_steps, prior_weight=args.prior_weight,
                  targets=args.targets, text=args.train_text_encoder, loop="trainer")
    if args.save_deltas:
        common["save_deltas"] = args.save_deltas
    common.update(loraplus(args))
    seeds = SEEDS[args.first_seed:args.seeds]
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
    slices: dict[str, set] = {}  # a method's rows on two layer slices would average two different adapters
    for r in rows:
        if r.get("phase") == "final":
            slices.setdefault(r["method"], set()).add((r.get("targets", "attention"), r.get("text", False)))
    mixed = {m: sorted(s) for m, s in slices.items() if len(s) > 1}
    if mixed:
        raise ValueError(f"{', '.join(mixed)} ran on more than one layer slice (targets, text encoder): "
                         f"{mixed}; report each slice's files separately.")
    per_method: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("phase") == "final" and "subject_fidelity" in r and r["lr"] == choice.get(r["method"], r["lr"]):
            r = dict(r)
            if r["subject"] in base:
                r["prior_shape_drift"] = r["prior_shape_acc"] - base[r["subject"]]["prior_shape_acc"]
                r["fidelity_gain"] = r["subject_fidelity"] - base[r["subject"]]["subject_fidelity"]
            # LoRA+ runs of a method are a row of their own, never averaged with the method's plain runs
            name = r["method"] + (f"_loraplus{r['loraplus_lr_ratio']:g}" if "loraplus_lr_ratio" in r else "")
            per_method.setdefault(name, []).append(r)
    stats = {}
    for m, rs in per_method.items():
        st = {"n": len(rs), "params": rs[0]["params"], "file_bytes": rs[0]["file_bytes"], "lr": rs[0]["lr"],
              "ti_lr": rs[0].get("ti_lr"), "loraplus": rs[0].get("loraplus_lr_ratio"),
              "family": METHODS.get(m, {}).get("family", rs[0].get("family", m)),
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
        st["judge_se"] = judge_noise(rs)
        stats[m] = st
    search = {}
    for r in rows:
        if r.get("phase") == "search":
            search.setdefault(r["method"], []).append((r["lr"], r.get("subject_fidelity")))
    return stats, base, search


def judge_noise(rows: list[dict]) -> tuple[float, float]:
    """The judge's own sampling noise in subject accuracy, apart from any training noise: a run's accuracy is the
    share of its n_eval images that the subject head accepts, so (binomial) a mean over runs has the standard error
    sqrt(sum p(1 - p) / n) / runs. Returns it for the mean over all `rows` and for one seed's mean over subjects
    (averaged over seeds): what a search on one seed can resolve."""
    def se(rs: list[dict]) -> float:
        return math.sqrt(sum(r["subject_acc"] * (1 - r["subject_acc"]) / r.get("n_eval", N_EVAL) for r in rs)) / len(rs)

    seeds = sorted({r["seed"] for r in rows})
    return se(rows), sum(se([r for r in rows if r["seed"] == s]) for s in seeds) / len(seeds)


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
        lr += f", LoRA+ x{st['loraplus']:g}" if st["loraplus"] else ""
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
    lines += ["", "The judge's sampling noise in subject accuracy (binomial over each run's n_eval images, no training "
              "noise in it): standard error of the mean above / of one seed's mean over the subjects", ""]
    lines += [f"- `{m}`: ± {stats[m]['judge_se'][0]:.3f} / ± {stats[m]['judge_se'][1]:.3f}" for m in order]
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
    r.add_argument("--n_eval", type=int, default=N_EVAL, help="images per prompt type")
    r.add_argument("--eval_steps", type=int, default=20)
    r.add_argument("--subjects", default=",".join(SUBJECTS))
    r.add_argument("--seeds", type=int, default=3, help="final runs on seeds 0..N-1 (0: the search alone)")
    r.add_argument("--first_seed", type=int, default=0,
                   help="skip the finals of seeds below this (e.g. 1: seeds 1..N-1, beside seed-0 runs made elsewhere)")
    r.add_argument("--search_seed", type=int, default=SEARCH_SEED,
                   help="training seed of the learning-rate search (0 makes search runs comparable, draw for draw, "
                        "with every method's seed-0 final on the first subject)")
    r.add_argument("--methods", default="all", help="comma-separated names of METHODS, or all")
    r.add_argument("--lr_grid", type=lambda v: [float(x) for x in v.split(",")], default=LR_GRID,
                   help="comma-separated learning rates every method tries first (default %(default)s)")
    r.add_argument("--ti_lr", type=float, default=TI_LR,
                   help="learning rate of the 'sks' embedding in pivotal tuning (methods *_ti; the method ti itself "
                        "uses --lr_grid)")
    r.add_argument("--loraplus_lr_ratio", type=float, default=1.0,
                   help="LoRA+: the zero-initialised factor (SuperLoRA's cores, LoRA's B) at lr x this")
    r.add_argument("--save_deltas", default=None,
                   help="also save each trained adapter's dense ΔW here (<method>-<subject>-s<seed>.safetensors), "
                        "for benchmarks/expressivity.py")
    r.add_argument("--lr_extend", type=int, default=2, help="extend the grid at most this many times per method")
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
