"""`SuperLoRA`: one small set of trainable factors that generates the ΔW of every adapted weight.

Read top to bottom, one forward call does:
  factors (op. 5) -> chunks of ρ·N_g entries -> projection (op. 4) -> chunks of N_g entries
  -> concatenate the groups (op. 1), skip the folding surplus (op. 2) -> unshuffle (op. 3)
  -> split at each weight's offset -> reshape to (d_out, d_in).
Every step is a view where it can be: surplus entries are stepped over, never sliced off (a slice
copies every entry forward and zero-fills + copies them backward: at SD scale most of the cost).
alpha / rank is applied inside the factors, to the small zero-initialised tensor, never to an N-sized one.
Grouping and folding mix layers, so the per-layer shortcut x·A·B is unavailable: the whole super-vector
is materialised once per model forward and every adapted layer reads its slice. The weight-aligned LoRA
layout is the exception: `low_rank()` hands each of its layers its own (B, A) for training; so does
`groups="shape"` (`axes.py`), which factors each shape's weights along their own axes instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .axes import AxisTucker, Factors, axis_parameter_shapes
from .config import SuperLoRAConfig
from .factorization import ChunkFactors, chunk_numel, factor_shapes
from .layout import Block, Layout, Shape, Unshuffle, row_positions, row_segments, shuffle_index, unshuffle_indices
from .projection import Fastfood, build_projection
from .tokens import TokenOffsets


class SuperLoRA(nn.Module):
    """Generates [ΔW_1, …, ΔW_L] (already scaled by alpha / rank) for the given (d_out, d_in) shapes."""

    def __init__(self, config: SuperLoRAConfig, shapes: list[Shape], kernels: list[int] | None = None) -> None:
        """`kernels`: each weight's k_h·k_w (1 for a Linear), which `kernel_axis` factors apart; else unused."""
        super().__init__()
        self.config = config
        self.layout = Layout.build(config, shapes)
        if config.groups == "shape":  # each shape's weights factored along their own axes: no super-vector pass
            self.axes = AxisTucker(config, self.layout.shapes, kernels)
        else:
            self._build_super_vector(config)
        if config.token is not None:  # pivotal tuning: the identifier's embedding offsets, applied by model.py
            self.tokens = TokenOffsets(config)

    def _build_super_vector(self, config: SuperLoRAConfig) -> None:
        """Operations 1-5: the factors of every block, their projections, and how the rows map to weights."""
        self.blocks = nn.ModuleList(ChunkFactors(config, block) for block in self.layout.blocks)
        self.projections = nn.ModuleList(
            build_projection(config.projection, block.projected, block.size, config.projection_seed + i)
            for i, block in enumerate(self.layout.blocks)
        )
        # Each block's chunks arrive as one (count, row) tensor, rows >= the chunk size: read in place.
        rows = [row_length(config, block, projection) for block, projection in zip(self.layout.blocks, self.projections)]
        if config.shuffle:  # the gather reads every weight's entries straight out of the rows
            index = row_positions(self.layout, rows, shuffle_index(self.layout.total, config.shuffle_seed))
            index, inverse = unshuffle_indices(index, sum(b.count * r for b, r in zip(self.layout.blocks, rows)))
            self.register_buffer("unshuffle", index, persistent=False)
            self.register_buffer("reshuffle", inverse, persistent=False)
        else:  # per block: the split sizes along its rows, and which weight (or None: surplus) each piece is
            self.segments = [([length for length, _ in segs], [weight for _, weight in segs])
                             for segs in row_segments(self.layout, rows)]
        self.low_rank_slots = low_rank_slots(config, self.layout, rows)

    @property
    def shapes(self) -> list[Shape]:
        return list(self.layout.shapes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_initialised(self) -> list[nn.Parameter]:
        """The tensors that start at zero (LoRA's B, the Tucker cores): LoRA+ trains them at their own rate.
        None in a projected axes layout: its one vector v moves every factor at once."""
        if self.config.groups == "shape":
            return [] if self.axes.vector is not None else [group.core for group in self.axes.groups]
        return [getattr(factors, factors.zero_name) for factors in self.blocks]

    def forward(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """All ΔW, one (d_out, d_in) tensor per shape, in `dtype` (default: the factors' dtype)."""
        if self.config.groups == "shape":
            return [delta if dtype is None else delta.to(dtype) for delta in self.axes(self.axis_factors())]
        rows = [self._rows(factors, projection, block)
                for factors, projection, block in zip(self.blocks, self.projections, self.layout.blocks)]
        if self.config.shuffle:  # the gather index points past every surplus: nothing to trim first
            flat = rows[0] if len(rows) == 1 else torch.cat(rows)
            flat = Unshuffle.apply(flat, self.unshuffle, self.reshuffle)
            flats = list(flat.split(self.layout.sizes + [flat.numel() - self.layout.total]))  # a padding slot
            flats = flats[: len(self.layout.shapes)]
        else:
            pieces: list[list[torch.Tensor]] = [[] for _ in self.layout.shapes]
            for flat, (lengths, owners) in zip(rows, self.segments):
                parts = flat.split(lengths) if len(lengths) > 1 else (flat,)
                for part, weight in zip(parts, owners):
                    if weight is not None:
                        pieces[weight].append(part)
            flats = [p[0] if len(p) == 1 else torch.cat(p) for p in pieces]  # cat only where a chunk boundary cuts
        out = []
        for piece, shape in zip(flats, self.layout.shapes):
            delta = piece.view(shape)
            out.append(delta if dtype is None else delta.to(dtype))
        return out

    def low_rank(self, weight: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with ΔW = B·A (alpha / rank in B) where a weight's chunk is the weight itself (plain LoRA), else None.

        Adapted layers then train on x·Aᵀ·Bᵀ, as peft does: no d_out × d_in ΔW and no dense weight gradient.
        `groups="shape"` always has such factors (U_out·C_l·γ, U_inᵀ).
        """
        if self.config.groups == "shape":
            return self.axes.low_rank(weight, self.axis_factors())
        slot = self.low_rank_slots[weight]
        if slot is None:
            return None
        block, chunk = slot
        factors = self.blocks[block]
        b = factors.lora_B[chunk]
        return (b * factors.scale if factors.scale != 1 else b), factors.lora_A[chunk]

    def axis_factors(self) -> list[Factors]:
        """The axes layout's tensors for one use (with a projection, θ0 + F·v: what a generator caches per forward)."""
        return self.axes.factors()

    def _rows(self, factors: ChunkFactors, projection: nn.Module, block: Block) -> torch.Tensor:
        """One block's chunks, flattened row after row, surplus entries included (operations 5 then 4)."""
        chunks = factors()
        if isinstance(projection, Fastfood):
            chunks = projection(_narrow(chunks, block.projected), keep_padding=True)
        elif not isinstance(projection, nn.Identity):
            chunks = projection(_narrow(chunks, block.projected))
        return chunks.reshape(-1)


def row_length(config: SuperLoRAConfig, block: Block, projection: nn.Module) -> int:
    """Entries of one row of a block's (count, row) output: what the projection, or else the factors, produce."""
    if isinstance(projection, Fastfood):
        return projection.length
    if isinstance(projection, nn.Identity):
        return chunk_numel(config, block)
    return block.size


def low_rank_slots(config: SuperLoRAConfig, layout: Layout, rows: list[int]) -> list[tuple[int, int] | None]:
    """Per weight: (block, chunk) when that chunk is exactly the weight's own B·A, else None."""
    slots: list[tuple[int, int] | None] = [None] * len(layout.shapes)
    if config.factorization != "lora" or config.shuffle or config.projection != "none":
        return slots
    for b, (block, segments) in enumerate(zip(layout.blocks, row_segments(layout, rows))):
        if block.exact and len(segments) == block.count and all(w is not None for _, w in segments):
            for chunk, (_, weight) in enumerate(segments):
                slots[weight] = (b, chunk)
    return slots


def _narrow(t: torch.Tensor, size: int) -> torch.Tensor:
    """The first `size` entries of the last dimension; no slice at all when nothing is cut (its backward copies)."""
    return t if t.shape[-1] == size else t[..., :size]


def parameter_shapes(config: SuperLoRAConfig, shapes: list[Shape],
                     kernels: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """`SuperLoRA(config, shapes, kernels).state_dict()` names -> shapes, computed without allocating anything."""
    if config.groups == "shape":
        out = axis_parameter_shapes(config, shapes, kernels)
    else:
        layout = Layout.build(config, shapes)
        out = {f"blocks.{i}.{name}": shape
               for i, block in enumerate(layout.blocks) for name, shape in factor_shapes(config, block).items()}
    if config.token is not None:
        out["tokens.delta"] = (len(config.token_ids), config.token_dim)
    return out


def count_parameters(config: SuperLoRAConfig, shapes: list[Shape], kernels: list[int] | None = None) -> int:
    """Trainable parameters of `SuperLoRA(config, shapes, kernels)`, computed without allocating anything."""
    return sum(math.prod(s) for s in parameter_shapes(config, shapes, kernels).values())


def lora_parameter_count(shapes: list[Shape], rank: int = 1) -> int:
    """Parameters of a plain per-weight LoRA of the same targets: r·Σ(d_out + d_in)."""
    return rank * sum(o + i for o, i in shapes)


def versus_lora1(num_parameters: int, lora1: int) -> str:
    """How a rank-1 LoRA of the same targets compares, in words that read right on either side of 1."""
    if lora1 == 0:
        return "no weight matrix is adapted"
    if lora1 >= num_parameters:
        return f"{lora1 / max(num_parameters, 1):,.1f}x more than this adapter"
    return f"{num_parameters / max(lora1, 1):,.1f}x fewer than this adapter"
