"""groups="shape": each shape's weights Tucker-factored along (layer, d_out, d_in), trained on its factors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import generate, tiny_pipeline
from test_pipeline import add_random_adapter

from superlora_diffusers import SuperLoRA, SuperLoRAConfig, count_parameters

SHAPES = [(8, 6), (8, 6), (4, 6), (8, 6), (3, 5), (4, 6)]


def axes_config(rank: int = 2, **kw) -> SuperLoRAConfig:
    return SuperLoRAConfig(factorization="tucker", fold=3, groups="shape", rank=rank, **kw)


def test_count_is_per_distinct_shape_and_ranks_are_capped_at_each_axis():
    # (8, 6) x3: core 2x2x2 + layer 3x2 + out 8x2 + in 6x2; (4, 6) x2; (3, 5) x1: layer rank capped at 1
    expected = (8 + 6 + 16 + 12) + (8 + 4 + 8 + 12) + (1 * 2 * 2 + 1 + 6 + 10)
    module = SuperLoRA(axes_config(rank=2), SHAPES)
    assert count_parameters(axes_config(rank=2), SHAPES) == module.num_parameters() == expected
    assert module.axes.groups[2].core.shape == (1, 2, 2)
    # a shape group pays for its factors once: adding two more (8, 6) weights costs only their layer rows
    assert count_parameters(axes_config(rank=2), SHAPES + [(8, 6), (8, 6)]) == expected + 2 * 2


def randomised_deltas(module: SuperLoRA, shapes) -> list[torch.Tensor]:
    """Checks ΔW = 0 at init, then fills every factor with noise and checks each layer's (B, A) gives its ΔW."""
    assert all(d.abs().max() == 0 for d in module())
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    deltas = module()
    for i, shape in enumerate(shapes):
        b, a = module.low_rank(i)
        assert deltas[i].shape == shape
        torch.testing.assert_close(b @ a, deltas[i], rtol=1e-5, atol=1e-5)
    return deltas


def test_zero_at_init_and_factors_reproduce_every_delta():
    torch.manual_seed(0)
    module = SuperLoRA(axes_config(rank=3, alpha=6.0), SHAPES)
    deltas = randomised_deltas(module, SHAPES)
    # the same U_out / U_in serve every weight of a shape: their ΔW share column and row spaces
    stacked = torch.cat([deltas[0], deltas[1], deltas[3]], dim=1)
    assert torch.linalg.matrix_rank(stacked) <= 3


def test_gain_makes_one_core_step_as_large_as_a_lora_step():
    """γ = sqrt(L·d_out / (3·r_i·r_l)) with orthonormal factors: a unit step on every core entry moves the
    group's ΔW by sqrt(L·d_out·r_o / 3), what a unit step on every B entry of a rank-r_o LoRA moves it."""
    torch.manual_seed(0)
    shapes = [(64, 48)] * 5
    module = SuperLoRA(axes_config(rank=4), shapes)
    group = module.axes.groups[0]
    for factor in (group.factor_out, group.factor_in, group.factor_layer):
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1]), atol=1e-5, rtol=0)
    with torch.no_grad():
        group.core.fill_(1.0)
    with torch.no_grad():
        moved = torch.stack(module()).norm().item()
    # orthonormal factors: ||ΔW|| = γ·||core|| exactly, and ||core|| = sqrt(4·4·4)
    assert math.isclose(moved, math.sqrt(5 * 64 / (3 * 4 * 4)) * 8, rel_tol=1e-4)
    assert math.isclose(moved, math.sqrt(5 * 64 * 4 / 3), rel_tol=1e-4)


@pytest.mark.parametrize("kw", [dict(factorization="lora", fold=2), dict(fold=4), dict(shuffle=True),
                                dict(fold_shape=(2, 2, 2))])
def test_config_refuses_what_would_fold_or_mix_the_axes(kw):
    args = {"factorization": "tucker", "fold": 3, "groups": "shape", "rank": 2, **kw}
    with pytest.raises(ValueError, match="groups='shape'"):
        SuperLoRAConfig(**args)


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline()
    add_random_adapter(pipe, axes_config(rank=2, target_modules="unet+text"), std=0.1)
    adapted = generate(pipe)
    pipe.save_superlora_weights(tmp_path / "a")
    fresh = tiny_pipeline()
    fresh.load_superlora_weights(tmp_path / "a")
    assert torch.equal(generate(fresh), adapted)
    assert fresh.get_superlora_info()["config"]["groups"] == "shape"


CONV_SHAPES = [(8, 16 * 9), (8, 16 * 9), (4, 4), (8, 4 * 9)]
KERNELS = [9, 9, 1, 9]  # k_h·k_w per weight: three 3x3 convs and a Linear


