"""The SuperLoRA engine: counts, special cases against peft, projection, layout, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from superlora_diffusers import SuperLoRA, SuperLoRAConfig, config_from_preset, count_parameters, lora_parameter_count
from superlora_diffusers.factorization import factor_shapes, zero_factor_name
from superlora_diffusers.layout import (
    Layout,
    Unshuffle,
    iroot_ceil,
    lycoris_factorization,
    shuffle_index,
    unshuffle_indices,
)
from superlora_diffusers.projection import Fastfood, GaussianProjection, IsometricProjection, fwht, hadamard
from superlora_diffusers.superlora import versus_lora1

PAPER = [(768, 744)]  # the method note's adapted size S = 571,392


# ---- parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(fold=3, groups=12, rank=5), 8160),
        (dict(fold=4, groups=12, rank=5), 11100),
        (dict(fold=3, groups=1, rank=4), 1060),
        (dict(fold=3, groups=4, rank=4, projection="fastfood", projection_ratio=0.01), 832),
        (dict(fold=5, groups=1, rank=1), 76),
        (dict(fold=5, groups=1, rank=1, projection="fastfood", projection_ratio=0.01), 31),
    ],
)
def test_tucker_counts_reproduce_the_paper(kwargs, expected):
    config = SuperLoRAConfig(factorization="tucker", **kwargs)
    assert count_parameters(config, PAPER) == expected
    module = SuperLoRA(config, PAPER)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected


def test_issue_example_tucker_3d_g12():
    module = SuperLoRA(SuperLoRAConfig(factorization="tucker", fold=3, groups=12, rank=5), shapes=[(768, 744)])
    assert module.num_parameters() == 8160
    out = module()
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (768, 744)


SHAPES = [(8, 6), (5, 7), (12, 12), (3, 9)]
CONFIGS = {
    "lora": SuperLoRAConfig.lora(rank=2, alpha=3.0),
    "lokr": SuperLoRAConfig.lokr(rank=2, alpha=2.0),
    "group_lora": SuperLoRAConfig.group_lora(groups=3, rank=2),
    "lonkr": SuperLoRAConfig.lonkr(splits=3, groups=2, rank=2),
    "lorta3": SuperLoRAConfig.lorta(fold=3, groups=2, rank=2, shuffle=True, shuffle_seed=3),
    "lorta4_fastfood": SuperLoRAConfig.lorta(fold=4, groups=1, rank=2, projection="fastfood", projection_ratio=0.3),
    "lora_gaussian": SuperLoRAConfig.group_lora(groups=2, rank=1, projection="gaussian", projection_ratio=0.5),
    "lorta3_isometric": SuperLoRAConfig.lorta(fold=3, groups=2, rank=2, projection="isometric", projection_ratio=0.4),
    "tucker_weight_aligned": SuperLoRAConfig(factorization="tucker", groups="weight", fold=3, rank=2),
    "kron_explicit_fold": SuperLoRAConfig(factorization="kronecker", groups=2, fold_shape=(12, 11), rank=1, kron_factor=2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_count_matches_numel_and_shapes(name):
    config = CONFIGS[name]
    module = SuperLoRA(config, SHAPES)
    assert count_parameters(config, SHAPES) == module.num_parameters()
    assert [tuple(d.shape) for d in module()] == SHAPES


def test_lora_reference_counts():
    assert lora_parameter_count(PAPER, rank=8) == 8 * (768 + 744)
    assert count_parameters(SuperLoRAConfig.lora(rank=8), PAPER) == 8 * (768 + 744)
    # 2-D reshape: G·2r·ceil(sqrt(N'))
    assert count_parameters(SuperLoRAConfig.group_lora(groups=1, rank=7), PAPER) == 2 * 7 * math.ceil(math.sqrt(571392))


def test_rank1_lora_comparison_reads_right_both_ways():
    assert versus_lora1(1348, 273024) == "202.5x more than this adapter"
    assert versus_lora1(154240, 38560) == "4.0x fewer than this adapter"  # the card once said "0x more"


@pytest.mark.parametrize("name", CONFIGS)
def test_alpha_scales_every_delta_linearly(name):
    """alpha / rank is applied inside the factors (to the zero-initialised tensor), not to ΔW: same result."""
    import dataclasses

    torch.manual_seed(0)
    config = CONFIGS[name]
    base = SuperLoRA(dataclasses.replace(config, alpha=config.rank), SHAPES).double()
    for p in base.parameters():
        nn.init.normal_(p)
    scaled = SuperLoRA(dataclasses.replace(config, alpha=2.5 * config.rank), SHAPES).double()
    scaled.load_state_dict(base.state_dict())
    for a, b in zip(base(), scaled()):
        torch.testing.assert_close(b, 2.5 * a, rtol=1e-12, atol=1e-12)


# ---- initialisation and gradients -------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_init_is_zero_and_every_tensor_trains(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    module = SuperLoRA(config, SHAPES)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in module())
    target = [torch.randn(s) for s in SHAPES]

    def loss() -> torch.Tensor:
        return sum(((d - t) ** 2).sum() for d, t in zip(module(), target))

    loss().backward()
    zero = zero_factor_name(config, [n.split(".")[-1] for n, _ in module.named_parameters()])
    for pname, p in module.named_parameters():
        if pname.endswith(zero):
            assert p.grad.abs().sum() > 0, f"the zero-initialised {pname} must get a gradient at once"
    torch.optim.SGD(module.parameters(), lr=1e-2).step()
    module.zero_grad()
    loss().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} gets no gradient: training is frozen"


@pytest.mark.parametrize("name", CONFIGS)
def test_gradcheck_float64(name):
    torch.manual_seed(1)
    module = SuperLoRA(CONFIGS[name], SHAPES).double()
    params = list(module.parameters())
    for p in params:  # leave the zero init so the check sees every path
        p.data.normal_()
    names = [n for n, _ in module.named_parameters()]

    def fn(*tensors):
        state = dict(zip(names, tensors))
        deltas = torch.func.functional_call(module, state, ())
        return torch.cat([d.reshape(-1) for d in deltas])

    assert torch.autograd.gradcheck(fn, tuple(p.detach().requires_grad_() for p in params), eps=1e-6, atol=1e-5)


# ---- special cases against peft ---------------------------------------------------------------------
class ThreeLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 20)
        self.c = nn.Linear(20, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def apply_deltas(model: nn.Module, deltas: list[torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for layer, delta in zip((model.a, model.b, model.c), deltas):
            layer.weight += delta
    return model


def layer_shapes(model: ThreeLinears) -> list[tuple[int, int]]:
    return [tuple(layer.weight.shape) for layer in (model.a, model.b, model.c)]


def test_lora_preset_equals_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ThreeLinears().double()
    ours_model = ThreeLinears().double()
    ours_model.load_state_dict(base.state_dict())
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["a", "b", "c"], init_lora_weights=False)
    )
    config = SuperLoRAConfig.lora(rank=3, alpha=5)
    superlora = SuperLoRA(config, layer_shapes(ours_model)).double()
    with torch.no_grad():
        for block, name in zip(superlora.blocks, ("a", "b", "c")):
            layer = getattr(peft_model.base_model.model, name)
            block.lora_A.copy_(layer.lora_A["default"].weight[None])
            block.lora_B.copy_(layer.lora_B["default"].weight[None])
    apply_deltas(ours_model, superlora())
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(ours_model(x), peft_model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank, factor", [(2, -1), (1, 4), (8, -1)])
def test_lokr_preset_equals_peft_lokr(rank, factor):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ThreeLinears().double()
    ours_model = ThreeLinears().double()
    ours_model.load_state_dict(base.state_dict())
    peft_model = peft.get_peft_model(
        base,
        peft.LoKrConfig(r=rank, alpha=3, target_modules=["a", "b", "c"], decompose_factor=factor, init_weights=False),
    )
    superlora = SuperLoRA(SuperLoRAConfig.lokr(rank=rank, alpha=3, factor=factor), layer_shapes(ours_model)).double()
    with torch.no_grad():
        for block, name in zip(superlora.blocks, ("a", "b", "c")):
            layer = getattr(peft_model.base_model.model, name)
            for pname, p in block.named_parameters():
                p.copy_(getattr(layer, f"lokr_{pname}")["default"][None])
    apply_deltas(ours_model, superlora())
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(ours_model(x), peft_model(x), atol=1e-6, rtol=0)


# ---- projection -------------------------------------------------------------------------------------
def test_fwht_equals_hadamard_matrix():
    for length in (1, 2, 8, 64, 256, 2048):
        x = torch.randn(3, length, dtype=torch.float64)
        dense = x @ hadamard(length, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), dense)
        torch.testing.assert_close(fwht(x, block=4), dense)


def explicit_hadamard(length: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j), built entry by entry: independent of the Sylvester recursion."""
    idx = torch.arange(length)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    popcount = sum((bits >> k) & 1 for k in range(max(1, length.bit_length())))
    return (1 - 2 * (popcount % 2)).double()


