"""Shared fixtures: a tiny, randomly initialised Stable Diffusion pipeline built from configs (no hub)."""

from __future__ import annotations

import pytest
import torch


def tiny_tokenizer():
    """A CLIP tokenizer with a byte-level vocabulary and no merges (every word spelt out): tiny and offline."""
    from superlora_diffusers.toy.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer(model_max_length=32)


def tiny_components(seed: int = 0, cross_attention_dim: int = 32) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=16, sample_size=16,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_pipeline(seed: int = 0):
    import superlora_diffusers  # noqa: F401  (attaches the verbs)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL's structure at toy size: two CLIP text encoders (the second with a projection), pooled text embeds and
    time ids as added conditions, as in diffusers' own SDXL tests, built from configs."""
    import superlora_diffusers  # noqa: F401  (attaches the verbs)
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = tiny_components(seed, cross_attention_dim=64)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )
    tokenizer = parts["tokenizer"]
    clip = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=len(tokenizer) - 2,
                eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=parts["vae"], scheduler=parts["scheduler"], tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = "a photo of sks star", seed: int = 0, steps: int = 2, **kwargs) -> torch.Tensor:
    """Images as a float tensor (no PIL rounding), so tiny differences stay visible."""
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(seed), **kwargs)
    return out.images


@pytest.fixture
def pipe():
    return tiny_pipeline()


def benchmark_module(script: str, name: str):
    """benchmarks/<script> loaded as module `name` (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass in it looks its module up
    spec.loader.exec_module(module)
    return module