def test_kernel_axis_factors_a_convs_kernel_apart():
    """kernel_axis: (L, d_out, c_in, k) Tucker per conv shape; U_c ⊗ U_k stays orthonormal and ΔW starts at 0."""
    config = axes_config(rank=2, kernel_axis=True)
    torch.manual_seed(0)
    module = SuperLoRA(config, CONV_SHAPES, KERNELS)
    # (8, 144) x2: core 2x2x2x2, layer 2x2, out 8x2, c_in 16x2, kernel 9x2; (4, 4): as before; (8, 36): 1 layer
    expected = (16 + 4 + 16 + 32 + 18) + (1 * 2 * 2 + 1 + 8 + 8) + (8 + 1 + 16 + 8 + 18)
    assert count_parameters(config, CONV_SHAPES, KERNELS) == module.num_parameters() == expected
    assert count_parameters(axes_config(rank=2), CONV_SHAPES, KERNELS) == count_parameters(axes_config(rank=2), CONV_SHAPES)
    group, factors = module.axes.groups[0], module.axes.factors()[0]
    u_in = torch.kron(factors.bases[1], factors.bases[2])
    torch.testing.assert_close(u_in.T @ u_in, torch.eye(4), atol=1e-5, rtol=0)
    deltas = randomised_deltas(module, CONV_SHAPES)
    # the flattened d_in is (c_in, k_h·k_w) row-major, as a conv weight (d_out, c_in, k_h, k_w) flattens
    core = torch.einsum("k,kabc->abc", group.factor_layer[1], group.core) * group.gain
    kernel = torch.einsum("oa,abc,ib,jc->oij", group.factor_out, core, group.factor_in, group.factor_kernel)
    torch.testing.assert_close(deltas[1].reshape(8, 16, 9), kernel, rtol=1e-5, atol=1e-5)


def test_kernel_axis_needs_the_axes_layout():
    with pytest.raises(ValueError, match="kernel_axis splits a conv's kernel off in the axes layout; set groups='shape'"):
        SuperLoRAConfig(factorization="tucker", fold=3, groups=4, rank=2, kernel_axis=True)
    assert "kernel_axis" not in axes_config().to_dict()  # files without it stay readable by older releases
    assert SuperLoRAConfig.from_dict(axes_config(kernel_axis=True).to_dict()).kernel_axis


@pytest.mark.parametrize("option, baseline", [("kernel_axis", {}), ("share_axes", {"kernel_axis": True})])
def test_axes_options_shrink_the_adapter_and_round_trip_through_the_file(tmp_path, option, baseline):
    """kernel_axis splits the convs' kernels off, share_axes shares the bases across shapes: fewer parameters,
    and a saved file brings the option back (load, generate bit for bit)."""
    pipe = tiny_pipeline()
    add_random_adapter(pipe, axes_config(rank=2, **baseline, **{option: True}, target_modules="unet+conv+text"), std=0.1)
    plain = tiny_pipeline()
    add_random_adapter(plain, axes_config(rank=2, **baseline, target_modules="unet+conv+text"), std=0.1)
    assert pipe.get_superlora_info()["num_parameters"] < plain.get_superlora_info()["num_parameters"]
    adapted = generate(pipe)
    pipe.save_superlora_weights(tmp_path / "a")
    fresh = tiny_pipeline()
    fresh.load_superlora_weights(tmp_path / "a")
    assert torch.equal(generate(fresh), adapted)
    assert fresh.get_superlora_info()["config"][option] is True


def test_share_axes_gives_each_axis_length_one_basis():
    """share_axes: shapes with equal d_out (or c_in, or kernel) read one basis; a shape owns its core and layer factor."""
    config = axes_config(rank=2, kernel_axis=True, share_axes=True)
    torch.manual_seed(0)
    module = SuperLoRA(config, CONV_SHAPES, KERNELS)
    # groups (8, 16, 9) x2, (4, 4) x1, (8, 4, 9) x1: cores 16 + 1·2·2 + 1·2·2·2, layers 4 + 1 + 1;
    # bases out_8, in_16, kernel_9, out_4, in_4 (shared by (4, 4)'s d_in and (8, 36)'s c_in): 16 + 32 + 18 + 8 + 8
    expected = (16 + 4 + 8) + (4 + 1 + 1) + (16 + 32 + 18 + 8 + 8)
    assert count_parameters(config, CONV_SHAPES, KERNELS) == module.num_parameters() == expected
    assert sorted(module.axes.bases) == ["in_16", "in_4", "kernel_9", "out_4", "out_8"]
    assert not hasattr(module.axes.groups[0], "factor_out")
    deltas = randomised_deltas(module, CONV_SHAPES)
    # the (8, 144) and (8, 36) convs are different shapes but share U_out: their ΔW share one column space
    stacked = torch.cat([deltas[0], deltas[1], deltas[3]], dim=1)
    assert torch.linalg.matrix_rank(stacked) <= 2
    # gradients reach a shared basis from every shape that reads it
    torch.stack([d.sum() for d in module()]).sum().backward()
    assert module.axes.bases["out_8"].grad.abs().sum() > 0 and module.axes.bases["in_4"].grad.abs().sum() > 0


