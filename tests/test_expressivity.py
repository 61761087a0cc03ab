"""The expressivity fit of benchmarks/expressivity.py: it must find known optima, or its residuals mean nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_module

from superlora_diffusers import SuperLoRAConfig

NAMES = ["unet.a.attentions.0.transformer_blocks.0.attn1.to_q", "unet.a.attentions.0.transformer_blocks.0.attn2.to_k",
         "unet.a.resnets.0.conv1", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
         "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"]
SHAPES = [(12, 12), (12, 20), (12, 27), (16, 16), (16, 16)]


@pytest.fixture(scope="module")
def expressivity():
    return benchmark_module("expressivity.py", "expressivity_benchmark")


def rank2_targets() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g) * 0.01 for n, (o, i) in zip(NAMES, SHAPES)}


def test_gradient_fit_of_the_lora_layout_reaches_the_svd_optimum(expressivity):
    targets = rank2_targets()
    exact = expressivity.residuals(expressivity.svd_fit(targets, 1), targets)
    fit, n = expressivity.gradient_fit(SuperLoRAConfig.lora(rank=1), targets, steps=300, lrs=(3e-2,))
    assert n == sum(o + i for o, i in SHAPES)
    got = expressivity.residuals(fit, targets)
    assert 0.3 < exact["all"] < 0.9  # rank 1 of a rank-2 ΔW: a real residual, not 0 or 1
    assert got["all"] == pytest.approx(exact["all"], abs=2e-3)
    assert set(got) == {"all", "self-attention", "cross-attention", "resnet conv", "text encoder"}


def test_a_delta_the_layout_can_hold_is_fitted_to_zero_and_one_it_cannot_is_not(expressivity):
    torch.manual_seed(1)
    from superlora_diffusers import SuperLoRA

    config = SuperLoRAConfig(factorization="tucker", fold=3, groups="shape", rank=2)
    source = SuperLoRA(config, SHAPES)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
        targets = {n: d * 0.01 for n, d in zip(NAMES, source())}
    fit, _ = expressivity.gradient_fit(config, targets, steps=300, lrs=(3e-2,))
    assert expressivity.residuals(fit, targets)["all"] < 0.02
    cube, _ = expressivity.gradient_fit(SuperLoRAConfig.lorta(fold=3, groups=1, rank=1), targets, steps=200, lrs=(3e-2,))
    assert expressivity.residuals(cube, targets)["all"] > 0.5


def test_the_shared_bases_layout_fits_a_delta_it_can_hold_given_the_kernels(expressivity):
    """share_axes + kernel_axis: the conv (12, 27) is c_in 3 x a 3x3 kernel, its U_out shared with the attention's."""
    torch.manual_seed(2)
    from superlora_diffusers import SuperLoRA

    kernels = [1, 1, 9, 1, 1]
    config = SuperLoRAConfig(factorization="tucker", fold=3, groups="shape", rank=2, kernel_axis=True, share_axes=True)
    source = SuperLoRA(config, SHAPES, kernels)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
        targets = {n: d * 0.01 for n, d in zip(NAMES, source())}
    fit, n = expressivity.gradient_fit(config, targets, steps=300, lrs=(3e-2,), kernels=kernels)
    assert n == source.num_parameters() and expressivity.residuals(fit, targets)["all"] < 0.02


def test_layer_types_from_target_names(expressivity):
    assert [expressivity.layer_type(n) for n in NAMES] == [
        "self-attention", "cross-attention", "resnet conv", "text encoder", "text encoder"]


def test_kernels_of_a_delta_file_come_from_the_toy_layers(expressivity):
    names = ["unet.down_blocks.0.resnets.0.conv1", "text_encoder.encoder.layers.0.self_attn.q_proj"]
    assert expressivity.toy_kernels(names) == [9, 1]
    with pytest.raises(SystemExit, match="not a layer of the toy model"):
        expressivity.toy_kernels(NAMES[:1])
