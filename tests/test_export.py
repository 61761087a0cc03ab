"""SVD / exact exports of per-layer ΔW (the math; loading the exports is tested with the pipeline)."""

import pytest
import torch

from superlora_diffusers.export import (
    kohya_key,
    overall_error,
    svd_factors,
    to_diff_state_dict,
    to_lora_state_dict,
)


def low_rank(d_out, d_in, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g)


def test_svd_is_exact_at_the_true_rank_and_monotone():
    delta = low_rank(20, 12, 3)
    down, up, err = svd_factors(delta, rank=3)
    assert down.shape == (3, 12) and up.shape == (20, 3)
    assert err < 1e-6
    torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=1e-4)
    errors = [svd_factors(torch.randn(16, 16), rank=r)[2] for r in (1, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6


def test_energy_threshold_picks_the_smallest_rank():
    delta = low_rank(30, 30, 5) + 1e-4 * torch.randn(30, 30)
    down, _, err = svd_factors(delta, energy=0.999)
    assert down.shape[0] == 5 and err < 0.01
    with pytest.raises(ValueError, match="exactly one"):
        svd_factors(delta)


def test_state_dict_formats():
    deltas = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": low_rank(8, 8, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": low_rank(6, 6, 1),
    }
    diffusers_sd, errors = to_lora_state_dict(deltas, rank=2)
    assert set(diffusers_sd) == {f"{n}.lora_{ab}.weight" for n in deltas for ab in "AB"}
    assert all(e.relative_error < 1e-5 for e in errors) and overall_error(deltas, errors) < 1e-5
    kohya_sd, _ = to_lora_state_dict(deltas, rank=1, kohya=True)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya_sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya_sd
    diff = to_diff_state_dict(deltas)
    for name, delta in deltas.items():
        assert torch.equal(diff[f"{kohya_key(name)}.diff"], delta)
