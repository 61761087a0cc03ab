"""The quality benchmark's peers of SuperLoRA: peft's shared-vector tuners (VeRA, VB-LoRA, UniLoRA, TinyLoRA),
textual inversion alone and pivotal tuning (an adapter + the "sks" embedding), on the embedded toy base model,
each built by the shipped trainer (`quality.training_config` -> `build_adapter`), as `quality.py run` trains them.

Trainable counts are checked against each tuner's definition, evaluated here on the toy's layer shapes rather than
read from peft, so a changed config or a shared vector counted twice shows up.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

from superlora_diffusers.training import TrainingError
from superlora_diffusers.training.data import encode_prompts

ROOT = Path(__file__).resolve().parents[1]
Q = benchmark_module("quality.py", "quality_peers")  # METHODS for parametrize; the models load in the fixture
SHARED_METHODS = [m for m, s in Q.METHODS.items() if s["kind"] in Q.PEFT_SHARED]
UNET_ATTENTION, CLIP_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0"), ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    Q.init_worker("cpu", str(tmp_path_factory.mktemp("quality")), 1)  # the toy base model, once
    return Q


def target_shapes(quality) -> list[tuple[int, int]]:
    """(d_in, d_out) of every Linear the attention + text targets name, found by suffix on the unadapted models."""
    shapes = []
    for model, suffixes in ((quality.W["unet"], UNET_ATTENTION), (quality.W["te"], CLIP_ATTENTION)):
        shapes += [(m.in_features, m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)]
    return shapes


def expected_params(kind: str, cfg: dict, shapes: list[tuple[int, int]]) -> int:
    """Each tuner's trainable count by its definition (shared state once)."""
    n = len(shapes)
    if kind == "vera":  # per layer: lambda_b (d_out) and lambda_d (r); the random A, B are frozen buffers
        return sum(o for _, o in shapes) + n * cfg["r"]
    if kind == "vblora":  # one bank of num_vectors x L, per layer top-k logits over the bank per L-slice
        nv, length, r = cfg["num_vectors"], cfg["vector_length"], cfg["r"]
        return nv * length + sum(r * nv * (i + o) // length for i, o in shapes)
    if kind == "unilora":  # one vector; indices and scales are frozen
        return cfg["theta_d_length"]
    return cfg["u"] * max(1, round(n * (1 - cfg["weight_tying"])))  # tinylora: one v of u per group of layers


def budget(method: str) -> float:
    """The budget a name claims: vera_15k -> 15,000, unilora_1k5 -> 1,500."""
    whole, _, tenths = method.rsplit("_", 1)[1].partition("k")
    return 1000 * float(whole) + 100 * float(tenths or 0)


def job(method: str, targets: str = "attention", text: bool = True, **extra) -> dict:
    return dict(method=method, subject="striped_star", seed=0, lr=1e-2, steps=3, prior_weight=1.0, targets=targets,
                text=text, ti_lr=5e-3, **extra)


def built(quality, tmp_path, method: str, **kw):
    """(adapter, unet, te): the method's adapter as the trainer builds it, on fresh copies, seeded as train() seeds."""
    unet, te = copy.deepcopy(quality.W["unet"]), copy.deepcopy(quality.W["te"])
    torch.manual_seed(0)
    return quality.build(quality.training_config(job(method, **kw), tmp_path), unet, te), unet, te


def trainable(adapter) -> list[torch.Tensor]:
    return [p for group in adapter.param_groups(1e-2, 5e-3) for p in group["params"]]


def loss_of(quality, unet, te, prompt: str = "a photo of sks star") -> torch.Tensor:
    """A denoising-shaped loss through CLIP and the UNet (fixed inputs), so both models' adapters get gradients."""
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    pred = unet(x, torch.tensor([500]), encode_prompts(quality.W["tokenizer"], te, [prompt])).sample
    return (pred - torch.randn(pred.shape, generator=g)).pow(2).mean()


def step(quality, unet, te, params: list[torch.Tensor], lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    loss_of(quality, unet, te).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", SHARED_METHODS)
def test_shared_tuner_counts_and_trains(quality, method, tmp_path):
    spec = quality.METHODS[method]
    shapes = target_shapes(quality)
    assert len(shapes) == 92
    adapter, unet, te = built(quality, tmp_path, method)
    params = trainable(adapter)
    assert len({id(p) for p in params}) == len(params) and all(p.requires_grad for p in params)
    n = sum(p.numel() for p in params)
    assert n == adapter.n_params == expected_params(spec["kind"], spec["config"], shapes)
    assert abs(n - budget(method)) <= 0.12 * budget(method)
    assert len(adapter.shapes) == 92 and adapter.components == ["unet", "text_encoder"]  # one state over both
    # one step, then every trainable tensor gets a gradient (VeRA's lambda_d only once lambda_b left zero)
    step(quality, unet, te, params)
    loss = loss_of(quality, unet, te)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("method", ["vera_15k", "vblora_1k5", "unilora_40k", "tinylora_5k"])
def test_shared_tuners_refuse_conv_targets(quality, method, tmp_path):
    kind = quality.METHODS[method]["kind"]
    with pytest.raises(TrainingError, match=f"^--adapter {kind} adapts nn.Linear layers only"):
        quality.training_config(job(method, targets="conv"), tmp_path).validate()


def test_run_refuses_named_linear_only_methods_on_conv(quality, tmp_path):
    with pytest.raises(SystemExit, match="vera_15k: --adapter vera adapts nn.Linear layers only"):
        quality.main(["run", "--out", str(tmp_path / "q.jsonl"), "--work_dir", str(tmp_path), "--device", "cpu",
                      "--targets", "conv", "--methods", "ti,vera_15k"])
    assert not (tmp_path / "q.jsonl").exists()  # refused before any work
    assert quality.refusal("ti", Namespace(subjects=["striped_star"], lr_grid=[1e-2], steps=3, prior_weight=1.0,
                                           targets="conv", train_text_encoder=True, ti_lr=5e-3, work_dir=str(tmp_path),
                                           loraplus_lr_ratio=1.0)) is None


def test_textual_inversion_changes_only_sks_prompts(quality, tmp_path):
    """`ti`: peft's TrainableTokens on CLIP's input embedding, the word's row only (128 params), CLIP alone."""
    adapter, unet, te = built(quality, tmp_path, "ti")
    params = trainable(adapter)
    assert [p.numel() for p in params] == [128] == [adapter.n_params] and adapter.components == ["text_encoder"]
    assert not any(p.requires_grad for p in unet.parameters())
    prompts = ["a photo of sks star", "a photo of a star"]
    tok = quality.W["tokenizer"]
    with torch.no_grad():
        before = encode_prompts(tok, te, prompts)
        assert torch.equal(before, encode_prompts(tok, quality.W["te"], prompts))  # starts at the base model
    step(quality, unet, te, params, lr=1e-1)
    with torch.no_grad():
        after = encode_prompts(tok, te, prompts)
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1], before[1])
    assert torch.equal(te.get_input_embeddings().get_base_layer().weight, quality.W["te"].get_input_embeddings().weight)


