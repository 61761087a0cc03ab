"""SuperLoRA as a peft tuner (`tuner.py`): diffusers' `add_adapter` and verbs, `peft.get_peft_model`, compile."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from conftest import generate, tiny_pipeline
from superlora_diffusers import SuperLoRAConfig, config_from_preset, count_parameters
from superlora_diffusers.targets import find_targets, layer_shape
from superlora_diffusers.tuner import GENERATORS, Conv2d, Linear, SharedGenerator, SuperLoRATuner

LORTA = dict(rank=2, fold=3, groups=1)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g)


def run(unet, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs(), **kwargs).sample


def generator(model, name: str = "star") -> SharedGenerator:
    return getattr(model, GENERATORS)[name]


def perturb(gen: SharedGenerator, seed: int = 1, std: float = 0.3) -> None:
    """Give every factor random values in place (the cache must notice: no .to(), no load_state_dict)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def save_unet_adapter(pipe, folder) -> str:
    """Save the UNet's `star` SuperLoRA (added with add_adapter) as an adapter file, through the pipeline verb."""
    from superlora_diffusers.serialization import WEIGHT_NAME, save_superlora_file

    gen = generator(pipe.unet)  # added to one model: its targets are that model's paths
    names = [f"unet.{key}" for key in gen.targets]
    return str(save_superlora_file(folder / WEIGHT_NAME, gen, names, overwrite=True).parent)


def first_to_q(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


# ---- config and registration ----------------------------------------------------------------------------
def test_config_is_a_registered_peft_config_with_the_file_header_unchanged():
    config = SuperLoRAConfig.lorta(**LORTA, target_modules=["to_q"])
    assert isinstance(config, peft.PeftConfig) and config.peft_type == "SUPERLORA"
    assert peft.PEFT_TYPE_TO_CONFIG_MAPPING["SUPERLORA"] is SuperLoRAConfig
    assert peft.PEFT_TYPE_TO_TUNER_MAPPING["SUPERLORA"] is SuperLoRATuner
    header = config.to_dict()  # the adapter file's header: exactly the SuperLoRA fields, no peft field
    assert list(header) == ["factorization", "rank", "alpha", "groups", "fold", "fold_shape", "shuffle", "shuffle_seed",
                            "projection", "projection_ratio", "projection_seed", "kron_splits", "kron_factor",
                            "kron_decompose_both", "target_modules", "version"]
    assert SuperLoRAConfig.from_dict(header) == config
    with pytest.raises(ValueError, match="Unknown SuperLoRA config keys"):
        SuperLoRAConfig.from_dict({**header, "peft_type": "SUPERLORA"})


# ---- (a) add_adapter on the tiny UNet ----------------------------------------------------------------------
def test_add_adapter_registers_the_factors_once_and_starts_at_the_base():
    unet = tiny_pipeline().unet
    shapes = [t.shape for t in find_targets({"unet": unet}, "unet")]
    base = run(unet)
    config = SuperLoRAConfig.lorta(**LORTA)
    unet.add_adapter(config, adapter_name="star")

    gen = generator(unet)
    assert isinstance(first_to_q(unet), Linear) and gen.shapes == shapes
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(f"{GENERATORS}.star.") for n in trainable)
    assert sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad) == count_parameters(config, shapes)
    adapter_keys = [k for k in unet.state_dict() if "superlora" in k]
    assert sorted(adapter_keys) == sorted(f"{GENERATORS}.star.{k}" for k in gen.state_dict())  # once, in one place

    assert torch.equal(run(unet), base)  # zero-initialised core: ΔW = 0 exactly
    perturb(gen)
    assert not torch.allclose(run(unet), base, atol=1e-4)


def test_peft_state_dict_round_trips_the_generator_once_under_another_adapter_name():
    unet = tiny_pipeline().unet
    config = SuperLoRAConfig.lorta(**LORTA)
    unet.add_adapter(config, "star")
    perturb(generator(unet))
    expected = run(unet)
    state = get_peft_model_state_dict(unet, adapter_name="star")  # what diffusers' save_lora_adapter writes
    assert sorted(state) == sorted(f"{GENERATORS}.{k}" for k in generator(unet).state_dict())

    other = tiny_pipeline().unet
    other.add_adapter(SuperLoRAConfig.lorta(**LORTA), "moon")
    result = set_peft_model_state_dict(other, state, adapter_name="moon")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "superlora" in k]
    torch.testing.assert_close(run(other), expected)  # the load invalidated the (empty) cache


