"""diffusers integration: targets, once-per-forward ΔW, the verbs, the file format, and diffusers' traps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import generate, tiny_pipeline

from superlora_diffusers import SuperLoRAConfig, SuperLoRAFileError, find_targets
from superlora_diffusers.components import find_generators, inject_superlora

TUCKER = SuperLoRAConfig.lorta(fold=3, groups=2, rank=3, target_modules="unet+text")


def add_random_adapter(pipe, config: SuperLoRAConfig = TUCKER, seed: int = 0, name: str = "default", std: float = 0.3):
    """Inject a SuperLoRA and give it non-zero factors, as if trained."""
    module = inject_superlora(pipe._superlora_components(), config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def saved_adapter(tmp_path):
    pipe = tiny_pipeline()
    add_random_adapter(pipe)
    out = tmp_path / "adapter"
    pipe.save_superlora_weights(out, metadata={"instance_prompt": "a photo of sks star"})
    return out, generate(pipe)


# ---- targets ------------------------------------------------------------------------------------
def test_target_presets_and_patterns(pipe):
    comps = pipe._superlora_components()
    unet = find_targets(comps, "unet")
    assert len(unet) == 32 and all(t.name.startswith("unet.") for t in unet)
    assert {t.name.rsplit(".", 1)[-1] for t in unet} == {"to_q", "to_k", "to_v", "0"}
    cross = find_targets(comps, "unet-cross")
    assert len(cross) == 16 and all(".attn2." in t.name for t in cross)
    text = find_targets(comps, "text")
    assert len(text) == 8 and all(t.name.startswith("text_encoder.") for t in text)
    both = find_targets(comps, "unet+text")
    assert [t.name for t in both] == [t.name for t in unet] + [t.name for t in text]  # deterministic order
    conv = find_targets(comps, "unet+conv")
    assert [t.name for t in find_targets(comps, "unet+conv+text")] == [t.name for t in conv] + [t.name for t in text]
    suffix = find_targets(comps, ["to_q"])
    assert len(suffix) == 8 and all(t.name.endswith(".to_q") for t in suffix)
    regex = find_targets(comps, [r"unet\..*attn2\.to_(k|v)"])
    assert len(regex) == 8 and regex[0].shape == (32, 32)
    with pytest.raises(ValueError, match="matches no linear or conv layer"):
        find_targets(comps, ["nothing_like_this"])
    with pytest.raises(ValueError, match="not a preset"):
        find_targets(comps, "everything")


# ---- the shared ΔW, generated once per forward ------------------------------------------------------
def test_delta_is_generated_once_per_pipeline_call_and_per_training_forward(pipe):
    model = add_random_adapter(pipe)
    model.generations = 0
    generate(pipe, steps=3)  # CFG: 3 UNet forwards on a batch of 2, plus the text encoder
    assert model.generations == 1
    generate(pipe, steps=3)  # nothing changed: the cache still holds
    assert model.generations == 1

    unet = pipe.unet
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    model.generations = 0
    loss = unet(sample, 10, hidden).sample.square().mean() + unet(sample, 20, hidden).sample.square().mean()
    assert model.generations == 2  # with autograd: one fresh generation per model forward, not per layer
    loss.backward()
    adapter = model
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    with torch.no_grad():
        next(adapter.parameters()).add_(0.1)  # an optimizer step changes the factors: the cache must notice
    model.generations = 0
    generate(pipe, steps=2)
    assert model.generations == 1


@pytest.mark.parametrize("config", [
    SuperLoRAConfig.lora(rank=3, alpha=6, target_modules="unet+conv+text"),
    SuperLoRAConfig(factorization="tucker", fold=3, groups="shape", rank=3, target_modules="unet+conv+text"),
    SuperLoRAConfig(factorization="tucker", fold=3, groups="shape", rank=3, kernel_axis=True, share_axes=True,
                    target_modules="unet+conv+text"),
], ids=["lora", "tucker-axes", "tucker-axes-shared"])
def test_factored_layouts_train_on_their_factors_exactly_as_through_dense_delta(pipe, config):
    """With autograd, the LoRA preset's layers compute x·Aᵀ·Bᵀ (peft's cost), and groups="shape" ones
    x·U_in·C_lᵀ·U_outᵀ: same outputs and gradients as W + ΔW, convs and CLIP included."""
    module = model = add_random_adapter(pipe, config)
    assert all(module.low_rank(i) is not None for i in range(len(module.shapes)))
    unet, text = pipe.unet.double(), pipe.text_encoder.double()
    module.double()
    sample, ids = torch.randn(2, 4, 8, 8, dtype=torch.float64), pipe.tokenizer(["a photo of sks star"]).input_ids
    ids = torch.tensor(ids)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.zero_grad()
        out = unet(sample, 10, text(ids)[0].expand(2, -1, -1), cross_attention_kwargs={"scale": 0.7}).sample
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    model.generations = 0
    factored, factored_grads = step()
    assert model.generations == 0  # no super-vector: every ΔW stayed as its B·A
    module.low_rank = lambda index: None  # the dense path: W + ΔW with ΔW generated
    dense, dense_grads = step()
    assert model.generations == 2  # one per model forward (text encoder, UNet)
    torch.testing.assert_close(factored, dense, rtol=1e-9, atol=1e-12)
    for a, b in zip(factored_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in factored_grads)


def test_call_scale_zero_is_the_base_and_scale_interpolates(saved_adapter):
    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    pipe.load_superlora_weights(path)
    assert torch.equal(generate(pipe), adapted)
    assert torch.equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)  # UNet and text encoder
    half = generate(pipe, cross_attention_kwargs={"scale": 0.5})
    assert not torch.allclose(half, base) and not torch.allclose(half, adapted)


# ---- the verbs ----------------------------------------------------------------------------------
def test_save_load_round_trip_and_file_format(saved_adapter, tmp_path):
    path, adapted = saved_adapter
    file = path / "superlora_weights.safetensors"
    assert file.stat().st_size < 12_000  # a few hundred factors: a few KB, no projection or permutation stored
    pipe = tiny_pipeline()
    name = pipe.load_superlora_weights(path)
    assert name == "default_0"
    assert torch.equal(generate(pipe), adapted)

    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "superlora" and meta["format_version"] == "1"
    assert SuperLoRAConfig.from_dict(json.loads(meta["config"])) == TUCKER
    targets = json.loads(meta["targets"])
    assert len(targets) == 40 and targets[0][1:] == [32, 32]
    assert meta["instance_prompt"] == "a photo of sks star" and meta["library_version"]

    # state dict + metadata, and saving again refuses to overwrite unless asked
    state, metadata = pipe.superlora_state_dict(path)
    other = tiny_pipeline()
    other.load_superlora_weights(state, metadata=metadata, adapter_name="dog")
    assert torch.equal(generate(other), adapted)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save_superlora_weights(path)
    before = file.read_bytes()
    other.save_superlora_weights(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["superlora_weights.safetensors"]  # no temp files left
    assert other.superlora_state_dict(path)[0].keys() == state.keys() and len(file.read_bytes()) == len(before)


def test_info_reports_counts_bytes_and_the_lora_comparison(saved_adapter):
    path, _ = saved_adapter
    pipe = tiny_pipeline()
    pipe.load_superlora_weights(path)
    info = pipe.get_superlora_info()
    assert info["num_parameters"] == sum(p.numel() for p in find_generators(
        pipe._superlora_components())["default_0"].parameters())
    assert info["file_bytes"] == (path / "superlora_weights.safetensors").stat().st_size
    assert info["config"]["factorization"] == "tucker" and len(info["targets"]) == 40
    # r·Σ(d_out + d_in): 3 attention blocks at width 32 (8 projections of 32x32), the mid block at 64 (attn1
    # 4 x 64x64; attn2 q, out 64x64 and k, v 64x32), 8 text projections of 32x32
    assert info["lora_rank1_parameters"] == 3 * 8 * 64 + (6 * 128 + 2 * 96) + 8 * 64 == 3008
    assert info["metadata"]["instance_prompt"] == "a photo of sks star"


def _base_weights(pipe) -> dict[str, torch.Tensor]:
    """The UNet's and text encoder's own weights by their plain names (peft wrappers' `base_layer` removed)."""
    state = {**pipe.unet.state_dict(), **{f"text.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "superlora_" not in k}


def test_fuse_unfuse_and_unload_restore_the_base_bit_for_bit(saved_adapter):
    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    originals = {k: v.clone() for k, v in _base_weights(pipe).items()}
    pipe.load_superlora_weights(path)
    pipe.fuse_superlora()
    torch.testing.assert_close(generate(pipe), adapted, atol=1e-5, rtol=1e-4)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(_base_weights(pipe)[key], originals[key])
    with pytest.raises(ValueError, match="already fused"):
        pipe.fuse_superlora()
    pipe.unfuse_superlora()
    now = _base_weights(pipe)
    assert now.keys() == originals.keys() and all(torch.equal(now[k], v) for k, v in originals.items())
    assert torch.equal(generate(pipe), adapted)
    pipe.fuse_superlora(scale=0.5)
    pipe.unload_superlora_weights()  # unloading a fused adapter unfuses it first
    now = {**pipe.unet.state_dict(), **{f"text.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    assert now.keys() == originals.keys() and all(torch.equal(now[k], v) for k, v in originals.items())
    assert torch.equal(generate(pipe), base)
    assert pipe.get_list_superlora_adapters() == []
    assert type(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    assert not hasattr(pipe.unet, "peft_config") and not hasattr(pipe.unet, "superlora_generator")


def test_disable_enable(saved_adapter):
    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    pipe.load_superlora_weights(path)
    pipe.disable_superlora()
    assert torch.equal(generate(pipe), base)
    pipe.enable_superlora()
    assert torch.equal(generate(pipe), adapted)


def test_several_named_adapters_mix_with_weights(tmp_path):
    pipe = tiny_pipeline()
    a = add_random_adapter(pipe, seed=1, name="a")
    b = add_random_adapter(pipe, SuperLoRAConfig.lora(rank=2, target_modules="unet-cross"), seed=2, name="b", std=0.2)
    assert pipe.get_active_superlora_adapters() == {"a": 1.0, "b": 1.0}
    pipe.set_superlora_adapters(["a", "b"], [0.7, 0.4])
    with torch.no_grad():
        da, db = a(), b()
        layer = pipe.unet.get_submodule(b.targets[0].split(".", 1)[1])  # a cross-attention layer: both adapters
        expected = 0.7 * da[layer.superlora_slot["a"]] + 0.4 * db[0]
        torch.testing.assert_close(layer.get_delta_weight("a") + layer.get_delta_weight("b"), expected)
        only_a = pipe.unet.get_submodule(a.targets[0].split(".", 1)[1])  # a self-attention layer: adapter a only
        assert set(only_a.superlora_slot) == {"a"}
        torch.testing.assert_close(only_a.get_delta_weight("a"), 0.7 * da[0])
    mixed = generate(pipe)
    pipe.set_superlora_adapters("a")
    only = generate(pipe)
    assert not torch.allclose(mixed, only)
    pipe.delete_superlora_adapters("b")
    assert pipe.get_list_superlora_adapters() == ["a"] and torch.equal(generate(pipe), only)
    with pytest.raises(ValueError, match="no SuperLoRA adapter named 'b'"):
        pipe.set_superlora_adapters(["b"])


def test_per_component_weights_split_unet_and_text_encoder_strengths():
    """diffusers' set_adapters convention: a dict per component (ComfyUI's strength_model / strength_clip)."""
    from test_tokens import encode, token_config

    pipe = tiny_pipeline()
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)

    def unet_out() -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(sample, 10, hidden).sample

    base_text, base_unet, base_image = encode(pipe, "a photo of sks star"), unet_out(), generate(pipe)
    add_random_adapter(pipe, token_config(pipe), std=0.1, name="a")  # UNet + CLIP ΔW and the word's offsets
    full_text, full_unet, full_image = encode(pipe, "a photo of sks star"), unet_out(), generate(pipe)

    pipe.set_superlora_adapters("a", {"unet": 0.0, "text_encoder": 1.0})
    assert pipe.get_active_superlora_adapters() == {"a": {"unet": 0.0, "text_encoder": 1.0}}
    assert torch.equal(unet_out(), base_unet) and torch.equal(encode(pipe, "a photo of sks star"), full_text)
    text_only = generate(pipe)
    assert not torch.allclose(text_only, base_image) and not torch.allclose(text_only, full_image)

    pipe.set_superlora_adapters(["a"], [{"text_encoder": 0.0}])  # the UNet's weight defaults to 1.0
    assert torch.equal(encode(pipe, "a photo of sks star"), base_text) and torch.equal(unet_out(), full_unet)

    pipe.set_superlora_adapters("a", {"unet": 0.5, "text_encoder": 0.5})  # a dict of equal weights = that float
    half = generate(pipe)
    pipe.set_superlora_adapters("a", 0.5)
    assert torch.equal(generate(pipe), half)

    pipe.set_superlora_adapters("a", {"unet": 0.3, "text_encoder": 0.8})
    split = generate(pipe)
    pipe.fuse_superlora()  # fusing bakes each component's own weight (and the text weight into the offsets)
    torch.testing.assert_close(generate(pipe), split, atol=1e-5, rtol=1e-4)
    pipe.unfuse_superlora()
    with pytest.raises(ValueError, match="unknown component 'vae'.*'unet', 'text_encoder'"):
        pipe.set_superlora_adapters("a", {"unet": 1.0, "vae": 0.5})
    assert pipe.get_active_superlora_adapters() == {"a": {"unet": 0.3, "text_encoder": 0.8}}  # refused: unchanged


# ---- diffusers' historical traps ------------------------------------------------------------------
def test_attention_processor_swaps_keep_the_adapter(saved_adapter):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    pipe.load_superlora_weights(path)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(generate(pipe), adapted)
    pipe.unet.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(generate(pipe), adapted, atol=1e-5, rtol=1e-4)
    pipe.enable_attention_slicing(1)
    out = generate(pipe)
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-4)
    assert (out - base).abs().max() > 1e-3


def test_fused_qkv_projections_raise_instead_of_dropping_the_adapter(saved_adapter):
    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    pipe.load_superlora_weights(path)
    pipe.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="fuse_superlora"):
        generate(pipe)
    pipe.unfuse_qkv_projections()
    assert torch.equal(generate(pipe), adapted)
    # fusing the SuperLoRA first bakes it into the weights that fuse_qkv_projections concatenates
    pipe.fuse_superlora()
    pipe.fuse_qkv_projections()
    torch.testing.assert_close(generate(pipe), adapted, atol=1e-4, rtol=1e-3)
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        pipe.unfuse_superlora()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA (run on the GPU machine)")
def test_xformers_keeps_the_adapter(saved_adapter):
    path, adapted = saved_adapter
    pipe = tiny_pipeline().to("cuda")
    pipe.load_superlora_weights(path)
    ref = generate(pipe)
    pipe.enable_xformers_memory_efficient_attention()
    torch.testing.assert_close(generate(pipe), ref, atol=1e-3, rtol=1e-3)


def test_a_peft_lora_works_side_by_side(saved_adapter):
    from superlora_diffusers.export import to_lora_state_dict

    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    g = torch.Generator().manual_seed(5)
    deltas = {t.name: torch.randn(t.shape, generator=g) * 0.05 for t in find_targets(pipe._superlora_components(), "unet")}
    lora_sd, _ = to_lora_state_dict(deltas, rank=2)
    pipe.load_lora_weights(lora_sd, adapter_name="plain")
    lora_only = generate(pipe)
    pipe.load_superlora_weights(path)
    both = generate(pipe)
    assert not torch.allclose(both, lora_only) and not torch.allclose(both, adapted)
    pipe.unload_superlora_weights()
    assert torch.equal(generate(pipe), lora_only)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base)

    # the other order: SuperLoRA first, then the LoRA wraps the already adapted layers
    pipe.load_superlora_weights(path)
    pipe.load_lora_weights(lora_sd, adapter_name="plain")
    torch.testing.assert_close(generate(pipe), both, atol=1e-5, rtol=1e-4)


def test_lora_preset_equals_the_equivalent_peft_lora():
    config = SuperLoRAConfig.lora(rank=2, target_modules="unet")
    pipe = tiny_pipeline()
    module = add_random_adapter(pipe, config, seed=3, std=0.2)
    ours = generate(pipe)
    state = {}
    for i, name in enumerate(module.targets):
        state[f"{name}.lora_A.weight"] = module.blocks[i].lora_A[0].detach().clone()
        state[f"{name}.lora_B.weight"] = module.blocks[i].lora_B[0].detach().clone()
    reference = tiny_pipeline()
    reference.load_lora_weights(state, adapter_name="peft")
    torch.testing.assert_close(generate(reference), ours, atol=1e-5, rtol=1e-4)


# ---- bad input: one clear line, pipeline untouched -----------------------------------------------
def _unchanged(pipe, base):
    assert not pipe.get_list_superlora_adapters() and not hasattr(pipe.unet, "peft_config")
    assert torch.equal(generate(pipe), base)


def test_wrong_base_model_names_the_module_and_both_shapes(saved_adapter):
    from conftest import tiny_components
    from diffusers import StableDiffusionPipeline

    path, _ = saved_adapter
    other = StableDiffusionPipeline(**tiny_components(cross_attention_dim=48))
    other.set_progress_bar_config(disable=True)
    base = generate(other)
    with pytest.raises(SuperLoRAFileError, match=r"another base model: unet\..*attn2\.to_k is 32x48 here but 32x32 in the file"):
        other.load_superlora_weights(path)
    _unchanged(other, base)


def test_bad_files_are_refused_before_touching_the_pipeline(saved_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = saved_adapter
    file = path / "superlora_weights.safetensors"
    pipe = tiny_pipeline()
    base = generate(pipe)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(SuperLoRAFileError, match="truncated or corrupt"):
        pipe.load_superlora_weights(truncated)

    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)}, str(lora))
    with pytest.raises(SuperLoRAFileError, match="load_lora_weights"):
        pipe.load_superlora_weights(lora)

    state = load_file(str(file))
    state_dict, meta = pipe.superlora_state_dict(path)
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with pytest.raises(SuperLoRAFileError, match="no SuperLoRA header"):
        pipe.load_superlora_weights(plain)

    newer = tmp_path / "newer.safetensors"
    save_file(state, str(newer), metadata={**meta, "format_version": "99"})
    with pytest.raises(SuperLoRAFileError, match="newer than this library"):
        pipe.load_superlora_weights(newer)

    damaged = tmp_path / "damaged.safetensors"
    save_file({k: v[..., :1].contiguous() for k, v in state.items()}, str(damaged), metadata=meta)
    with pytest.raises(SuperLoRAFileError, match="damaged"):
        pipe.load_superlora_weights(damaged)

    with pytest.raises(SuperLoRAFileError, match="not found"):
        pipe.load_superlora_weights(tmp_path / "missing" / "x.safetensors")
    with pytest.raises(SuperLoRAFileError, match="metadata="):
        pipe.load_superlora_weights(state_dict)
    _unchanged(pipe, base)

    with pytest.raises(ValueError, match="cannot be used.*no '.'"):
        pipe.load_superlora_weights(path, adapter_name="dog.v2")
    _unchanged(pipe, base)
    pipe.load_superlora_weights(path, adapter_name="dog")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_superlora_weights(path, adapter_name="dog")
    assert pipe.get_list_superlora_adapters() == ["dog"]


