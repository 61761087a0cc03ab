"""Exports of per-layer ΔW: the SVD / exact math, then adapter files exported, loaded by diffusers, merged."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import generate, tiny_pipeline
from safetensors.torch import load_file

from superlora_diffusers import SuperLoRAConfig
from superlora_diffusers.export import (
    ExportError,
    adapter_deltas,
    export_adapter,
    export_name,
    kohya_key,
    merge_adapter,
    overall_error,
    svd_factors,
    to_diff_state_dict,
    to_lora_state_dict,
)
from superlora_diffusers import inject_superlora


def low_rank(d_out, d_in, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g)


def test_svd_is_exact_at_the_true_rank_and_monotone():
    delta = low_rank(20, 12, 3)
    down, up, err = svd_factors(delta, rank=3)
    assert down.shape == (3, 12) and up.shape == (20, 3)
    assert err < 1e-6
    torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=1e-4)
    errors = [svd_factors(torch.randn(16, 16), rank=r)[2] for r in (1, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6


def test_energy_threshold_picks_the_smallest_rank():
    delta = low_rank(30, 30, 5) + 1e-4 * torch.randn(30, 30)
    down, _, err = svd_factors(delta, energy=0.999)
    assert down.shape[0] == 5 and err < 0.01
    with pytest.raises(ValueError, match="exactly one"):
        svd_factors(delta)


def test_weight_aligned_lora_preset_exports_exactly_at_its_rank():
    """A `lora`-preset SuperLoRA is B·A per weight: its SVD export at the same rank loses nothing."""
    from superlora_diffusers import SuperLoRA

    module = SuperLoRA(SuperLoRAConfig.lora(rank=2), [(24, 16), (16, 40)])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        deltas = {f"unet.layer{i}.to_q": d for i, d in enumerate(module())}
    _, errors = to_lora_state_dict(deltas, rank=2)
    assert [e.rank for e in errors] == [2, 2] and max(e.relative_error for e in errors) < 1e-6
    _, errors = to_lora_state_dict(deltas, rank=1)
    assert min(e.relative_error for e in errors) > 1e-3


def test_state_dict_formats():
    deltas = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": low_rank(8, 8, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": low_rank(6, 6, 1),
    }
    diffusers_sd, errors = to_lora_state_dict(deltas, rank=2)
    assert set(diffusers_sd) == {f"{n}.lora_{ab}.weight" for n in deltas for ab in "AB"}
    assert all(e.relative_error < 1e-5 for e in errors) and overall_error(deltas, errors) < 1e-5
    kohya_sd, _ = to_lora_state_dict(deltas, rank=1, kohya=True)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya_sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya_sd
    diff = to_diff_state_dict(deltas)
    for name, delta in deltas.items():
        assert torch.equal(diff[f"{kohya_key(name)}.diff"], delta)


# ---- adapter files: exports load in diffusers, .diff is exact, merged folders load without this package ----

@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny pipeline with a random (ΔW != 0) Tucker SuperLoRA on UNet + text encoder, saved to disk."""
    root = tmp_path_factory.mktemp("adapted")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "base")
    config = SuperLoRAConfig.lorta(fold=3, groups=2, rank=3, target_modules="unet+text")
    module = inject_superlora(pipe._superlora_components(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    pipe.save_superlora_weights(root / "adapter", metadata={"instance_prompt": "a photo of sks star"})
    with torch.no_grad():
        deltas = dict(zip(module.targets, module()))
    return {"root": root, "adapter": root / "adapter", "base": root / "base", "pipe": pipe,
            "reference": generate(pipe), "base_images": generate(tiny_pipeline()), "deltas": deltas}


def lora_pipeline(path):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipe


def pixel_error(a, b):
    return float((a - b).abs().mean())


def test_adapter_deltas_equal_the_pipelines(adapted):
    deltas = adapter_deltas(adapted["adapter"])
    assert list(deltas) == list(adapted["deltas"])
    assert any(n.startswith("text_encoder.") for n in deltas) and any(n.startswith("unet.") for n in deltas)
    for name, delta in deltas.items():
        assert torch.equal(delta, adapted["deltas"][name])


def test_diffusers_lora_export_loads_and_matches_at_full_rank(adapted, tmp_path):
    out = tmp_path / "pytorch_lora_weights.safetensors"
    report = export_adapter(adapted["adapter"], out, to="lora", rank=64)
    assert report.overall_error < 1e-5 and report.bytes == out.stat().st_size
    keys = list(load_file(out))
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)  # the ecosystem's TE spelling
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path))  # the default weight name: loads from the folder
    assert any(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())
    assert any(hasattr(m, "lora_A") for m in pipe.unet.modules())
    torch.testing.assert_close(generate(pipe), adapted["reference"], atol=1e-4, rtol=0)