@pytest.mark.parametrize("d, D", [(3, 5), (10, 37), (64, 64), (17, 200)])
def test_fastfood_equals_dense_reference(d, D):
    ff = Fastfood(d, D, seed=7).double()
    L = ff.length
    H = explicit_hadamard(L)
    B = torch.diag(ff.signs.double())
    gen = torch.Generator().manual_seed(7)
    torch.randint(0, 2, (L,), generator=gen)  # the signs come first from the seed, then Π
    perm = torch.randperm(L, generator=gen)
    P = torch.eye(L, dtype=torch.float64)[perm]  # (P x)_i = x_perm[i], on the full L-length vector
    G = torch.diag(ff.gauss.double())
    dense = (H @ G @ P @ H @ B)[:D, :d]
    v = torch.randn(4, d, dtype=torch.float64)
    torch.testing.assert_close(ff(v), (v @ dense.T).to(torch.float64), atol=1e-5, rtol=1e-4)
    # columns have unit norm in expectation: a sanity bound, not an exact identity
    assert 0.2 < dense.norm(dim=0).mean() < 5


def test_projection_is_seeded_and_not_saved():
    a, b, c = Fastfood(10, 100, seed=1), Fastfood(10, 100, seed=1), Fastfood(10, 100, seed=2)
    assert torch.equal(a.source, b.source) and torch.equal(a.gauss, b.gauss)
    assert not torch.equal(a.gauss, c.gauss)
    assert a.state_dict() == {}
    assert GaussianProjection(4, 9, seed=0).state_dict() == {}
    module = SuperLoRA(CONFIGS["lorta4_fastfood"], SHAPES)
    assert all("projections" not in k and "unshuffle" not in k for k in module.state_dict())