def test_pivotal_tuning_adds_the_embedding_and_keeps_the_adapter(quality, tmp_path):
    lora, _, _ = built(quality, tmp_path, "lora_r1", text=False)
    rng = torch.get_rng_state()
    pivotal, _, te = built(quality, tmp_path, "lora_r1_ti", text=False)
    assert torch.equal(rng, torch.get_rng_state())  # the embedding draws nothing
    assert pivotal.n_params == 16_832 - 12 * 256 + 128  # LoRA r1 on the UNet's 80 layers (no --text) + the word
    groups = pivotal.param_groups(3e-3, 5e-3)
    assert [(g["lr"], g.get("weight_decay")) for g in groups] == [(3e-3, None), (5e-3, 0.0)]
    assert [p.numel() for p in groups[1]["params"]] == [128]
    assert len(trainable(lora)) == len(groups[0]["params"])
    assert all(torch.equal(a, b) for a, b in zip(trainable(lora), groups[0]["params"]))  # the same draws
    assert pivotal.components == ["unet", "text_encoder"] and pivotal.weight_name == "adapter_model.safetensors"
    assert not any(p.requires_grad for n, p in te.named_parameters() if "lora_" in n)  # no CLIP LoRA without --text


def test_job_key_has_ti_lr_only_for_pivotal_tuning(quality):
    job = dict(method="lora_r1", subject="striped_star", seed=0, lr=3e-3, phase="final", targets="attention",
               text=True, steps=400, prior_weight=1.0)
    assert quality.job_key(job) == ("lora_r1", "striped_star", 0, 3e-3, "final", "attention", True, 400, 1.0)
    pivotal = dict(job, method="lora_r1_ti", ti_lr=5e-3)
    assert quality.job_key(pivotal)[-1] == 5e-3
    assert quality.job_key(pivotal) != quality.job_key(dict(pivotal, ti_lr=1e-3))