# ---- (b) diffusers' pipeline verbs, a peft LoRA and a SuperLoRA together -----------------------------------
def test_pipeline_verbs_mix_a_peft_lora_and_a_superlora():
    pipe = tiny_pipeline()
    unet = pipe.unet
    base, base_image = run(unet), generate(pipe)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION, init_lora_weights=False), "my_lora")
    unet.add_adapter(SuperLoRAConfig.lorta(**LORTA), "star")
    perturb(generator(unet))
    assert pipe.get_list_adapters() == {"unet": ["my_lora", "star"]}

    pipe.set_adapters(["my_lora", "star"], [1.0, 0.5])
    assert pipe.get_active_adapters() == ["my_lora", "star"]
    layer = first_to_q(unet)  # SuperLoRA around peft's LoRA around the Linear
    lora = layer.base_layer
    x = torch.randn(3, layer.get_base_layer().in_features)
    with torch.no_grad():
        delta = lora.get_delta_weight("my_lora") + 0.5 * generator(unet).deltas()[layer.superlora_slot["star"]]
        expected = torch.nn.functional.linear(x, lora.get_base_layer().weight + delta, lora.get_base_layer().bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    mixed = run(unet)
    pipe.set_adapters(["my_lora", "star"], [1.0, 1.0])
    assert not torch.allclose(run(unet), mixed, atol=1e-5)
    pipe.set_adapters(["my_lora", "star"], [1.0, 0.5])

    assert torch.equal(run(unet, cross_attention_kwargs={"scale": 0.0}), base)  # call-time scale 0: the base
    pipe.set_adapters(["my_lora", "star"], [1.0, 0.5])  # diffusers resets the weights to 1.0 after a scale-0 call
    assert not torch.allclose(generate(pipe), base_image, atol=1e-4)
    assert torch.equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), base_image)
    pipe.set_adapters(["my_lora", "star"], [1.0, 0.5])  # diffusers resets the weights to 1.0 after a scale-0 call
    pipe.disable_lora()
    assert torch.equal(run(unet), base)
    pipe.enable_lora()
    torch.testing.assert_close(run(unet), mixed)

    weights = {n: p.detach().clone() for n, p in unet.named_parameters() if "base_layer" in n}
    pipe.fuse_lora(components=["unet"], adapter_names=["my_lora", "star"])
    torch.testing.assert_close(run(unet), mixed, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora(components=["unet"])
    for name, p in unet.named_parameters():  # peft's LoRA subtracts its ΔW again; the SuperLoRA puts its copy back
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(unet), mixed, atol=1e-5, rtol=1e-5)

    pipe.set_adapters("my_lora")
    lora_only = run(unet)
    pipe.delete_adapters("star")
    assert pipe.get_list_adapters() == {"unet": ["my_lora"]}
    assert not len(getattr(unet, GENERATORS)) and not any("superlora" in k for k in unet.state_dict())
    torch.testing.assert_close(run(unet), lora_only)


def test_a_peft_lora_added_after_a_superlora_wraps_it():
    unet = tiny_pipeline().unet
    unet.add_adapter(SuperLoRAConfig.lorta(**LORTA), "star")
    perturb(generator(unet))
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION, init_lora_weights=False), "my_lora")
    unet.set_adapters(["star", "my_lora"], [0.5, 1.0])
    layer = first_to_q(unet)  # peft's LoRA around the SuperLoRA around the Linear
    assert isinstance(layer.base_layer, Linear)
    base = layer.get_base_layer()
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        delta = layer.get_delta_weight("my_lora") + 0.5 * generator(unet).deltas()[layer.base_layer.superlora_slot["star"]]
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, base.weight + delta, base.bias),
                                   atol=1e-5, rtol=1e-5)


# ---- (c) torch.compile with an unfused SuperLoRA ----------------------------------------------------------
@pytest.mark.slow  # tiny model, but tracing a UNet takes ~20 s per mode on a busy CPU
@pytest.mark.parametrize("grad,how", [(False, "add_adapter"), (True, "add_adapter"), (False, "pipeline")],
                         ids=["inference", "training", "pipeline-file"])