def test_text_encoder_paths_from_transformers_4_still_load(saved_adapter, tmp_path):
    """transformers 4 named CLIP layers `text_model.encoder...`, transformers 5 `encoder...`: both must load."""
    from safetensors.torch import save_file

    from superlora_diffusers.targets import fingerprint

    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    state, meta = pipe.superlora_state_dict(path)
    targets = json.loads(meta["targets"])
    renamed = [[n.replace("text_encoder.", "text_encoder.text_model.", 1) if n.startswith("text_encoder.") else n, o, i]
               for n, o, i in targets]
    assert renamed != targets
    meta = {**meta, "targets": json.dumps(renamed),
            "base_fingerprint": fingerprint([(n, (o, i)) for n, o, i in renamed])}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    pipe.load_superlora_weights(tmp_path / "old.safetensors")
    assert torch.equal(generate(pipe), adapted)


def test_conv_targets_adapt_resnet_kernels_locon_style(tmp_path):
    """"unet+conv": ResNet conv1/conv2 kernels are adapted as (d_out, d_in·k·k) matrices of the same super-vector."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from superlora_diffusers.export import export_adapter, kohya_key

    pipe = tiny_pipeline()
    base = generate(pipe)
    targets = find_targets(pipe._superlora_components(), "unet+conv")
    convs = [t for t in targets if t.kernel_size is not None]
    assert convs and all(".resnets." in t.name and t.name.endswith(("conv1", "conv2")) for t in convs)
    assert len(targets) == len(find_targets(pipe._superlora_components(), "unet")) + len(convs)
    conv = convs[0].module
    assert convs[0].shape == (conv.out_channels, conv.in_channels * 9)
    module = add_random_adapter(pipe, SuperLoRAConfig.lorta(fold=3, groups=2, rank=3, target_modules="unet+conv"), std=0.2)
    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad():
        delta = module()[[t.name for t in targets].index(convs[0].name)]
        expected = F.conv2d(x, conv.weight + delta.view(conv.weight.shape), conv.bias, padding=conv.padding)
        torch.testing.assert_close(pipe.unet.get_submodule(convs[0].name.split(".", 1)[1])(x), expected)
    adapted = generate(pipe)
    assert (adapted - base).abs().max() > 1e-3
    pipe.save_superlora_weights(tmp_path / "adapter")
    fresh = tiny_pipeline()
    fresh.load_superlora_weights(tmp_path / "adapter")
    torch.testing.assert_close(generate(fresh), adapted)
    fresh.fuse_superlora()
    torch.testing.assert_close(generate(fresh), adapted, atol=1e-5, rtol=1e-4)
    fresh.unload_superlora_weights()
    assert torch.equal(generate(fresh), base)
    # exports keep the kernel shape: .diff is the full kernel, LoRA is a k×k down and a 1×1 up (peft / kohya)
    export_adapter(tmp_path / "adapter", tmp_path / "diff.safetensors", to="diff")
    diff = load_file(tmp_path / "diff.safetensors")[f"{kohya_key(convs[0].name)}.diff"]
    assert diff.shape == conv.weight.shape
    export_adapter(tmp_path / "adapter", tmp_path / "lora" / "pytorch_lora_weights.safetensors", to="lora", rank=64)
    lora = tiny_pipeline()
    lora.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(generate(lora), adapted, atol=1e-4, rtol=0)


def test_hotswap_replaces_the_factors_in_place(tmp_path):
    """diffusers' `hotswap=True`: the same adapter (same tensors, same weight) takes another file's values."""
    paths = {}
    for seed in (0, 1):
        source = tiny_pipeline()
        add_random_adapter(source, seed=seed)
        paths[seed] = source.save_superlora_weights(tmp_path / f"a{seed}")
        paths[f"images{seed}"] = generate(source)
    pipe = tiny_pipeline()
    pipe.load_superlora_weights(paths[0], adapter_name="star")
    pipe.set_superlora_adapters("star", 0.5)
    module = find_generators(pipe._superlora_components())["star"]
    pointers = [p.data_ptr() for p in module.parameters()]
    half = generate(pipe)  # caches ΔW at inference: the swap must invalidate it
    assert pipe.load_superlora_weights(paths[1], adapter_name="star", hotswap=True) == "star"
    assert [p.data_ptr() for p in module.parameters()] == pointers and pipe.get_active_superlora_adapters() == {"star": 0.5}
    assert not torch.equal(generate(pipe), half)  # the cached ΔW of the old factors is not reused
    pipe.set_superlora_adapters("star", 1.0)
    torch.testing.assert_close(generate(pipe), paths["images1"], rtol=0, atol=1e-6)
    other = tiny_pipeline()
    add_random_adapter(other, SuperLoRAConfig.lorta(fold=3, groups=1, rank=2, target_modules="unet"))
    other_path = other.save_superlora_weights(tmp_path / "other")
    with pytest.raises(SuperLoRAFileError, match="another layout than adapter 'star'"):
        pipe.load_superlora_weights(other_path, adapter_name="star", hotswap=True)
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        pipe.load_superlora_weights(paths[0], adapter_name="nope", hotswap=True)
    with pytest.raises(ValueError, match="pass its adapter_name"):
        pipe.load_superlora_weights(paths[0], hotswap=True)
    torch.testing.assert_close(generate(pipe), paths["images1"], rtol=0, atol=1e-6)  # refusals changed nothing


# ---- diffusers' own verbs on a loaded adapter file (issue 22) ----------------------------------------------
def test_diffusers_verbs_drive_a_loaded_superlora_beside_a_peft_lora(saved_adapter):
    """A file loaded with load_superlora_weights is a peft adapter of the UNet and of CLIP: diffusers' verbs list,
    mix, disable and delete it next to a LoRA, and its parameters live once, in the UNet's module tree."""
    from superlora_diffusers.export import to_lora_state_dict

    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    pipe.load_superlora_weights(path, adapter_name="star")
    assert pipe.get_list_adapters() == {"unet": ["star"], "text_encoder": ["star"]}
    assert pipe.get_active_adapters() == ["star"]
    generator = find_generators(pipe._superlora_components())["star"]
    unet_params = {id(p) for p in pipe.unet.parameters()}
    assert all(id(p) in unet_params for p in generator.parameters())  # owned by the UNet: .to(), DDP, state_dict
    assert not any("superlora_generator" in k for k in pipe.text_encoder.state_dict())  # CLIP only reads it

    g = torch.Generator().manual_seed(5)
    deltas = {t.name: torch.randn(t.shape, generator=g) * 0.05 for t in find_targets(pipe._superlora_components(), "unet")}
    pipe.load_lora_weights(to_lora_state_dict(deltas, rank=2)[0], adapter_name="plain")
    pipe.set_adapters(["star", "plain"], [1.0, 0.0])
    torch.testing.assert_close(generate(pipe), adapted, atol=1e-6, rtol=0)
    pipe.set_adapters(["star", "plain"], [0.5, 1.0])
    assert pipe.get_active_superlora_adapters() == {"star": 0.5}
    mixed = generate(pipe)
    pipe.set_adapters("plain")
    lora_only = generate(pipe)
    assert not torch.allclose(mixed, lora_only) and not torch.allclose(lora_only, base)
    pipe.set_adapters(["star", "plain"], [1.0, 1.0])
    pipe.disable_lora()
    assert torch.equal(generate(pipe), base)
    pipe.enable_lora()
    pipe.delete_adapters("star")
    assert pipe.get_list_superlora_adapters() == [] and torch.equal(generate(pipe), lora_only)
    assert not any("superlora" in k for k in pipe.unet.state_dict())


