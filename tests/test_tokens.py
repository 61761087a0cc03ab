"""Pivotal tuning: the identifier word's embedding offsets, trained, saved, loaded, scaled, fused and unloaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import generate, tiny_pipeline
from test_pipeline import add_random_adapter
from test_training import WEIGHTS, factors, train

from superlora_diffusers import SuperLoRAConfig, SuperLoRAFileError, count_parameters
from superlora_diffusers.tokens import token_ids_for

AXES = dict(factorization="tucker", fold=3, groups="shape", rank=2, target_modules="unet+text")


def token_config(pipe, word: str = "sks", **kw) -> SuperLoRAConfig:
    return SuperLoRAConfig(**{**AXES, **kw}, token=word, token_ids=token_ids_for(pipe.tokenizer, word),
                           token_dim=pipe.text_encoder.get_input_embeddings().embedding_dim)


def encode(pipe, prompt: str, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False, **kw)[0]


def test_config_round_trip_and_counts():
    config = SuperLoRAConfig(**AXES, token="sks", token_ids=[7, 8, 9], token_dim=32)
    assert SuperLoRAConfig.from_dict(config.to_dict()) == config
    plain = SuperLoRAConfig(**AXES)
    assert "token" not in plain.to_dict()  # files without pivotal tuning stay readable by older releases
    assert count_parameters(config, [(32, 32)] * 3) == count_parameters(plain, [(32, 32)] * 3) + 3 * 32
    with pytest.raises(ValueError, match="token_ids and token_dim"):
        SuperLoRAConfig(**AXES, token="sks")


def test_offsets_touch_only_prompts_with_the_word_and_follow_scale_disable_fuse_unload():
    pipe = tiny_pipeline()
    base_word, base_other = encode(pipe, "a photo of sks star"), encode(pipe, "a photo of a cat")
    module = add_random_adapter(pipe, token_config(pipe), std=0.1)
    assert len(module.tokens.ids) == 3  # the byte-level test tokenizer spells "sks" as 3 ids: one offset each
    adapted = encode(pipe, "a photo of sks star")
    assert not torch.allclose(adapted, base_word)
    with torch.no_grad():  # only the offsets: the word's prompt moves, a prompt without it does not
        for p in module.parameters():
            if p is not module.tokens.delta:
                p.zero_()
    assert torch.equal(encode(pipe, "a photo of a cat"), base_other)  # (the test tokenizer spells words byte by byte)
    assert not torch.allclose(encode(pipe, "a photo of sks star"), base_word)
    assert torch.equal(encode(pipe, "a photo of sks star", lora_scale=0.0), base_word)
    pipe.disable_superlora()
    assert torch.equal(encode(pipe, "a photo of sks star"), base_word)
    pipe.enable_superlora()
    unfused = encode(pipe, "a photo of sks star")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    pipe.fuse_superlora()
    torch.testing.assert_close(encode(pipe, "a photo of sks star"), unfused, rtol=1e-5, atol=1e-6)
    pipe.unfuse_superlora()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    pipe.unload_superlora_weights()
    assert torch.equal(encode(pipe, "a photo of sks star"), base_word)


def test_save_load_round_trip_and_a_tokenizer_that_disagrees_is_refused(tmp_path):
    pipe = tiny_pipeline()
    add_random_adapter(pipe, token_config(pipe), std=0.1)
    adapted = generate(pipe)
    pipe.save_superlora_weights(tmp_path / "a")
    fresh = tiny_pipeline()
    fresh.load_superlora_weights(tmp_path / "a")
    assert torch.equal(generate(fresh), adapted)
    assert fresh.get_superlora_info()["config"]["token"] == "sks"

    other = tiny_pipeline()
    state, metadata = other.superlora_state_dict(tmp_path / "a")
    config = SuperLoRAConfig.from_dict(__import__("json").loads(metadata["config"]))
    metadata["config"] = __import__("json").dumps(dataclasses.replace(config, token_ids=(1, 2, 3)).to_dict())
    with pytest.raises(SuperLoRAFileError, match="another base model: its word 'sks'"):
        other.load_superlora_weights(state, metadata=metadata)
    assert not other.get_list_superlora_adapters() and not hasattr(other.unet, "peft_config")  # untouched


@pytest.mark.slow
def test_trainer_train_text_encoder_ti_trains_and_saves_the_offsets(tmp_path):
    base_dir = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(base_dir)
    run = train(base_dir, tmp_path / "run", "--max_train_steps", "3", "--train_batch_size", "2",
                "--superlora_preset", "lorta", "--factorization", "tucker", "--groups", "shape", "--fold", "3",
                "--rank", "2", "--train_text_encoder_ti", "--text_encoder_lr", "5e-2", "--report_to", "none")
    assert run.returncode == 0, run.stderr[-2000:]
    trained = factors(tmp_path / "run" / WEIGHTS)
    assert trained["superlora.tokens.delta"].shape == (3, 32) and trained["superlora.tokens.delta"].abs().max() > 0
    bad = train(base_dir, tmp_path / "bad", "--max_train_steps", "1", "--train_text_encoder_ti",
                "--token_abstraction", "zwx")
    assert bad.returncode != 0 and "--token_abstraction 'zwx' is not a word of --instance_prompt" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_train_text_encoder_ti_frac_stops_the_embedding_at_the_pivot_and_not_the_adapter(tmp_path):
    """diffusers' pivot: with --train_text_encoder_ti_frac 0.5 over 4 steps the embedding moves in steps 1-2 only, the
    factors in all four; a run resumed past the pivot keeps the embedding where it stopped."""
    base_dir = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(base_dir)
    args = ("--train_batch_size", "2", "--superlora_preset", "lorta", "--factorization", "tucker", "--groups", "shape",
            "--fold", "3", "--rank", "2", "--train_text_encoder_ti", "--text_encoder_lr", "5e-2", "--report_to", "none",
            "--checkpointing_steps", "1", "--train_text_encoder_ti_frac", "0.5")
    run = train(base_dir, tmp_path / "run", "--max_train_steps", "4", *args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 2: the embedding stops training (--train_text_encoder_ti_frac 0.5)" in run.stderr
    at = {s: factors(tmp_path / "run" / f"checkpoint-{s}" / WEIGHTS) for s in (1, 2)}
    final = factors(tmp_path / "run" / WEIGHTS)
    token = "superlora.tokens.delta"
    assert not torch.equal(at[1][token], at[2][token]) and torch.equal(at[2][token], final[token])
    moved = [k for k in final if k != token and not torch.equal(at[2][k], final[k])]
    assert moved  # the adapter trains on after the pivot
    resumed = train(base_dir, tmp_path / "run", "--max_train_steps", "6", *args, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.equal(factors(tmp_path / "run" / WEIGHTS)[token], final[token])


def test_export_to_lora_refuses_instead_of_dropping_the_embedding(tmp_path):
    from superlora_diffusers.export import ExportError, export_state_dict

    pipe = tiny_pipeline()
    add_random_adapter(pipe, token_config(pipe), std=0.1)
    pipe.save_superlora_weights(tmp_path / "a")
    for to in ("lora", "kohya", "diff"):
        with pytest.raises(ExportError, match="trains the embedding of 'sks'.*superlora merge"):
            export_state_dict(tmp_path / "a", to=to)