def test_compile_fullgraph_matches_eager(grad, how, tmp_path):
    """`how="pipeline"`: an adapter file over the UNet and CLIP loaded with `load_superlora_weights` (its UNet
    hooks included), then `hotswap=True` with another file of the same layout: new values, no recompilation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_pipeline()
    unet = pipe.unet
    if how == "pipeline":
        source = tiny_pipeline()
        source.unet.add_adapter(SuperLoRAConfig.lorta(**LORTA), "star")
        files = []
        for seed in (1, 2):
            perturb(generator(source.unet), seed=seed)
            files.append(save_unet_adapter(source, tmp_path / f"a{seed}"))
        pipe.load_superlora_weights(files[0], adapter_name="star")
    else:
        unet.add_adapter(SuperLoRAConfig.lorta(**LORTA), "star")
        perturb(generator(unet))
    inputs = unet_inputs()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")  # fullgraph tracing is what is at stake
    with torch.set_grad_enabled(grad):
        eager = unet(*inputs).sample
        out = compiled(*inputs).sample
        again = compiled(*inputs).sample
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, not recompiled by the second call
    if how == "pipeline":
        pipe.load_superlora_weights(files[1], adapter_name="star", hotswap=True)
        with torch.no_grad():
            swapped, swapped_eager = compiled(*inputs).sample, unet(*inputs).sample
        assert not torch.allclose(swapped, out, atol=1e-4)
        torch.testing.assert_close(swapped, swapped_eager, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1  # the swap copied values into the same tensors
    if grad:
        out.sum().backward()
        assert all(p.grad is not None for p in generator(unet).parameters())


# ---- (d) peft.get_peft_model on a transformers ViT ---------------------------------------------------------
def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=16, patch_size=8, num_channels=3)).eval()


def test_get_peft_model_on_a_vit_trains_only_the_generator_and_round_trips(tmp_path):
    pixels = torch.randn(2, 3, 16, 16)
    config = SuperLoRAConfig.lorta(**LORTA, target_modules=["q_proj", "v_proj"])  # transformers 5 names
    model = get_peft_model(tiny_vit(), config)
    gen = generator(model.base_model.model, "default")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"base_model.model.{GENERATORS}.default.{n}" for n, _ in gen.named_parameters()]

    model.train()
    model(pixel_values=pixels).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if GENERATORS not in n)
    perturb(gen)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SUPERLORA" and saved["factorization"] == "tucker"
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(
        f"base_model.model.{GENERATORS}.{n}" for n in gen.state_dict())
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).last_hidden_state, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as peft does


# ---- (e) ΔW generated once per forward --------------------------------------------------------------------
def test_delta_is_generated_once_per_forward_and_cached_until_a_factor_changes():
    unet = tiny_pipeline().unet
    unet.add_adapter(SuperLoRAConfig.lorta(**LORTA), "star")
    gen = generator(unet)
    layers = sum(isinstance(m, Linear) for m in unet.modules())
    assert layers > 1

    unet(*unet_inputs()).sample.sum().backward()  # training: fresh, with autograd, once for all layers
    unet(*unet_inputs()).sample.sum().backward()
    assert gen.generations == 2

    optimizer = torch.optim.SGD(gen.parameters(), lr=1.0)
    optimizer.step()  # in place: the inference cache must see it
    before = gen.generations
    first = run(unet)
    run(unet)
    assert gen.generations == before + 1  # inference: cached across forwards
    with torch.no_grad():
        next(gen.parameters()).mul_(2.0)
    assert not torch.equal(run(unet), first) and gen.generations == before + 2
    unet.to(torch.float64)
    unet.to(torch.float32)
    run(unet)
    assert gen.generations == before + 3


@pytest.mark.parametrize("preset", ["lora", "tucker-axes", "tucker-axes-shared"])
def test_factored_presets_train_on_x_a_b_without_generating(preset):
    unet = tiny_pipeline().unet
    unet.add_adapter(config_from_preset(preset, rank=2), "star")
    gen = generator(unet)
    perturb(gen)
    with torch.no_grad():
        dense = unet(*unet_inputs()).sample
    factored = unet(*unet_inputs()).sample
    factored.sum().backward()
    torch.testing.assert_close(factored.detach(), dense, atol=1e-5, rtol=1e-5)
    assert gen.generations == 1  # only the no-grad forward generated ΔW


# ---- (f) a Conv2d target -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["lorta", "lora"])
def test_conv2d_targets(preset):
    unet = tiny_pipeline().unet
    base = run(unet)
    config = SuperLoRAConfig.lorta(**LORTA, target_modules="unet+conv") if preset == "lorta" else \
        SuperLoRAConfig.lora(rank=2, target_modules=r".*resnets\.\d+\.conv1")  # peft's regex-string form
    unet.add_adapter(config, "star")
    convs = [m for m in unet.modules() if isinstance(m, Conv2d)]
    assert convs and generator(unet).shapes[-1] == layer_shape(convs[-1].get_base_layer())  # (d_out, d_in·k·k)
    perturb(generator(unet))
    adapted = run(unet)
    assert not torch.allclose(adapted, base, atol=1e-4)
    trained = unet(*unet_inputs()).sample  # with grad: the lora preset's convs take x·Aᵀ·Bᵀ as two convs
    torch.testing.assert_close(trained.detach(), adapted, atol=1e-5, rtol=1e-5)
    unet.fuse_lora(adapter_names=["star"])
    torch.testing.assert_close(run(unet), adapted, atol=1e-5, rtol=1e-5)
    unet.unfuse_lora()
    torch.testing.assert_close(run(unet), adapted, atol=1e-5, rtol=1e-5)