@pytest.mark.parametrize("d, D", [(3, 5), (10, 37), (64, 64), (17, 200)])
def test_isometric_projection_is_a_balanced_one_hot_isometry(d, D):
    """Uni-LoRA's map: one nonzero per row, every coordinate read floor(D/d) or ceil(D/d) times, F^T F = I."""
    iso = IsometricProjection(d, D, seed=3)
    dense = iso(torch.eye(d, dtype=torch.float64)).T  # (D, d): column j = F e_j
    assert ((dense != 0).sum(dim=1) == 1).all()
    counts = (dense != 0).sum(dim=0)
    assert counts.min() >= D // d and counts.max() <= -(-D // d)
    torch.testing.assert_close(dense.T @ dense, torch.eye(d, dtype=torch.float64))
    v = torch.randn(2, d, dtype=torch.float64)
    torch.testing.assert_close(iso(v), v @ dense.T)
    other = IsometricProjection(d, D, seed=4)
    assert iso.state_dict() == {} and (D == d or not torch.equal(iso.index, other.index))
    with pytest.raises(ValueError, match="larger size"):
        IsometricProjection(D + 1, D, seed=0)


def test_gaussian_projection_refuses_huge_dense_maps():
    with pytest.raises(ValueError, match="fastfood"):
        GaussianProjection(100_000, 1_000_000, seed=0)


def test_fastfood_memory_is_linear():
    ff = Fastfood(1000, 100_000, seed=0)
    buffer_bytes = sum(b.numel() * b.element_size() for b in ff.buffers())
    assert buffer_bytes <= 16 * ff.length  # fp32 signs + int64 Π + fp32 gauss; never an L x L matrix


# ---- grouping, folding, shuffling -------------------------------------------------------------------
def test_shuffle_then_unshuffle_is_identity():
    index = shuffle_index(1000, seed=5).long()
    assert torch.equal(index.sort().values, torch.arange(1000))  # a permutation
    x = torch.randn(1000)
    shuffled = torch.empty_like(x)
    shuffled[index] = x  # shuffle: scatter; the engine unshuffles with the gather shuffled[index]
    assert not torch.equal(shuffled, x)
    assert torch.equal(shuffled[index], x)
    again = torch.empty_like(x)
    again[index] = shuffled[index]
    assert torch.equal(again, shuffled)
    assert torch.equal(shuffle_index(1000, seed=5), shuffle_index(1000, seed=5))


