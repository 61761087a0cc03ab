"""Where every entry of ΔW_all comes from: operations 1-3 of SuperLoRA (grouping, folding, shuffling).

The adapted weights are flattened (row-major) and concatenated in target order into the super-vector
ΔW_all of N entries. Shuffling permutes it; grouping cuts it into chunks; folding gives each chunk the
tensor shape its factors produce. A `Layout` is pure arithmetic on (config, shapes): it builds nothing,
so parameter counts and validation happen before any memory is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SuperLoRAConfig

Shape = tuple[int, int]


def iroot_ceil(size: int, order: int) -> int:
    """Smallest integer n with n**order >= size (exact integer arithmetic, no float drift)."""
    n = max(1, round(size ** (1.0 / order)))
    while n**order < size:
        n += 1
    while n > 1 and (n - 1) ** order >= size:
        n -= 1
    return n


def projected_size(size: int, ratio: float) -> int:
    """ρ·N_g rounded up: how many entries the factors of one chunk produce before projection."""
    return max(1, math.ceil(round(size * ratio, 6)))


@dataclass(frozen=True)
class Block:
    """Chunks that share one shape and are computed as one batch (`count` chunks of `size` entries)."""

    count: int
    size: int  # N_g: entries of ΔW_all each chunk covers (the last chunk of a block may run past N)
    projected: int  # ρ·N_g: entries the factors produce
    fold_shape: tuple[int, ...]  # the shape the factors produce; its product >= projected
    exact: bool  # fold_shape is the weight's own (d_out, d_in): no surplus entries at all


# ---- 1. Grouping --------------------------------------------------------------------------------
def group_sizes(config: SuperLoRAConfig, shapes: list[Shape]) -> tuple[int, int]:
    """(number of equal chunks G, chunk size N_g) for integer grouping; the surplus G·N_g - N is dropped."""
    total = sum(o * i for o, i in shapes)
    groups = int(config.groups)
    if groups > total:
        raise ValueError(f"groups={groups} exceeds the {total} adapted entries; use fewer groups.")
    return groups, math.ceil(total / groups)


# ---- 2. Folding ---------------------------------------------------------------------------------
def fold_shape(config: SuperLoRAConfig, size: int, native: Shape | None = None) -> tuple[tuple[int, ...], bool]:
    """Shape a chunk of `size` entries is folded into, and whether it is exact (the native weight shape).

    Weight-aligned matrices without projection keep their own (d_out, d_in): that is plain LoRA/LoKr.
    Otherwise modes are equal, n = ceil(size^(1/M)), and the n^M - size surplus entries are dropped.
    """
    if config.fold_shape is not None:
        if math.prod(config.fold_shape) < size:
            raise ValueError(
                f"fold_shape={config.fold_shape} holds {math.prod(config.fold_shape)} entries but a chunk has "
                f"{size}; enlarge it or use more groups."
            )
        return config.fold_shape, False
    if native is not None and config.fold == 2 and config.projection_ratio == 1.0:
        return native, True
    return (iroot_ceil(size, config.fold),) * config.fold, False


def kron_split(dim: int, splits: int, factor: int, exact: bool) -> list[int]:
    """Split one mode of size `dim` into Kronecker factor sizes (small factors first).

    Exact modes (a native weight dimension) must multiply to `dim` exactly: LyCORIS/peft's
    `factorization`, applied again to the remainder for K > 2. Folded modes may overshoot (surplus is
    dropped), so factors are `factor`-sized, or balanced when factor = -1.
    """
    if exact:
        sizes, rest = [], dim
        for k in range(splits - 1):
            # factor -1 with two factors left is LyCORIS's own "near the square root" search.
            target = factor if factor > 0 or splits - k == 2 else iroot_ceil(rest, splits - k)
            small, rest = lycoris_factorization(rest, target)
            sizes.append(small)
        return sizes + [rest]
    if factor > 0:
        return [factor] * (splits - 1) + [math.ceil(dim / factor ** (splits - 1))]
    n = iroot_ceil(dim, splits)
    return [n] * splits


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dimension, m near `factor` (or near the square root when -1); as in LyCORIS/peft."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


# ---- 3. Shuffling -------------------------------------------------------------------------------
def shuffle_index(total: int, seed: int) -> torch.Tensor:
    """The fixed permutation as a gather index: ΔW_all = shuffled[index]. Regenerated from the seed on the
    CPU, so it is identical on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(total, generator=generator)