def test_from_pipe_pipelines_share_the_adapter_and_its_call_scale(saved_adapter):
    """img2img made with from_pipe shares the adapted UNet and CLIP: its verbs see the adapter, and the call-time
    scale reaches its text encoder (diffusers scales peft layers in encode_prompt; no per-instance wrapper)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from test_tokens import encode

    path, _ = saved_adapter
    pipe = tiny_pipeline()
    base_text = encode(pipe, "a photo of sks star")
    pipe.load_superlora_weights(path, adapter_name="star")
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert other.get_list_superlora_adapters() == ["star"]
    adapted_text = encode(other, "a photo of sks star")
    assert not torch.allclose(adapted_text, base_text)
    assert torch.equal(encode(other, "a photo of sks star", lora_scale=0.0), base_text)
    other.set_superlora_adapters("star", {"unet": 1.0, "text_encoder": 0.0})
    assert torch.equal(encode(pipe, "a photo of sks star"), base_text)  # one adapter, seen from both pipelines


def test_diffusers_unload_lora_weights_also_drops_a_superlora(saved_adapter):
    """diffusers' unload_lora_weights swaps peft layers out without deleting adapters; the generator notices at the
    next forward and leaves the UNet's tree, so nothing of it stays in state_dict or in the hooks."""
    path, adapted = saved_adapter
    pipe = tiny_pipeline()
    base = generate(pipe)
    pipe.load_superlora_weights(path, adapter_name="star")
    assert torch.equal(generate(pipe), adapted)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base)
    assert not any("superlora" in k for k in pipe.unet.state_dict())
    assert not pipe.unet._forward_pre_hooks and not pipe.text_encoder._forward_pre_hooks
    pipe.load_superlora_weights(path, adapter_name="star")  # and the name is free again
    assert torch.equal(generate(pipe), adapted)