def test_unshuffle_backward_equals_autograd_of_the_gather():
    """The inverse-gather backward is the exact gradient of source[index], zero where nothing is read."""
    torch.manual_seed(0)
    index = torch.randperm(30)[:20]  # 10 source positions (surplus) are never read
    gather, inverse = unshuffle_indices(index, 30)
    assert gather.dtype == inverse.dtype == torch.int32 and gather.numel() == 21  # + the padding slot
    source = torch.randn(30, dtype=torch.float64, requires_grad=True)

    def unshuffle(s: torch.Tensor) -> torch.Tensor:
        return Unshuffle.apply(s, gather, inverse)[:20]  # the caller drops the padding slot

    assert torch.equal(unshuffle(source), source[index])
    assert torch.autograd.gradcheck(unshuffle, (source,))
    upstream = torch.randn(20, dtype=torch.float64)
    ours = torch.autograd.grad(unshuffle(source), source, upstream)[0]
    reference = torch.autograd.grad(source.index_select(0, index), source, upstream)[0]
    assert torch.equal(ours, reference)
    assert ours[inverse == 20].abs().sum() == 0
    assert unshuffle_indices(torch.randperm(30), 30)[0].numel() == 30  # a full permutation needs no padding slot


def test_grouping_padding_never_leaks():
    """The super-vector is the concatenation of chunks, in order, with only the tail surplus dropped."""
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 3), (2, 11)]  # N = 66, not divisible by 4 groups, chunks fold to 5x5 = 25 > 17
    config = SuperLoRAConfig.group_lora(groups=4, rank=2)
    module = SuperLoRA(config, shapes)
    for p in module.parameters():
        p.data.normal_()
    layout = module.layout
    (block,) = layout.blocks
    assert block.count == 4 and block.size == 17 and block.fold_shape == (5, 5)
    chunks = module.blocks[0]()  # (4, 25)
    expected = chunks[:, : block.size].reshape(-1)[: layout.total]
    got = torch.cat([d.reshape(-1) for d in module()])
    torch.testing.assert_close(got, expected * config.scale)
    # gradient never reaches the fold surplus or the padded tail of the last group
    grads = torch.autograd.grad(sum(d.sum() for d in module()), module.blocks[0].lora_B)[0]
    assert grads.shape == (4, 5, 2)


def reference_deltas(module: SuperLoRA) -> list[torch.Tensor]:
    """The method note's recipe, literally: trim every chunk to N_g, concatenate, unshuffle, split."""
    chunks = []
    for factors, projection, block in zip(module.blocks, module.projections, module.layout.blocks):
        chunk = factors()
        if not isinstance(projection, nn.Identity):
            chunk = projection(chunk[:, : block.projected])
        chunks.append(chunk[:, : block.size].reshape(-1))
    flat = torch.cat(chunks)[: module.layout.total]
    if module.config.shuffle:
        flat = flat[shuffle_index(module.layout.total, module.config.shuffle_seed)]
    return [piece.view(shape) for piece, shape in zip(flat.split(module.layout.sizes), module.layout.shapes)]


READ_IN_PLACE = {
    **CONFIGS,
    "tucker_weight_shuffle": SuperLoRAConfig(factorization="tucker", groups="weight", fold=3, rank=2, shuffle=True),
    "tucker_weight_fastfood": SuperLoRAConfig(factorization="tucker", groups="weight", fold=3, rank=2,
                                              projection="fastfood", projection_ratio=0.4),
    "tucker_fastfood_shuffle": SuperLoRAConfig(factorization="tucker", groups=3, fold=3, rank=2, shuffle=True,
                                               projection="fastfood", projection_ratio=0.4),
    "kron_overshoot_g3": SuperLoRAConfig(factorization="kronecker", groups=3, rank=1, kron_factor=2),
}