def test_lower_rank_lora_exports_approach_the_adapter(adapted, tmp_path):
    gap = pixel_error(adapted["base_images"], adapted["reference"])  # what the adapter changes at all
    rows = []
    for rank in (1, 4, 16):
        out = tmp_path / f"r{rank}.safetensors"
        report = export_adapter(adapted["adapter"], out, to="lora", rank=rank)
        pixels = pixel_error(generate(lora_pipeline(out)), adapted["reference"]) if rank < 16 else None
        rows.append((rank, report.overall_error, pixels))
    print("rank, overall ΔW error, mean |pixel error| (adapter vs base: %.4f):" % gap, rows)
    errors = [r[1] for r in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5  # 16 >= every layer's full rank here
    assert rows[0][2] < 0.8 * gap and rows[1][2] < 0.25 * gap


def test_kohya_export_loads_in_diffusers(adapted, tmp_path):
    # energy mode gives layers different ranks: the shared alpha keeps every layer's scale right in diffusers
    out = tmp_path / "kohya.safetensors"
    report = export_adapter(adapted["adapter"], out, to="kohya", energy=0.999999)
    low, high = report.ranks
    assert low < high and report.overall_error < 1e-3
    state = load_file(out)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {float(high)}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in state
    for name, delta in adapted["deltas"].items():  # alpha/r · up·down reproduces ΔW (A1111 / ComfyUI semantics)
        key = kohya_key(name)
        down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
        approx = float(alpha) / down.shape[0] * up @ down
        assert float((approx - delta).norm() / delta.norm()) < 2e-3
    torch.testing.assert_close(generate(lora_pipeline(out)), adapted["reference"], atol=2e-3, rtol=0)


def test_diff_export_is_exact(adapted, tmp_path):
    out = tmp_path / "diff.safetensors"
    report = export_adapter(adapted["adapter"], out, to="diff")
    assert report.overall_error == 0.0
    state = load_file(out)
    assert len(state) == len(adapted["deltas"])
    for name, delta in adapted["deltas"].items():
        assert torch.equal(state[f"{kohya_key(name)}.diff"], delta)  # bit for bit
    # W + diff is exactly the fused SuperLoRA weight
    fused, plain = tiny_pipeline(), tiny_pipeline()
    fused.load_superlora_weights(adapted["adapter"])
    fused.fuse_superlora()
    name = next(iter(adapted["deltas"]))
    path = name.split(".", 1)[1]
    merged = plain.unet.get_submodule(path).weight + state[f"{kohya_key(name)}.diff"]
    assert torch.equal(merged, fused.unet.get_submodule(path).weight)
    half = export_adapter(adapted["adapter"], tmp_path / "half.safetensors", to="diff", dtype="float16")
    assert 0 < half.overall_error < 1e-3 and half.bytes < 0.6 * report.bytes


def test_export_refuses_bad_input_and_existing_files(adapted, tmp_path):
    out = tmp_path / "x.safetensors"
    export_adapter(adapted["adapter"], out, to="lora", rank=2)
    before = out.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_adapter(adapted["adapter"], out, to="lora", rank=4)
    assert out.read_bytes() == before
    export_adapter(adapted["adapter"], out, to="lora", rank=4, overwrite=True)
    assert out.read_bytes() != before
    for kwargs, message in [(dict(to="lora"), "needs --rank"), (dict(to="lora", rank=2, energy=0.9), "not both"),
                            (dict(to="diff", rank=2), "takes no"), (dict(to="lokr", rank=2), "unknown export format"),
                            (dict(to="lora", energy=1.5), "energy must be")]:
        with pytest.raises(ExportError, match=message):
            export_adapter(adapted["adapter"], tmp_path / "y.safetensors", **kwargs)
    assert not (tmp_path / "y.safetensors").exists()
    assert list(tmp_path.glob(".*tmp")) == []  # no temp files left behind


def test_export_names_use_the_ecosystem_spelling():
    assert export_name("text_encoder.encoder.layers.3.self_attn.q_proj") == \
        "text_encoder.text_model.encoder.layers.3.self_attn.q_proj"
    assert export_name("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj") == \
        "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"
    assert export_name("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert kohya_key("text_encoder.encoder.layers.0.self_attn.out_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj"


MERGED_CHECK = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
images = pipe("a photo of sks star", num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
              output_type="pt", generator=torch.Generator().manual_seed(0)).images
assert not any(m.startswith("superlora") for m in sys.modules), "the merged model must not need superlora"
torch.save(images, sys.argv[2])
"""


def test_merged_folder_loads_with_plain_diffusers(adapted, tmp_path):
    out = merge_adapter(adapted["adapter"], str(adapted["base"]), tmp_path / "merged")
    assert (out / "model_index.json").is_file() and (out / "superlora_merge.json").is_file()
    assert json.loads((out / "superlora_merge.json").read_text())["dtype"] == "float32"
    assert not list(tmp_path.glob(".merged*"))
    subprocess.run([sys.executable, "-c", MERGED_CHECK, str(out), str(tmp_path / "images.pt")], check=True,
                   capture_output=True, cwd=tmp_path)
    images = torch.load(tmp_path / "images.pt")
    fused = tiny_pipeline()
    fused.load_superlora_weights(adapted["adapter"])
    fused.fuse_superlora()
    torch.testing.assert_close(images, generate(fused), atol=1e-5, rtol=0)
    torch.testing.assert_close(images, adapted["reference"], atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="already exists"):
        merge_adapter(adapted["adapter"], str(adapted["base"]), out)
    (out / "marker").write_text("old")
    merge_adapter(adapted["adapter"], str(adapted["base"]), out, dtype="float16", overwrite=True)
    assert not (out / "marker").exists() and json.loads((out / "superlora_merge.json").read_text())["dtype"] == "float16"


def test_saved_files_and_merged_folders_follow_the_umask(adapted, tmp_path):
    """tempfile writes 0600 files and 0700 folders; what we save must get the user's umask, as save_pretrained's do."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        adapted["pipe"].save_superlora_weights(tmp_path / "adapter")
        exported = tmp_path / "lora.safetensors"
        export_adapter(adapted["adapter"], exported, to="lora", rank=2)
        merged = merge_adapter(adapted["adapter"], str(adapted["base"]), tmp_path / "merged")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "adapter" / "superlora_weights.safetensors") == 0o640
    assert mode(exported) == 0o640
    assert mode(merged) == 0o750
