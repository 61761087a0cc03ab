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

`kernel_axis`: a conv's d_in is c_in·k_h·k_w, and U_in over all of it is most of the rank-1 layout's
parameters (the toy's ResNet convs: 11.8k of 12.7k). With it, the kernel is a fourth axis, U_in = U_c ⊗ U_k
(c_in × r_i and k_h·k_w × r_k, orthonormal, so still an isometry) and the core (r_l, r_o, r_i, r_k): the
weights' real axes, as LyCORIS's `use_tucker` keeps a conv's kernel apart.

`share_axes`: the bases are shared across shapes too, one per (role, length): every shape with d_out = 128
reads the same U_out ("out_128"), every one with c_in = 128 the same U_in ("in_128"), every 3×3 kernel the
same U_k. A shape then owns only its core and layer factor, so the parameters grow with the distinct axis
lengths, not the distinct shapes (the toy's rank-1 kernel-axis layout: 3,109 -> 1,131). In a UNet the
equal-width axes are mostly one feature space (a level's hidden channels), read by its convs and attention;
the text encoder's width is also the cross-attention K/V input, the space its outputs live in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .config import SuperLoRAConfig
from .layout import projected_size
from .projection import build_projection

Shape = tuple[int, int]


Group = tuple[int, int, int]  # (d_out, d_in, kernel): kernel is k_h·k_w with `kernel_axis`, else 1


def shape_groups(shapes: list[Shape], kernels: list[int] | None = None) -> dict[Group, list[int]]:
    """Distinct (d_out, d_in, kernel) in first-seen order -> indices of those weights (in target order)."""
    groups: dict[Group, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault((*shape, kernels[index] if kernels else 1), []).append(index)
    return groups


def group_ranks(config: SuperLoRAConfig, layers: int, group: Group) -> tuple[int, ...]:
    """(r_l, r_o, r_i), and r_k for a kernel axis: the rank along each axis, capped at that axis's size."""
    d_out, d_in, kernel = group
    ranks = (min(config.rank, layers), min(config.rank, d_out), min(config.rank, d_in // kernel))
    return ranks + (min(config.rank, kernel),) if kernel > 1 else ranks


def axis_parameter_shapes(config: SuperLoRAConfig, shapes: list[Shape],
                          kernels: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """`SuperLoRA` state-dict names (its `axes` attribute) -> shapes, without allocating."""
    out: dict[str, tuple[int, ...]] = {}
    groups = shape_groups(shapes, kernel_list(config, kernels))
    for g, (group, members) in enumerate(groups.items()):
        ranks = group_ranks(config, len(members), group)
        d_out, d_in, kernel = group
        out.update({f"axes.groups.{g}.core": ranks, f"axes.groups.{g}.factor_layer": (len(members), ranks[0])})
        if config.share_axes:
            continue
        out.update({f"axes.groups.{g}.factor_out": (d_out, ranks[1]),
                    f"axes.groups.{g}.factor_in": (d_in // kernel, ranks[2])})
        if kernel > 1:
            out[f"axes.groups.{g}.factor_kernel"] = (kernel, ranks[3])
    if config.share_axes:
        out.update({f"axes.bases.{name}": shape for name, shape in shared_bases(config, list(groups)).items()})
    if config.projection != "none":  # the factors are θ0 + F·v: only v is a parameter
        return {"axes.vector": (projected_size(sum(math.prod(s) for s in out.values()), config.projection_ratio),)}
    return out


def shared_bases(config: SuperLoRAConfig, groups: list[Group]) -> dict[str, tuple[int, int]]:
    """With `share_axes`: the shared basis names ("out_128", "in_64", "kernel_9") -> (length, rank), first-seen order."""
    out: dict[str, tuple[int, int]] = {}
    for group in groups:
        d_out, d_in, kernel = group
        for name, n in zip(basis_names(group), (d_out, d_in // kernel, kernel)):
            out.setdefault(name, (n, min(config.rank, n)))
    return out


def basis_names(group: Group) -> tuple[str, ...]:
    """The shared bases one group reads: (out, in) and, with a kernel axis, kernel."""
    d_out, d_in, kernel = group
    return (f"out_{d_out}", f"in_{d_in // kernel}") + ((f"kernel_{kernel}",) if kernel > 1 else ())


def kernel_list(config: SuperLoRAConfig, kernels: list[int] | None) -> list[int] | None:
    """The kernel sizes the layout splits off: the given ones with `kernel_axis`, else none."""
    return list(kernels) if config.kernel_axis and kernels else None


def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns, from the global RNG (cols <= rows)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


Bases = tuple[torch.Tensor, ...]  # (U_out, U_in) and, with a kernel axis, U_k


class Factors(NamedTuple):
    """One group's tensors: its core, its layer factor, and the bases it reads (its own or shared ones)."""

    core: torch.Tensor
    layer: torch.Tensor
    bases: Bases


class AxisGroup(nn.Module):
    """The Tucker factors of one shape's (L, d_out, d_in) stack of ΔW; the bases are its own unless shared."""

    def __init__(self, config: SuperLoRAConfig, layers: int, group: Group, own_bases: bool = True) -> None:
        super().__init__()
        d_out, d_in, kernel = group
        ranks = group_ranks(config, layers, group)
        self.core = nn.Parameter(torch.zeros(ranks))
        self.factor_layer = nn.Parameter(_orthonormal(layers, ranks[0]))
        if own_bases:
            self.factor_out = nn.Parameter(_orthonormal(d_out, ranks[1]))
            self.factor_in = nn.Parameter(_orthonormal(d_in // kernel, ranks[2]))
            if kernel > 1:
                self.factor_kernel = nn.Parameter(_orthonormal(kernel, ranks[3]))
        self.gain = config.scale * math.sqrt(layers * d_out / (3 * math.prod(ranks[2:]) * ranks[0]))

    def low_rank(self, position: int, f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ΔW_l = B·A for the layer at `position` in this group: (d_out × r_i, r_i × d_in), or with
        a kernel axis (U_out, core ×U_c ×U_k): r_o rows, never the r_i·r_k-column U_c ⊗ U_k, so a conv trains
        through r_o channels and autograd keeps an (r_o × c_in·k) A, not the Kronecker basis."""
        core = torch.einsum("k,k...->...", f.layer[position], f.core) * self.gain
        if core.dim() == 2:
            return f.bases[0] @ core, f.bases[1].T
        return f.bases[0], torch.einsum("oab,ca,kb->ock", core, f.bases[1], f.bases[2]).flatten(1)

    def forward(self, f: Factors) -> torch.Tensor:
        """All ΔW of this shape, (L, d_out, d_in); with a kernel axis U_in = U_c ⊗ U_k, core (r_l, r_o, r_i·r_k)."""
        factor_in, core = (f.bases[1], f.core) if f.core.dim() == 3 else (torch.kron(f.bases[1], f.bases[2]),
                                                                         f.core.flatten(2))
        core = torch.einsum("lk,kab->lab", f.layer, core) * self.gain
        return torch.einsum("oa,lab,ib->loi", f.bases[0], core, factor_in)


class AxisTucker(nn.Module):
    """One `AxisGroup` per distinct shape (and, with `share_axes`, the bases they share); hands every weight
    its ΔW (or its factors) in target order.

    With a `projection`, none of those tensors trains: they are θ0 + F·v, θ0 their initial values (drawn from
    `projection_seed`, so a file needs only v), F the fixed random map of `projection.py` and v = `vector`
    (ρ·N entries, zero at init) the one trainable tensor: training in a random ρ·N-dimensional subspace of
    the layout's N factor entries (Li et al.'s intrinsic dimension; Uni-LoRA does it over LoRA's entries).
    """

    def __init__(self, config: SuperLoRAConfig, shapes: list[Shape], kernels: list[int] | None = None) -> None:
        super().__init__()
        groups = shape_groups(shapes, kernel_list(config, kernels))
        projected = config.projection != "none"
        with torch.random.fork_rng(devices=[], enabled=projected):
            if projected:  # θ0 must be the same wherever the file is loaded
                torch.manual_seed(config.projection_seed)
            self.groups = nn.ModuleList(AxisGroup(config, len(members), group, own_bases=not config.share_axes)
                                        for group, members in groups.items())
            if config.share_axes:
                self.bases = nn.ParameterDict({name: nn.Parameter(_orthonormal(n, rank))
                                               for name, (n, rank) in shared_bases(config, list(groups)).items()})
        self.basis_names = [basis_names(group) for group in groups] if config.share_axes else None
        self.vector = self._project(config) if projected else None
        # weight index -> (group, position in that group's layer axis)
        self.slots = [(0, 0)] * len(shapes)
        for g, members in enumerate(groups.values()):
            for position, weight in enumerate(members):
                self.slots[weight] = (g, position)

    def _project(self, config: SuperLoRAConfig) -> nn.Parameter:
        """Turn every factor into a slice of θ0 (a buffer, regenerated, never stored) and return v."""
        named = list(self.named_parameters())
        self.projected = [(name, p.shape) for name, p in named]
        self.register_buffer("theta0", torch.cat([p.detach().reshape(-1) for _, p in named]), persistent=False)
        for name, _ in self.projected:
            owner, attr = name.rsplit(".", 1)
            module = self.get_submodule(owner)
            if isinstance(module, nn.ParameterDict):
                del module[attr]
            else:
                delattr(module, attr)
        total = self.theta0.numel()
        self.lift = build_projection(config.projection, projected_size(total, config.projection_ratio), total,
                                     config.projection_seed)
        return nn.Parameter(torch.zeros(projected_size(total, config.projection_ratio)))

    def factors(self) -> list[Factors]:
        """Every group's tensors: the parameters themselves, or θ0 + F·v sliced once for all groups."""
        if self.vector is None:
            tensors = dict(self.named_parameters())
        else:
            flat = self.theta0 + self.lift(self.vector[None])[0]
            pieces = flat.split([shape.numel() for _, shape in self.projected])
            tensors = {name: t.view(shape) for (name, shape), t in zip(self.projected, pieces)}
        out = []
        for g in range(len(self.groups)):
            if self.basis_names is None:
                bases = tuple(tensors[f"groups.{g}.{n}"] for n in ("factor_out", "factor_in", "factor_kernel")
                              if f"groups.{g}.{n}" in tensors)
            else:
                bases = tuple(tensors[f"bases.{name}"] for name in self.basis_names[g])
            out.append(Factors(tensors[f"groups.{g}.core"], tensors[f"groups.{g}.factor_layer"], bases))
        return out

    def low_rank(self, weight: int, factors: list[Factors] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        group, position = self.slots[weight]
        return self.groups[group].low_rank(position, (factors or self.factors())[group])

    def forward(self, factors: list[Factors] | None = None) -> list[torch.Tensor]:
        factors = factors or self.factors()
        stacks = [group(factors[g]) for g, group in enumerate(self.groups)]
        return [stacks[g][position] for g, position in self.slots]
