"""Real Stable Diffusion 1.5 and SDXL layer shapes (published configs, random weights, no hub).

Targets are enumerated on the meta device (nothing allocated); the forward passes use bf16 weights filled
from one small random buffer, so a 2.6B-parameter SDXL UNet is built in seconds.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import superlora_diffusers  # noqa: F401
from superlora_diffusers import SuperLoRAConfig, count_parameters, find_targets, lora_parameter_count
from superlora_diffusers.components import inject_superlora, remove_superlora

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)


def build(cls, config, materialise: bool):
    with torch.device("meta"):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    if materialise:
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        noise = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                flat = t.view(-1)
                flat.copy_(noise.repeat(math.ceil(flat.numel() / noise.numel()))[: flat.numel()])
    return model


def sd15(materialise: bool = False) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {"unet": build(UNet2DConditionModel, SD15_UNET, materialise),
            "text_encoder": build(CLIPTextModel, CLIPTextConfig(**CLIP_L), False)}


def sdxl(materialise: bool = False) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {"unet": build(UNet2DConditionModel, SDXL_UNET, materialise),
            "text_encoder": build(CLIPTextModel, CLIPTextConfig(**CLIP_L), False),
            "text_encoder_2": build(CLIPTextModelWithProjection, CLIPTextConfig(**CLIP_BIGG), False)}


def test_sd15_targets_match_the_published_lora_counts():
    comps = sd15()
    unet, text = find_targets(comps, "unet"), find_targets(comps, "text")
    assert len(unet) == 16 * 2 * 4 and len(text) == 12 * 4
    # anchors §7: a rank-1 LoRA of SD 1.5's UNet attention has 199,296 parameters, of CLIP ViT-L's 73,728
    assert lora_parameter_count([t.shape for t in unet]) == 199_296
    assert lora_parameter_count([t.shape for t in text]) == 73_728
    cross_kv = [t for t in unet if ".attn2.to_k" in t.name]
    assert {t.shape[1] for t in cross_kv} == {768} and {t.shape[0] for t in cross_kv} == {320, 640, 1280}
    entries = sum(o * i for o, i in (t.shape for t in unet + text))
    assert 110e6 < entries < 125e6  # "about 121 million" adapted entries


def test_sdxl_targets_span_both_text_encoders():
    comps = sdxl()
    unet = find_targets(comps, "unet")
    both = find_targets(comps, "unet+text")
    # 70 transformer blocks (down 4 + 20, mid 10, up 30 + 6) x 2 attentions x 4 projections
    assert len(unet) == 560
    # per block at width c: attn1 4·2c, attn2 q/out 2·2c and k/v 2·(c + 2048): 14c + 4096; 10 blocks at 640, 60 at 1280
    assert lora_parameter_count([t.shape for t in unet]) == 10 * (14 * 640 + 4096) + 60 * (14 * 1280 + 4096)
    te1 = [t for t in both if t.component == "text_encoder"]
    te2 = [t for t in both if t.component == "text_encoder_2"]
    assert len(te1) == 48 and len(te2) == 128 and te2[0].shape == (1280, 1280)
    assert [t.name for t in both[:560]] == [t.name for t in unet]


# SDXL's UNet attention holds ~950M ΔW entries (3.8 GB in fp32): its forward test adapts the 640-wide blocks
# only, so the suite fits a 24 GB machine; the enumeration test above covers all 560 targets.
TARGETS = {"sd15": "unet", "sdxl": [r"unet\.(down_blocks\.1|up_blocks\.1)\..*attn[12]\.(to_q|to_k|to_v|to_out\.0)"]}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_shared_superlora_forward_on_real_shapes(family):
    comps = sd15(materialise=True) if family == "sd15" else sdxl(materialise=True)
    for c in comps.values():
        c.requires_grad_(False)
    config = SuperLoRAConfig.lorta(fold=3, groups=12, rank=5, target_modules=TARGETS[family])
    targets = find_targets(comps, TARGETS[family])
    module = inject_superlora(comps, config)
    shapes = [t.shape for t in targets]
    assert module.num_parameters() == count_parameters(config, shapes) < lora_parameter_count(shapes) / 4
    with torch.no_grad():
        deltas = module()
        assert [tuple(d.shape) for d in deltas] == shapes
        assert all(float(d.abs().max()) == 0.0 for d in deltas)  # zero at initialisation
        del deltas
        for p in module.parameters():
            p.normal_(0, 0.2)

    cross = 768 if family == "sd15" else 2048
    sample = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    hidden = torch.randn(1, 77, cross, dtype=torch.bfloat16)
    extra = {} if family == "sd15" else {"added_cond_kwargs": {
        "text_embeds": torch.randn(1, 1280, dtype=torch.bfloat16), "time_ids": torch.randn(1, 6, dtype=torch.bfloat16)}}
    with torch.no_grad():
        adapted = comps["unet"](sample, 10, hidden, **extra).sample
        base = comps["unet"](sample, 10, hidden, cross_attention_kwargs={"scale": 0.0}, **extra).sample
    assert adapted.shape == (1, 4, 8, 8) and torch.isfinite(adapted).all()
    assert not torch.equal(adapted, base)
    remove_superlora(comps)  # the generator and its hooks reference the UNet: free gigabytes now
    del comps
    gc.collect()