@pytest.mark.slow
def test_tiny_run_writes_peer_rows(tmp_path):
    out = tmp_path / "q.jsonl"
    cmd = [sys.executable, "benchmarks/quality.py", "run", "--out", str(out), "--work_dir", str(tmp_path),
           "--device", "cpu", "--workers", "1", "--steps", "3", "--n_eval", "1", "--eval_steps", "1",
           "--subjects", "striped_star", "--seeds", "1", "--lr_grid", "3e-3", "--train_text_encoder",
           "--prior_weight", "1", "--ti_lr", "1e-2", "--methods", "ti,vera_15k,lora_r1_ti"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines()) if r["phase"] == "final"}
    assert {m: (r["params"], r["family"]) for m, r in rows.items()} == {
        "ti": (128, "textual inversion"), "vera_15k": (15_020, "peft VeRA"), "lora_r1_ti": (16_960, "peft LoRA + TI")}
    assert all(r["file_bytes"] > 4 * r["params"] and "subject_fidelity" in r for r in rows.values())
    assert all(r["loop"] == "trainer" and "error" not in r for r in rows.values())
    assert rows["lora_r1_ti"]["ti_lr"] == 1e-2 and "ti_lr" not in rows["ti"] and "ti_lr" not in rows["vera_15k"]
    assert not list((tmp_path / "runs").iterdir())  # each run's folder is removed once judged


@pytest.mark.parametrize("method", ["lora_r1", "ax_r1"])
def test_trained_deltas_are_every_adapted_weight_named_as_superlora_targets(quality, method, tmp_path):
    """--save_deltas: the dense ΔW that expressivity.py fits, for peft LoRA and for a SuperLoRA alike."""
    from superlora_diffusers import find_targets

    adapter, unet, te = built(quality, tmp_path, method, targets="conv")
    with torch.no_grad():
        for p in trainable(adapter):
            p.add_(0.01)
    deltas = quality.trained_deltas(unet, te)
    clean = {"unet": quality.W["unet"], "text_encoder": quality.W["te"]}
    names = [t.name for t in find_targets(clean, "unet+conv+text")]
    assert sorted(deltas) == sorted(names) and len(names) == 114
    shapes = {t.name: t.shape for t in find_targets(clean, "unet+conv+text")}
    assert all(tuple(d.shape) == shapes[n] for n, d in deltas.items())
    assert all(d.abs().sum() > 0 for d in deltas.values())


def test_superlora_pivotal_tuning_runs_on_the_shipped_token_offsets(quality, tmp_path):
    """ax_r1_ti: the same factors as ax_r1 (same draws) plus the module's own `tokens.delta` as the TI group."""
    plain, _, _ = built(quality, tmp_path, "ax_r1", targets="conv")
    pivotal, _, te = built(quality, tmp_path, "ax_r1_ti", targets="conv")
    groups = pivotal.param_groups(3e-3, 5e-3)
    assert [g["lr"] for g in groups] == [3e-3, 5e-3] and [p.shape for p in groups[1]["params"]] == [(1, 128)]
    assert all(torch.equal(a, b) for a, b in zip(trainable(plain), groups[0]["params"]))
    assert len(trainable(plain)) == len(groups[0]["params"])
    tok = quality.W["tokenizer"]
    with torch.no_grad():
        before = encode_prompts(tok, te, ["a photo of sks star"])
        groups[1]["params"][0].fill_(0.5)
        assert not torch.allclose(encode_prompts(tok, te, ["a photo of sks star"]), before)


