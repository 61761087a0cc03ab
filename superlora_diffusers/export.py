"""Exits to the LoRA ecosystem: per-layer ΔW as a plain LoRA (truncated SVD) or as exact `.diff` keys.

Input everywhere is `{qualified_name: ΔW}` with names like `unet.down_blocks.0.…attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (the integration's target names), ΔW already
scaled. Output formats:
- diffusers / peft: `<name>.lora_A.weight` (r, d_in) and `<name>.lora_B.weight` (d_out, r); loads with
  `pipe.load_lora_weights` (alpha = r, so the scale is 1).
- kohya / A1111 / ComfyUI: `lora_unet_<path_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (`lora_te_`, `lora_te1_`, `lora_te2_` for text encoders).
- exact: `lora_unet_<path>.diff` (the full ΔW; large but lossless).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


@dataclass
class LayerError:
    name: str
    rank: int
    relative_error: float  # ||ΔW - up·down||_F / ||ΔW||_F


def svd_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r, d_in), up (d_out, r), relative Frobenius error) of the best rank-r approximation.

    `rank` fixes r; `energy` picks the smallest r keeping that fraction of Σσ² (e.g. 0.99).
    """
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank= or energy= for the SVD export.")
    w = delta.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy={energy} must be in (0, 1].")
        cumulative = torch.cumsum(s**2, 0) / max(float((s**2).sum()), 1e-300)
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    rank = max(1, min(int(rank), s.numel()))
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    norm = float(w.norm())
    error = float((w - up @ down).norm()) / norm if norm > 0 else 0.0
    return down.to(delta.dtype), up.to(delta.dtype), error


def kohya_key(name: str) -> str:
    component, _, path = name.partition(".")
    return f"{KOHYA_PREFIX.get(component, 'lora_' + component)}_{path.replace('.', '_')}"


def to_lora_state_dict(deltas: dict[str, torch.Tensor], rank: int | None = None, energy: float | None = None,
                       kohya: bool = False) -> tuple[dict[str, torch.Tensor], list[LayerError]]:
    """SVD-truncated LoRA of every ΔW, in diffusers/peft or kohya key format, with per-layer errors."""
    state, errors = {}, []
    for name, delta in deltas.items():
        down, up, err = svd_factors(delta.float(), rank, energy)
        r = down.shape[0]
        errors.append(LayerError(name, r, err))
        if kohya:
            key = kohya_key(name)
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(r))
        else:
            state[f"{name}.lora_A.weight"] = down.contiguous()
            state[f"{name}.lora_B.weight"] = up.contiguous()
    return state, errors


def to_diff_state_dict(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact export: the full per-layer ΔW under kohya-style `.diff` keys."""
    return {f"{kohya_key(name)}.diff": delta.detach().contiguous() for name, delta in deltas.items()}


def overall_error(deltas: dict[str, torch.Tensor], errors: list[LayerError]) -> float:
    """Relative Frobenius error of the whole super-vector: sqrt(Σ e_l²‖ΔW_l‖²) / ‖ΔW_all‖."""
    norms = {n: float(d.double().norm()) ** 2 for n, d in deltas.items()}
    total = sum(norms.values())
    return (sum(e.relative_error**2 * norms[e.name] for e in errors) / total) ** 0.5 if total > 0 else 0.0
