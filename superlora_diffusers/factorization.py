"""Operation 5 of SuperLoRA: tensor factoring of each folded chunk (LoRA, Kronecker, Tucker).

`ChunkFactors` owns the trainable tensors of one `Block` (a batch of equally shaped chunks, leading
dimension G) and returns the chunks flattened, shape (G, prod(fold_shape)). `factor_shapes` is the same
arithmetic without allocating, so parameter counts are exact before anything is built.

Initialisation makes every chunk exactly zero with exactly one zero tensor (LoRA: B; Kronecker: the
first factor; Tucker: the core): the zero tensor gets a gradient at once and the others from the
second step on. Two zero tensors would freeze training.
"""

from __future__ import annotations

import math
import string

import torch
from torch import nn

from .config import SuperLoRAConfig
from .layout import Block, kron_split


def kron_factor_dims(config: SuperLoRAConfig, block: Block) -> list[tuple[int, int]]:
    """(rows, cols) of each Kronecker factor; their products cover the folded chunk."""
    rows, cols = block.fold_shape
    a = kron_split(rows, config.kron_splits, config.kron_factor, block.exact)
    b = kron_split(cols, config.kron_splits, config.kron_factor, block.exact)
    return list(zip(a, b))


def kron_factor_is_low_rank(config: SuperLoRAConfig, k: int, dims: tuple[int, int]) -> bool:
    """LyCORIS/peft rule: factor at rank r only when that saves parameters; the first factor only with
    `kron_decompose_both`."""
    if k == 0 and not config.kron_decompose_both:
        return False
    return config.rank < max(dims) / 2


def factor_shapes(config: SuperLoRAConfig, block: Block) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable tensor of one block (leading dim = number of chunks)."""
    g, r = block.count, config.rank
    if config.factorization == "lora":
        rows, cols = block.fold_shape
        return {"lora_A": (g, r, cols), "lora_B": (g, rows, r)}
    if config.factorization == "kronecker":
        shapes: dict[str, tuple[int, ...]] = {}
        for k, (a, b) in enumerate(kron_factor_dims(config, block)):
            if kron_factor_is_low_rank(config, k, (a, b)):
                shapes[f"w{k + 1}_a"] = (g, a, r)
                shapes[f"w{k + 1}_b"] = (g, r, b)
            else:
                shapes[f"w{k + 1}"] = (g, a, b)
        return shapes
    shapes = {"core": (g,) + (r,) * len(block.fold_shape)}
    for m, n in enumerate(block.fold_shape):
        shapes[f"factor_{m + 1}"] = (g, n, r)
    return shapes


def chunk_numel(config: SuperLoRAConfig, block: Block) -> int:
    """Entries of one chunk as the factors produce it: prod(fold_shape), or more where Kronecker overshoots."""
    if config.factorization == "kronecker":
        dims = kron_factor_dims(config, block)
        return math.prod(a for a, _ in dims) * math.prod(b for _, b in dims)
    return math.prod(block.fold_shape)


def zero_factor_name(config: SuperLoRAConfig, names: list[str]) -> str:
    """The one tensor initialised to zero so that ΔW starts at exactly zero."""
    if config.factorization == "lora":
        return "lora_B"
    if config.factorization == "kronecker":
        return "w1" if "w1" in names else "w1_a"
    return "core"


class ChunkFactors(nn.Module):
    """Trainable factors of one block of chunks; `forward()` returns the chunks, (G, prod(fold_shape))."""

    def __init__(self, config: SuperLoRAConfig, block: Block) -> None:
        super().__init__()
        self.factorization = config.factorization
        self.fold_shape = block.fold_shape
        self.kron_splits = config.kron_splits
        self.scale = config.scale
        shapes = factor_shapes(config, block)
        zero = zero_factor_name(config, list(shapes))
        self.zero_name = zero
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters(config, zero)

    @torch.no_grad()
    def reset_parameters(self, config: SuperLoRAConfig, zero: str) -> None:
        for name, p in self.named_parameters():
            if name == zero:
                p.zero_()
            elif self.factorization == "tucker":
                # Scale chosen so one optimizer step moves ΔW about as much as a LoRA of the same rank.
                order, n = len(self.fold_shape), p.shape[1]
                std = (config.rank ** ((1 - order) / 2) / math.sqrt(3 * n)) ** (1 / order)
                p.normal_(0.0, std)
            else:
                # kaiming_uniform(a=sqrt(5)) per chunk, as peft/LyCORIS: bound 1/sqrt(fan_in).
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.uniform_(-bound, bound)

    def scaled(self, name: str) -> torch.Tensor:
        """A factor; the zero-initialised one carries alpha / rank, applied to it (small) rather than to ΔW (N)."""
        p = getattr(self, name)
        return p * self.scale if name == self.zero_name and self.scale != 1 else p

    def forward(self) -> torch.Tensor:
        """The chunks, already multiplied by alpha / rank."""
        if self.factorization == "lora":
            chunk = self.scaled("lora_B") @ self.lora_A
        elif self.factorization == "kronecker":
            chunk = self._kronecker()
        else:
            chunk = self._tucker()
        return chunk.reshape(chunk.shape[0], -1)

    def _kronecker(self) -> torch.Tensor:
        """⊗_k w_k, batched over chunks; row-major like torch.kron(w1, w2)."""
        out = None
        for k in range(1, self.kron_splits + 1):
            if hasattr(self, f"w{k}"):
                w = self.scaled(f"w{k}")
            else:
                w = self.scaled(f"w{k}_a") @ self.scaled(f"w{k}_b")
            out = w if out is None else BatchedKron.apply(out, w)
        return out

    def _tucker(self) -> torch.Tensor:
        """core ×₁ factor_1 ×₂ factor_2 … ×_M factor_M, batched over chunks."""
        order = len(self.fold_shape)
        ranks, modes = string.ascii_lowercase[:order], string.ascii_uppercase[:order]
        spec = "z" + ranks + "," + ",".join(f"z{modes[m]}{ranks[m]}" for m in range(order)) + "->z" + modes
        factors = [getattr(self, f"factor_{m + 1}") for m in range(order)]
        return torch.einsum(spec, self.scaled("core"), *factors)


class BatchedKron(torch.autograd.Function):
    """kron(a[g], b[g]) for every chunk g, row-major like torch.kron, with a contraction backward.

    Autograd of the broadcast product (or of einsum's) materialises chunk-sized temporaries for each
    input's gradient; here each gradient is one batched matrix-vector pass over the output gradient
    (5x faster at SD scale).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        (g, a1, b1), (_, a2, b2) = a.shape, b.shape
        return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(g, a1 * a2, b1 * b2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        (g, a1, b1), (_, a2, b2) = a.shape, b.shape
        grad = grad.reshape(g, a1, a2, b1, b2)  # [g, i, k, j, l] = a[g, i, j] * b[g, k, l]
        grad_a = torch.matmul(grad, b[:, None, :, :, None]).sum(2).reshape(g, a1, b1) if ctx.needs_input_grad[0] else None
        grad_b = torch.matmul(a[:, :, None, None, :], grad).sum(1).reshape(g, a2, b2) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b