@pytest.mark.parametrize("method", ["ax_r1_ti", "t3_g12_r5", "lora_r1_ti"])
def test_loraplus_trains_the_zero_initialised_factors_at_their_own_rate(quality, method, tmp_path):
    """--loraplus_lr_ratio: SuperLoRA's cores (or the cube's zero factor) and peft LoRA's B at lr x ratio, the
    rest of the adapter at lr, the embedding at its own rate; ratio 1 leaves the groups as they were."""
    adapter, _, _ = built(quality, tmp_path, method, targets="conv")
    plain = adapter.param_groups(3e-3, 5e-3)
    groups = adapter.param_groups(3e-3, 5e-3, 4.0)
    ti = [5e-3] if method.endswith("_ti") else []
    assert [g["lr"] for g in plain] == [3e-3] + ti
    assert [g["lr"] for g in groups] == [3e-3, 1.2e-2] + ti
    zero = groups[1]["params"]
    assert zero and all(p.abs().sum() == 0 for p in zero)  # exactly the tensors that start at zero...
    assert all(p.abs().sum() > 0 for p in groups[0]["params"])  # ...and none of the others
    assert sorted(map(id, zero + groups[0]["params"])) == sorted(map(id, plain[0]["params"]))
    if method == "ax_r1_ti":
        assert len(zero) == 16 and all(p.shape == (1, 1, 1) for p in zero)  # one rank-1 core per weight shape


def test_the_kernel_axis_methods_fit_their_budgets_through_the_trainer(quality, tmp_path):
    """axk_r*_ti: --kernel_axis reaches the shipped trainer's adapter; rank 4 over the conv slice stays under 15k."""
    counts = {m: built(quality, tmp_path, m, targets="conv")[0].n_params for m in ("axk_r1_ti", "axk_r4_ti", "ax_r1_ti")}
    assert counts == {"axk_r1_ti": 3_109 + 128, "axk_r4_ti": 13_881 + 128, "ax_r1_ti": 12_738 + 128}
    adapter, _, _ = built(quality, tmp_path, "axk_r4_ti", targets="conv")
    assert adapter.config.kernel_axis and adapter.module.metadata["target_kernels"]


def test_the_shared_bases_method_fits_the_smallest_budget_through_the_trainer(quality, tmp_path):
    """axks_r1_ti: --share_axes reaches the trainer's adapter, and rank 1 over the conv slice fits in 1,500."""
    adapter, _, _ = built(quality, tmp_path, "axks_r1_ti", targets="conv")
    assert adapter.n_params == 1_131 + 128 <= 1_500
    assert adapter.config.share_axes and adapter.config.kernel_axis


def test_the_projected_shared_method_trains_one_vector_under_the_smallest_budget(quality, tmp_path):
    """axksp_r6_ti: --projection reaches the axes layout through the trainer: 1,360 + 128 trainable entries for the
    rank-6 layout's 12,249; LoRA+ has no zero-initialised factor to single out there, and says so."""
    adapter, _, _ = built(quality, tmp_path, "axksp_r6_ti", targets="conv")
    assert adapter.n_params == 1_360 + 128 <= 1_500
    assert adapter.config.projection == "fastfood" and adapter.config.share_axes
    assert [p.numel() for g in adapter.param_groups(3e-3, 5e-3) for p in g["params"]] == [1_360, 128]
    with pytest.raises(TrainingError, match="--loraplus_lr_ratio needs a zero-initialised factor"):
        adapter.param_groups(3e-3, 5e-3, 4.0)
    other, _, _ = built(quality, tmp_path, "axksp_r6_ti_ps1", targets="conv")  # --projection_seed: another subspace
    assert other.config.projection_seed == 1 and other.n_params == adapter.n_params
    assert not torch.equal(other.module.axes.theta0, adapter.module.axes.theta0)


@pytest.mark.parametrize("method, rank, shared, n, text", [
    ("axksp_r4_ti", 4, True, 1_360, True), ("axksp_r4_ti_ps1", 4, True, 1_360, True),
    ("axksp_r2_ti", 2, True, 1_360, True), ("axkp_r1_ti", 1, False, 1_361, True),
    ("axkp_r2_ti", 2, False, 1_361, True), ("axksp_r3_ti", 3, True, 1_360, True), ("axksp_r5_ti", 5, True, 1_360, True),
    ("axksi_r4_ti", 4, True, 1_360, True), ("axksi_r6_ti", 6, True, 1_360, True), ("axksi_r8_ti", 8, True, 1_360, True),
    ("axksi_r6_ti_ps1", 6, True, 1_360, True), ("axksp_r4_ti_ps2", 4, True, 1_360, True),
    ("axksp_r4_ti_unet", 4, True, 1_360, False)])  # run without --train_text_encoder: no CLIP layer among the targets