def test_share_axes_needs_the_axes_layout():
    with pytest.raises(ValueError, match="share_axes shares the bases of the axes layout; set groups='shape'"):
        SuperLoRAConfig(factorization="tucker", fold=3, groups=4, rank=2, share_axes=True)
    assert "share_axes" not in axes_config().to_dict()  # files without it stay readable by older releases


def projected_config(projection: str = "fastfood", **kw) -> SuperLoRAConfig:
    return axes_config(rank=2, kernel_axis=True, share_axes=True, projection=projection, projection_ratio=0.25, **kw)


@pytest.mark.parametrize("projection", ["fastfood", "isometric"])
def test_projection_trains_one_vector_that_moves_every_factor(projection):
    """With a projection the factors are θ0 + F·v: v (ρ·N entries) is the one parameter; θ0 and F come from
    projection_seed alone, so two builds under different global seeds agree and a file needs only v."""
    config = projected_config()
    plain = count_parameters(axes_config(rank=2, kernel_axis=True, share_axes=True), CONV_SHAPES, KERNELS)
    torch.manual_seed(1)
    module = SuperLoRA(config, CONV_SHAPES, KERNELS)
    assert [name for name, _ in module.named_parameters()] == ["axes.vector"]
    assert count_parameters(config, CONV_SHAPES, KERNELS) == module.num_parameters() == math.ceil(plain / 4)
    assert module.zero_initialised() == []  # no zero-initialised factor for LoRA+ to single out
    torch.manual_seed(2)
    again = SuperLoRA(config, CONV_SHAPES, KERNELS)
    assert torch.equal(again.axes.theta0, module.axes.theta0) and "axes.theta0" not in module.state_dict()
    deltas = randomised_deltas(module, CONV_SHAPES)  # ΔW = 0 at init; each layer's (B, A) gives its ΔW
    again.load_state_dict(module.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again(), deltas))
    # v spans every factor: cores, layer factors and the shared bases all left θ0 (a fresh build, v = 0)
    for f, f0 in zip(module.axes.factors(), SuperLoRA(config, CONV_SHAPES, KERNELS).axes.factors()):
        assert f0.core.abs().max() == 0 and f.core.abs().min() > 0
        assert not torch.equal(f.layer, f0.layer) and not any(torch.equal(b, b0) for b, b0 in zip(f.bases, f0.bases))
    torch.stack([d.sum() for d in module()]).sum().backward()
    assert module.axes.vector.grad.abs().sum() > 0


@pytest.mark.parametrize("projection", ["fastfood", "isometric"])
def test_projected_adapter_round_trips_through_a_file_of_v_alone(tmp_path, projection):
    pipe = tiny_pipeline()
    add_random_adapter(pipe, projected_config(projection, target_modules="unet+conv+text"), std=0.1)
    adapted = generate(pipe)
    pipe.save_superlora_weights(tmp_path / "a")
    fresh = tiny_pipeline()
    fresh.load_superlora_weights(tmp_path / "a")
    assert torch.equal(generate(fresh), adapted)
    info = fresh.get_superlora_info()
    assert info["config"]["projection"] == projection and info["config"]["share_axes"] is True
    import safetensors.torch

    stored = safetensors.torch.load_file(str(tmp_path / "a" / "superlora_weights.safetensors"))
    assert [k.rsplit(".", 1)[-1] for k in stored] == ["vector"]  # the file holds v; θ0 and F are regenerated


def test_projected_factors_are_computed_once_per_training_forward():
    """Every adapted layer reads θ0 + F·v: computed once per forward of the model (as ΔW is), not per layer."""
    pipe = tiny_pipeline()
    model = add_random_adapter(pipe, projected_config(target_modules="unet+conv"), std=0.1)
    calls, factors = [], model.axes.factors
    model.axes.factors = lambda: calls.append(1) or factors()
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    loss = pipe.unet(sample, 10, hidden).sample.square().mean() + pipe.unet(sample, 20, hidden).sample.square().mean()
    assert len(calls) == 2
    loss.backward()
    assert model.axes.vector.grad.abs().sum() > 0