def test_sdxl_one_adapter_over_the_unet_and_both_text_encoders(tmp_path):
    """SDXL's structure: one super-vector adapts the UNet, CLIP-L and CLIP-bigG (and the word's embedding in the
    first); it saves, loads, scales to the base at 0 on every component, and diffusers' verbs list it on all three."""
    from conftest import tiny_sdxl_pipeline
    from test_tokens import token_config

    pipe = tiny_sdxl_pipeline()
    base = generate(pipe)
    config = dataclasses.replace(token_config(pipe), target_modules="unet+text")
    module = add_random_adapter(pipe, config, std=0.1)
    components = {t.split(".", 1)[0] for t in module.targets}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    adapted = generate(pipe)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    pipe.save_superlora_weights(tmp_path / "xl")
    fresh = tiny_sdxl_pipeline()
    fresh.load_superlora_weights(tmp_path / "xl", adapter_name="star")
    assert torch.equal(generate(fresh), adapted)
    assert fresh.get_list_adapters() == {"unet": ["star"], "text_encoder": ["star"], "text_encoder_2": ["star"]}
    fresh.set_superlora_adapters("star", {"unet": 1.0, "text_encoder": 0.0, "text_encoder_2": 0.0})
    text_off = generate(fresh)
    assert not torch.equal(text_off, adapted) and not torch.equal(text_off, base)
    fresh.unload_superlora_weights()
    assert torch.equal(generate(fresh), base)
