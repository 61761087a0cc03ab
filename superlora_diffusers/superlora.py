"""`SuperLoRA`: one small set of trainable factors that generates the ΔW of every adapted weight.

Read top to bottom, one forward call does:
  factors (op. 5) -> chunks of ρ·N_g entries -> projection (op. 4) -> chunks of N_g entries
  -> concatenate the groups (op. 1), drop the folding surplus (op. 2) -> unshuffle (op. 3)
  -> split at each weight's offset -> reshape to (d_out, d_in).
alpha / rank is applied inside the factors, to the small zero-initialised tensor, never to an N-sized one.
Grouping and folding mix layers, so the per-layer shortcut x·A·B is unavailable: the whole super-vector
is materialised once per model forward and every adapted layer reads its slice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SuperLoRAConfig
from .factorization import ChunkFactors, factor_shapes
from .layout import Layout, Shape, shuffle_index
from .projection import build_projection


class SuperLoRA(nn.Module):
    """Generates [ΔW_1, …, ΔW_L] (already scaled by alpha / rank) for the given (d_out, d_in) shapes."""

    def __init__(self, config: SuperLoRAConfig, shapes: list[Shape]) -> None:
        super().__init__()
        self.config = config
        self.layout = Layout.build(config, shapes)
        self.blocks = nn.ModuleList(ChunkFactors(config, block) for block in self.layout.blocks)
        self.projections = nn.ModuleList(
            build_projection(config.projection, block.projected, block.size, config.projection_seed + i)
            for i, block in enumerate(self.layout.blocks)
        )
        # Weight-aligned chunks without shuffle map one-to-one onto the weights: no concatenation needed.
        self.aligned = config.groups == "weight" and not config.shuffle
        if config.shuffle:
            self.register_buffer("unshuffle", shuffle_index(self.layout.total, config.shuffle_seed), persistent=False)

    @property
    def shapes(self) -> list[Shape]:
        return list(self.layout.shapes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """All ΔW, one (d_out, d_in) tensor per shape, in `dtype` (default: the factors' dtype)."""
        chunks = [
            projection(_narrow(factors(), block.projected)).reshape(-1)
            for factors, projection, block in zip(self.blocks, self.projections, self.layout.blocks)
        ]
        if self.aligned:
            flats = [_narrow(c, size) for c, size in zip(chunks, self.layout.sizes)]
        else:
            flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            if self.config.shuffle:  # the gather index never reaches the surplus: no trimming needed first
                flat = flat.index_select(0, self.unshuffle)
            # The folding surplus rides along as a last, unused piece: one copy in backward instead of two.
            surplus = flat.numel() - self.layout.total
            flats = flat.split(self.layout.sizes + ([surplus] if surplus else []))
        out = []
        for piece, shape in zip(flats, self.layout.shapes):
            delta = piece.view(shape)
            out.append(delta if dtype is None else delta.to(dtype))
        return out


def _narrow(t: torch.Tensor, size: int) -> torch.Tensor:
    """The first `size` entries of the last dimension; no slice at all when nothing is cut (its backward copies)."""
    return t if t.shape[-1] == size else t[..., :size]


def parameter_shapes(config: SuperLoRAConfig, shapes: list[Shape]) -> dict[str, tuple[int, ...]]:
    """`SuperLoRA(config, shapes).state_dict()` names -> shapes, computed without allocating anything."""
    layout = Layout.build(config, shapes)
    return {
        f"blocks.{i}.{name}": shape
        for i, block in enumerate(layout.blocks) for name, shape in factor_shapes(config, block).items()
    }


def count_parameters(config: SuperLoRAConfig, shapes: list[Shape]) -> int:
    """Trainable parameters of `SuperLoRA(config, shapes)`, computed without allocating anything."""
    return sum(math.prod(s) for s in parameter_shapes(config, shapes).values())


def lora_parameter_count(shapes: list[Shape], rank: int = 1) -> int:
    """Parameters of a plain per-weight LoRA of the same targets: r·Σ(d_out + d_in)."""
    return rank * sum(o + i for o, i in shapes)