@pytest.mark.parametrize("name", READ_IN_PLACE)
def test_reading_chunks_in_place_equals_trimming_them(name):
    """The engine steps over surplus entries instead of slicing them off; values and gradients must not change."""
    torch.manual_seed(0)
    module = SuperLoRA(READ_IN_PLACE[name], SHAPES).double()
    for p in module.parameters():
        p.data.normal_()
    got, expected = module(), reference_deltas(module)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    weights = [torch.randn(shape, dtype=torch.float64) for shape in SHAPES]
    params = list(module.parameters())
    grads = torch.autograd.grad(sum((d * w).sum() for d, w in zip(got, weights)), params)
    expected_grads = torch.autograd.grad(sum((d * w).sum() for d, w in zip(expected, weights)), params)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_shuffle_spreads_each_group_over_layers():
    shapes = [(10, 10), (10, 10)]
    config = SuperLoRAConfig.group_lora(groups=2, rank=1, shuffle=True, shuffle_seed=0)
    module = SuperLoRA(config, shapes)
    with torch.no_grad():
        module.blocks[0].lora_B.zero_()
        module.blocks[0].lora_B[0] = 1.0  # only group 0 is non-zero
        module.blocks[0].lora_A.fill_(1.0)
    first, second = module()
    assert (first != 0).any() and (second != 0).any()  # group 0 reached both layers


def test_fold_sizes_are_exact_integer_roots():
    assert iroot_ceil(571392, 3) == 83 and iroot_ceil(47616, 4) == 15 and iroot_ceil(27, 3) == 3
    assert iroot_ceil(28, 3) == 4 and iroot_ceil(1, 5) == 1
    assert lycoris_factorization(256) == (16, 16) and lycoris_factorization(128, 4) == (4, 32)
    assert lycoris_factorization(127) == (1, 127)


def test_weight_aligned_lora_keeps_native_shapes():
    layout = Layout.build(SuperLoRAConfig.lora(rank=2), [(320, 768), (640, 640)])
    assert [b.fold_shape for b in layout.blocks] == [(320, 768), (640, 640)]
    assert factor_shapes(SuperLoRAConfig.lora(rank=2), layout.blocks[0]) == {"lora_A": (1, 2, 768), "lora_B": (1, 320, 2)}


# ---- dtype / device ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["lora", "lorta3", "lorta4_fastfood", "lonkr"])
def test_half_precision_factors(dtype, name):
    torch.manual_seed(0)
    ref = SuperLoRA(CONFIGS[name], SHAPES)
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    half = SuperLoRA(CONFIGS[name], SHAPES)
    half.load_state_dict(ref.state_dict())
    half.to(dtype)
    for got, want in zip(half(), ref()):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=5e-2)
    assert all(d.dtype == torch.float32 for d in half(dtype=torch.float32))


# ---- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_a_dict(name):
    import json

    config = CONFIGS[name]
    again = SuperLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factorization="lora", fold=3), "tucker"),
        (dict(factorization="kronecker", fold=3), "tucker"),
        (dict(factorization="svd"), "unknown"),
        (dict(rank=0), "positive"),
        (dict(groups=0), "positive"),
        (dict(fold=1), ">= 2"),
        (dict(projection_ratio=0.1), "fastfood"),
        (dict(projection="fastfood", projection_ratio=1.5), r"\(0, 1\]"),
        (dict(factorization="kronecker", kron_splits=1), ">= 2"),
        (dict(fold_shape=(4, 4)), "integer groups"),
        (dict(groups=2, fold=2, fold_shape=(4, 4, 4)), "fold=2"),
        (dict(version=99), "upgrade"),
    ],
)
def test_config_rejects_impossible_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuperLoRAConfig(**kwargs)


def test_build_time_errors_name_the_fix():
    with pytest.raises(ValueError, match="fewer groups"):
        SuperLoRA(SuperLoRAConfig.group_lora(groups=1000), [(4, 4)])
    with pytest.raises(ValueError, match="enlarge"):
        SuperLoRA(SuperLoRAConfig(groups=1, fold_shape=(3, 3), factorization="lora"), [(4, 4)])
    with pytest.raises(ValueError, match="newer"):
        SuperLoRAConfig.from_dict({"rank": 2, "future_knob": 1})


def test_presets_cover_the_special_cases():
    assert config_from_preset("lora").factorization == "lora"
    assert config_from_preset("lorta", rank=2).rank == 2
    with pytest.raises(ValueError, match="choose one of"):
        config_from_preset("dora")
