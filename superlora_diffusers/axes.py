"""Group-wise without reshape (`groups="shape"`): weights of one shape, Tucker-factored along their real axes.

The cube fold of `layout.py` reshapes the super-vector into equal modes that cut across rows, columns and
layers; a truncated HOSVD of a trained LoRA's ΔW leaves ~99 % of it unexplained in that layout, against
~80 % for a Tucker over (layer, d_out, d_in) of equally shaped weights (issue 21). Here the L weights of
one (d_out, d_in) shape form an (L, d_out, d_in) tensor, factored as

    ΔW_l = γ · U_out · C_l · U_inᵀ,    C_l = Σ_k U_layer[l, k] · core[k]

with one (r_l, r_o, r_i) core per shape (zero at init), U_out (d_out × r_o), U_in (d_in × r_i) and
U_layer (L × r_l), each rank capped at its mode's size. Every factor is shared by the layers of its shape,
so the parameters grow with the number of distinct shapes, not of weights. A layer never needs its dense
ΔW in training: it computes x·U_in·C_lᵀ·U_outᵀ·γ, the LoRA preset's factored path.

Initialisation and gain: U_out, U_in and U_layer start with orthonormal columns, so the core-to-ΔW map is
an isometry; γ = alpha/rank · sqrt(L·d_out / (3·r_i·r_l)) then makes one optimiser step of the (tiny) core
move ΔW by about as much as one step of a rank-r_o LoRA on the same L weights moves it (LoRA: B zero,
A kaiming-uniform), so a LoRA learning rate is a sensible default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SuperLoRAConfig

Shape = tuple[int, int]


def shape_groups(shapes: list[Shape]) -> dict[Shape, list[int]]:
    """Distinct shapes in first-seen order -> indices of the weights of that shape (in target order)."""
    groups: dict[Shape, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return groups


def group_ranks(config: SuperLoRAConfig, layers: int, shape: Shape) -> tuple[int, int, int]:
    """(r_l, r_o, r_i): the rank along each axis, capped at that axis's size."""
    return min(config.rank, layers), min(config.rank, shape[0]), min(config.rank, shape[1])


def axis_parameter_shapes(config: SuperLoRAConfig, shapes: list[Shape]) -> dict[str, tuple[int, ...]]:
    """`SuperLoRA` state-dict names (its `axes` attribute) -> shapes, without allocating."""
    out: dict[str, tuple[int, ...]] = {}
    for g, (shape, members) in enumerate(shape_groups(shapes).items()):
        r_l, r_o, r_i = group_ranks(config, len(members), shape)
        out.update({f"axes.groups.{g}.core": (r_l, r_o, r_i), f"axes.groups.{g}.factor_layer": (len(members), r_l),
                    f"axes.groups.{g}.factor_out": (shape[0], r_o), f"axes.groups.{g}.factor_in": (shape[1], r_i)})
    return out


def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns, from the global RNG (cols <= rows)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class AxisGroup(nn.Module):
    """The Tucker factors of one shape's (L, d_out, d_in) stack of ΔW."""

    def __init__(self, config: SuperLoRAConfig, layers: int, shape: Shape) -> None:
        super().__init__()
        r_l, r_o, r_i = group_ranks(config, layers, shape)
        self.core = nn.Parameter(torch.zeros(r_l, r_o, r_i))
        self.factor_layer = nn.Parameter(_orthonormal(layers, r_l))
        self.factor_out = nn.Parameter(_orthonormal(shape[0], r_o))
        self.factor_in = nn.Parameter(_orthonormal(shape[1], r_i))
        self.gain = config.scale * math.sqrt(layers * shape[0] / (3 * r_i * r_l))

    def low_rank(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ΔW_l = B·A for the layer at `position` in this group: (d_out × r_i, r_i × d_in)."""
        core = torch.einsum("k,kab->ab", self.factor_layer[position], self.core) * self.gain
        return self.factor_out @ core, self.factor_in.T

    def forward(self) -> torch.Tensor:
        """All ΔW of this shape, (L, d_out, d_in)."""
        core = torch.einsum("lk,kab->lab", self.factor_layer, self.core) * self.gain
        return torch.einsum("oa,lab,ib->loi", self.factor_out, core, self.factor_in)


class AxisTucker(nn.Module):
    """One `AxisGroup` per distinct shape; hands every weight its ΔW (or its factors) in target order."""

    def __init__(self, config: SuperLoRAConfig, shapes: list[Shape]) -> None:
        super().__init__()
        groups = shape_groups(shapes)
        self.groups = nn.ModuleList(AxisGroup(config, len(members), shape) for shape, members in groups.items())
        # weight index -> (group, position in that group's layer axis)
        self.slots = [(0, 0)] * len(shapes)
        for g, members in enumerate(groups.values()):
            for position, weight in enumerate(members):
                self.slots[weight] = (g, position)

    def low_rank(self, weight: int) -> tuple[torch.Tensor, torch.Tensor]:
        group, position = self.slots[weight]
        return self.groups[group].low_rank(position)

    def forward(self) -> list[torch.Tensor]:
        stacks = [group() for group in self.groups]
        return [stacks[g][position] for g, position in self.slots]