def test_smaller_projected_layouts_train_the_same_vector_size(quality, tmp_path, method, rank, shared, n, text):
    """The <= 1.5k candidates differ only in the layout the 1,360-entry vector spans, not in what trains."""
    adapter, _, _ = built(quality, tmp_path, method, targets="conv", text=text)
    assert (adapter.config.rank, adapter.config.share_axes, adapter.config.kernel_axis) == (rank, shared, True)
    assert [p.numel() for g in adapter.param_groups(3e-3, 5e-3) for p in g["params"]] == [n, 128]
    assert any(name.startswith("text_encoder") for name in adapter.targets) == text


@pytest.mark.parametrize("method, field, value, default", [("axksp_r4_ti_snr5", "snr_gamma", 5.0, None),
                                                            ("axksp_r4_ti_frac", "train_text_encoder_ti_frac", 0.5, 1.0),
                                                            ("axksp_r4_ti_early", "timestep_bias_strategy", "earlier",
                                                             "none")])
def test_the_training_levers_reach_the_trainer_and_change_nothing_else(quality, tmp_path, method, field, value, default):
    """The <= 1.5k recipe with one training option changed (Min-SNR; the embedding's pivot); the adapter it builds
    is axksp_r4_ti's."""
    configs = {m: quality.training_config(job(m, targets="conv"), tmp_path) for m in (method, "axksp_r4_ti")}
    assert (getattr(configs[method], field), getattr(configs["axksp_r4_ti"], field)) == (value, default)
    configs[method].validate()
    (adapter, _, _), (base, _, _) = (built(quality, tmp_path, m, targets="conv") for m in configs)
    assert adapter.config == base.config and adapter.n_params == 1_360 + 128


def test_two_embedding_vectors_keep_the_recipe_s_size_and_reach_the_prompts(quality, tmp_path):
    """axksp_r4_ti2: the identifier "zwx" is two CLIP ids the toy world never uses, so the embedding is 2 x 128 and
    the vector shrinks to 1,232 (1,488 in all); training and the judge's prompts use that word, not "sks"."""
    adapter, _, _ = built(quality, tmp_path, "axksp_r4_ti2", targets="conv")
    assert [p.numel() for g in adapter.param_groups(3e-3, 5e-3) for p in g["params"]] == [1_232, 256]
    assert adapter.n_params == 1_488 == built(quality, tmp_path, "axksp_r4_ti", targets="conv")[0].n_params
    config = quality.training_config(job("axksp_r4_ti2", targets="conv"), tmp_path).validate()
    assert (config.token_abstraction, config.instance_prompt) == ("zwx", "a photo of zwx star")
    world_ids = {i for p in quality.eval_prompts("striped_star", 2)[0] for i in quality.W["tokenizer"](p).input_ids}
    assert not world_ids & set(adapter.config.token_ids) and len(adapter.config.token_ids) == 2
    assert all("zwx" in p for p in quality.eval_prompts("striped_star", 2, "zwx")[0][:4])


def test_the_axes_layout_through_unilora_s_map_trains_unilora_s_vector_size(quality, tmp_path):
    """axi_r16_ti beside unilora_15k on attention + CLIP: the same isometric map and 15,000 trained entries (14,872 +
    the embedding's 128); only the layout the vector spans differs (ax_r16's 29,512 entries, not LoRA r = 4's)."""
    adapter, _, _ = built(quality, tmp_path, "axi_r16_ti")
    assert (adapter.config.projection, adapter.config.rank, adapter.config.groups) == ("isometric", 16, "shape")
    assert [p.numel() for g in adapter.param_groups(1e-2, 5e-3) for p in g["params"]] == [14_872, 128]
    assert adapter.n_params == 15_000 == built(quality, tmp_path, "unilora_15k")[0].n_params
    conv, _, _ = built(quality, tmp_path, "axksi_r8_ti_15k", targets="conv")  # the same vector size on the conv slice
    assert (conv.config.rank, conv.config.share_axes, conv.n_params) == (8, True, 15_000)


