"""Operation 4 of SuperLoRA: a fixed random map F lifting the factors' ρ·N_g entries to N_g.

Fastfood (Le et al. 2013, as used for intrinsic dimension by Li et al. 2018): F·v = H·G·Π·H·B·pad(v),
truncated to N_g and normalised so columns have unit norm in expectation. H is the (unnormalised)
Walsh-Hadamard transform, applied in O(L log L) without ever forming an L×L matrix; B, Π and G are
random diagonal/permutation vectors of length L = next power of two >= N_g, regenerated from a seed
on the CPU (identical on every device) and kept as non-persistent buffers: nothing random is saved.
The same map serves every chunk of a block; chunks differ through their own factors.
The dense Gaussian map is the simple alternative for small chunks. The isometric map (Uni-LoRA, arXiv 2506.00799;
peft's `UniLoraConfig`) reads each of the N_g entries from ONE trained coordinate instead of all of
them: a sparse subspace in which Adam's per-coordinate step is still (almost) a per-entry step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DENSE_LIMIT = 1 << 26  # entries of a dense Gaussian map (256 MB in fp32) before we ask for Fastfood


def fwht(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two), O(L log L).

    H_L = H_{s1} ⊗ H_{s2} ⊗ …: pass k views the vector as (outer, s_k, inner) and multiplies the middle
    axis by the small Hadamard H_s with one contiguous batched matmul (no transposed copies, forward or
    backward). log_s(L) passes instead of log2(L); autograd differentiates it as the linear map it is.
    """
    length = x.shape[-1]
    if length & (length - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {length}.")
    y, outer, inner = x, x.numel() // max(1, length), length
    while inner > 1:
        size = min(block, inner)
        inner //= size
        h = hadamard(size, dtype=x.dtype, device=x.device)
        y = y.reshape(-1, size) @ h if inner == 1 else torch.matmul(h, y.reshape(outer, size, inner))
        outer *= size
    return y.reshape(x.shape)


def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Sylvester Hadamard matrix of order `size` (a power of two), entries ±1."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class Fastfood(nn.Module):
    """F: R^d -> R^D, v ↦ (H·G·Π·H·B·pad(v))[:D] / (sqrt(L·ΣG²)·sqrt(D/L)); batched over chunks."""

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        if in_features > out_features:
            raise ValueError(f"Fastfood lifts to a larger size; got {in_features} -> {out_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.length = 1 << max(0, math.ceil(math.log2(out_features)))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        signs = torch.randint(0, 2, (self.length,), generator=gen).float() * 2 - 1  # ±1: exact in any dtype
        perm = torch.randperm(self.length, generator=gen)
        gauss = torch.randn(self.length, generator=gen, dtype=torch.float64)
        norm = math.sqrt(self.length * float(gauss.pow(2).sum())) * math.sqrt(out_features / self.length)
        # H_L·pad(x) = 1_{L/m} ⊗ H_m·pad_m(x) for the smallest power of two m >= d, so the forward
        # transforms m entries only, and Π reads the tiled vector at Π(i) = reading H_m·pad_m(x) at
        # Π(i) mod m: a gather from an m-sized (cache-sized for small d) source, never an L-sized tile.
        self.small = 1 << max(0, math.ceil(math.log2(in_features)))
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("source", perm % self.small, persistent=False)  # int64: faster backward
        self.register_buffer("gauss", (gauss / norm).float(), persistent=False)

    def forward(self, v: torch.Tensor, keep_padding: bool = False) -> torch.Tensor:
        """v: (chunks, in_features) -> (chunks, out_features), in at least fp32 (the WHT sums L terms).

        `keep_padding` returns all L entries (the first out_features are F·v): callers that read the
        rows in place skip the tail instead of paying a slice's copy forward and zero-fill backward.
        """
        dtype = torch.promote_types(v.dtype, torch.float32)
        x = v.to(dtype) * self.signs[: self.in_features].to(dtype)
        x = fwht(torch.nn.functional.pad(x, (0, self.small - self.in_features)))
        x = x.index_select(-1, self.source) * self.gauss.to(dtype)
        x = fwht(x)
        return (x if keep_padding else x[..., : self.out_features]).to(v.dtype)


class GaussianProjection(nn.Module):
    """Dense fixed map with N(0, 1/D) entries (unit-norm columns in expectation); for small chunks only."""

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        if in_features * out_features > DENSE_LIMIT:
            raise ValueError(
                f"A dense Gaussian projection of {in_features}x{out_features} is too large; "
                "use projection='fastfood' (O(N) memory)."
            )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        matrix = torch.randn(out_features, in_features, generator=gen) / math.sqrt(out_features)
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self.matrix.to(v.dtype).T


class IsometricProjection(nn.Module):
    """F with one nonzero per row: entry i = v[index[i]] / sqrt(count of index[i]) (orthonormal columns).

    Every coordinate is read by floor(D/d) or ceil(D/d) entries (a balanced, shuffled assignment, as peft's
    UniLoRA draws it), so no coordinate is unused and F is an isometry. O(D) memory, one gather per use.
    """

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        if in_features > out_features:
            raise ValueError(f"The isometric projection lifts to a larger size; got {in_features} -> {out_features}.")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        base, extra = divmod(out_features, in_features)
        index = torch.arange(in_features).repeat(base)
        index = torch.cat([index, torch.randperm(in_features, generator=gen)[:extra]])
        index = index[torch.randperm(out_features, generator=gen)]
        counts = torch.bincount(index, minlength=in_features).float()
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("scale", counts[index].rsqrt(), persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: (chunks, in_features) -> (chunks, out_features)."""
        return v.index_select(-1, self.index) * self.scale.to(v.dtype)


def build_projection(kind: str, in_features: int, out_features: int, seed: int) -> nn.Module:
    """Identity when nothing is projected, else the named fixed random map."""
    if kind == "none":
        return nn.Identity()
    if kind == "fastfood":
        return Fastfood(in_features, out_features, seed)
    if kind == "isometric":
        return IsometricProjection(in_features, out_features, seed)
    return GaussianProjection(in_features, out_features, seed)