def unshuffle_indices(index: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather index, inverse) for `Unshuffle`, from a gather index into a source of `length` entries.

    Where some source positions are never read (surplus), the gather gets one extra entry past the
    permutation: the caller drops that output slot, so its gradient is zero, and the inverse points every
    surplus position at it. Both are int32 when they fit: half the memory of int64, and gathers run as fast.
    """
    n = index.numel()
    dtype = torch.int32 if max(length, n + 1) < 2**31 else torch.int64
    inverse = torch.full((length,), n, dtype=dtype)
    inverse[index] = torch.arange(n, dtype=dtype)
    index = index.to(dtype)
    if length > n:
        index = torch.cat([index, index.new_zeros(1)])
    return index, inverse


class Unshuffle(torch.autograd.Function):
    """out = source[index] for a permutation `index`, with a gather as its backward too.

    autograd's backward of index_select is a scatter-add into a zero-filled buffer, 1.5-2x the gather's
    time at SD scale on CPU (random writes); a permutation has an exact inverse, so the gradient is one more
    gather, grad_source = grad[inverse] (see `unshuffle_indices` for the surplus).
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


# ---- the whole layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Sizes and offsets of the super-vector, and the blocks of chunks that generate it."""

    shapes: tuple[Shape, ...]
    blocks: tuple[Block, ...]

    @property
    def total(self) -> int:
        """N: number of entries of ΔW_all."""
        return sum(o * i for o, i in self.shapes)

    @property
    def sizes(self) -> list[int]:
        return [o * i for o, i in self.shapes]

    @classmethod
    def build(cls, config: SuperLoRAConfig, shapes: list[Shape]) -> "Layout":
        shapes = [(int(o), int(i)) for o, i in shapes]
        if not shapes or min(min(s) for s in shapes) < 1:
            raise ValueError(f"SuperLoRA needs a non-empty list of positive (d_out, d_in) shapes, got {shapes}.")
        if config.groups == "shape":  # no chunks: `axes.py` factors each shape's weights along their own axes
            return cls(tuple(shapes), ())
        if config.groups == "weight":
            blocks = []
            for native in shapes:
                size = native[0] * native[1]
                fold, exact = fold_shape(config, projected_size(size, config.projection_ratio), native)
                blocks.append(Block(1, size, projected_size(size, config.projection_ratio), fold, exact))
        else:
            count, size = group_sizes(config, shapes)
            projected = projected_size(size, config.projection_ratio)
            fold, exact = fold_shape(config, projected)
            blocks = [Block(count, size, projected, fold, exact)]
        return cls(tuple(shapes), tuple(blocks))


# ---- reading the chunks in place ----------------------------------------------------------------
# Each block's chunks come out as one contiguous (count, row) tensor whose rows may be longer than the
# chunk size (folding surplus, Kronecker overshoot, Fastfood's power-of-two length), and the last group
# may run past N. Slicing those surpluses off would copy every entry forward and zero-fill + copy them
# backward; instead every weight is read as views between the unused stretches.
def row_segments(layout: Layout, rows: list[int]) -> list[list[tuple[int, int | None]]]:
    """Per block: (length, weight index, or None for surplus) along its flattened (count, row) tensor.

    `rows[b]` is the length of one row of block b (>= its chunk size). A weight whose entries straddle
    a chunk boundary gets several segments, in order.
    """
    offsets = [0]
    for size in layout.sizes:
        offsets.append(offsets[-1] + size)
    weight, start, per_block = 0, 0, []
    for block, row in zip(layout.blocks, rows):
        segments: list[tuple[int, int | None]] = []
        for chunk in range(block.count):
            lo, hi = start + chunk * block.size, min(start + (chunk + 1) * block.size, layout.total)
            pos = lo
            while pos < hi:
                while offsets[weight + 1] <= pos:
                    weight += 1
                end = min(hi, offsets[weight + 1])
                segments.append((end - pos, weight))
                pos = end
            surplus = row - max(0, hi - lo)
            if surplus and segments and segments[-1][1] is None:
                segments[-1] = (segments[-1][0] + surplus, None)
            elif surplus:
                segments.append((surplus, None))
        per_block.append(segments)
        start += block.count * block.size
    return per_block


def row_positions(layout: Layout, rows: list[int], positions: torch.Tensor) -> torch.Tensor:
    """Super-vector positions (chunk order, before unshuffling) -> positions in the concatenated flattened
    rows. Works in place on `positions` where it can: at SD scale it holds ~10^8 int64 entries."""
    if all(row == block.size for block, row in zip(layout.blocks, rows)):
        return positions
    if len(layout.blocks) == 1:
        (block,), (row,) = layout.blocks, rows
        shift = positions.div(block.size, rounding_mode="floor").mul_(row - block.size)
        return positions.add_(shift)
    starts = torch.tensor([0] + [b.count * b.size for b in layout.blocks]).cumsum(0)
    row_starts = torch.tensor([0] + [b.count * r for b, r in zip(layout.blocks, rows)]).cumsum(0)
    sizes, widths = torch.tensor([b.size for b in layout.blocks]), torch.tensor(rows)
    which = torch.searchsorted(starts[1:], positions, right=True)
    local = positions - starts[which]
    chunk = local.div(sizes[which], rounding_mode="floor")
    return row_starts[which] + chunk * widths[which] + (local - chunk * sizes[which])