def test_loraplus_reaches_the_trainer_and_the_rows(quality, tmp_path):
    job = dict(method="ax_r1_ti", subject="striped_star", seed=0, lr=3e-3, phase="final", targets="conv", text=True,
               steps=1500, prior_weight=1.0, ti_lr=5e-3)
    assert Q.training_config(job, tmp_path).loraplus_lr_ratio == 1.0
    assert Q.training_config(dict(job, loraplus_lr_ratio=16.0), tmp_path).validate().loraplus_lr_ratio == 16.0
    assert quality.job_key(dict(job, loraplus_lr_ratio=16.0)) != quality.job_key(job)
    assert quality.job_key(dict(job, loraplus_lr_ratio=16.0))[-1] == 16.0


def test_jobs_map_to_the_shipped_trainers_config(tmp_path):
    """Each job becomes one `TrainingConfig` on the job's images, prompts, steps, rate and layers."""
    job = dict(method="lora_r1", subject="checker_square", seed=2, lr=3e-3, steps=1500, prior_weight=1.0,
               targets="conv", text=True, n_eval=16, eval_steps=20)
    lora = Q.training_config(job, tmp_path)
    assert (lora.adapter, lora.rank, lora.target_modules, lora.train_text_encoder) == ("lora", 1, "unet+conv", True)
    assert lora.instance_prompt == "a photo of sks square" and lora.class_prompt == "a photo of a square"
    assert lora.with_prior_preservation and lora.num_class_images == Q.N_PRIOR and lora.train_batch_size == Q.BATCH
    assert (lora.max_train_steps, lora.learning_rate, lora.seed) == (1500, 3e-3, 2)
    axes = Q.training_config({**job, "method": "ax_r1_ti", "ti_lr": 5e-3}, tmp_path)
    assert (axes.adapter, axes.groups, axes.factorization, axes.rank) == ("superlora", "shape", "tucker", 1)
    assert axes.train_text_encoder_ti and axes.text_encoder_lr == 5e-3
    vb = Q.training_config({**job, "method": "vblora_15k", "targets": "attention"}, tmp_path)
    assert vb.adapter == "vblora" and json.loads(vb.peft_kwargs) == Q.METHODS["vblora_15k"]["config"]
    ti = Q.training_config({**job, "method": "ti"}, tmp_path).validate()
    assert (ti.adapter, ti.train_text_encoder, ti.learning_rate) == ("trainable_tokens", False, 3e-3)
    pivotal = Q.training_config({**job, "method": "lora_r1_ti", "ti_lr": 5e-3}, tmp_path).validate()
    assert (pivotal.adapter, pivotal.train_text_encoder_ti, pivotal.text_encoder_lr) == ("lora", True, 5e-3)


@pytest.mark.parametrize("targets", ["attention", "conv"])
def test_the_small_budget_target_keeps_its_own_layers(quality, tmp_path, targets):
    """kv_ax_r2_ti: the cross-attention K/V (Custom Diffusion's layers) + the embedding, <= 1,500 whatever --targets."""
    adapter, _, _ = built(quality, tmp_path, "kv_ax_r2_ti", targets=targets, text=False)
    assert adapter.n_params == 1_280 + 128 and len(adapter.shapes) == 20
    assert all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in adapter.targets)


def test_method_targets_widen_as_presets_and_stay_as_patterns(quality, tmp_path):
    """--targets conv widens a method's preset to its conv form; module patterns (skip_axk_r1_ti: the five convs that
    read the up blocks' skip concatenations, 1,303 + 128) stay exactly those layers."""
    widened = Q.training_config(job("t3_g12_r5_text", targets="conv", text=False), tmp_path)
    assert widened.target_modules == "unet+conv+text"
    adapter, _, _ = built(quality, tmp_path, "skip_axk_r1_ti", targets="conv", text=False)
    assert adapter.n_params == 1_303 + 128 and len(adapter.shapes) == 5
    assert all(".resnets." in name and name.endswith(".conv1") and ".up_blocks." in name for name in adapter.targets)


def test_the_isometric_layout_at_the_peers_smallest_budget(quality, tmp_path):
    """axi_r16_ti_1k5: the rank-16 axes layout on UNet + CLIP attention through a 1,372-entry isometric vector, + the
    embedding: UniLoRA 1.5k's 1,500 exactly."""
    adapter, _, _ = built(quality, tmp_path, "axi_r16_ti_1k5", targets="attention", text=True)
    assert adapter.n_params == 1_500 and len(adapter.shapes) == 92
