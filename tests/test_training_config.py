"""The trainer's shape: one `TrainingConfig` behind every flag, short functions, no imports back up into the CLI/app."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from superlora_diffusers.training import TrainingConfig, TrainingError, build_parser, parse_args

PACKAGE = Path(__file__).resolve().parents[1] / "superlora_diffusers" / "training"


def test_every_flag_is_one_field_and_back():
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(TrainingConfig)}
    config = parse_args(["--instance_data_dir", "d", "--instance_prompt", "a sks star", "--no-shuffle",
                         "--learning_rate", "3e-3", "--resolution", "32", "--train_text_encoder_ti"])
    assert isinstance(config, TrainingConfig) and config.shuffle is False and config.learning_rate == 3e-3
    assert config.resolution == 32 and config.train_text_encoder_ti and config.seed == 0
    defaults = parse_args(["--instance_data_dir", "d", "--instance_prompt", "p"])
    assert defaults == TrainingConfig(instance_data_dir="d", instance_prompt="p")  # the parser's defaults are the fields'


def test_a_config_built_in_code_is_checked_like_the_command_line():
    with pytest.raises(TrainingError, match="--instance_data_dir is required"):
        TrainingConfig(instance_prompt="p").validate()
    with pytest.raises(TrainingError, match="--token_abstraction 'sks' is not a word"):
        TrainingConfig(instance_data_dir="d", instance_prompt="a photo", train_text_encoder_ti=True).validate()
    pivotal = dict(instance_data_dir="d", instance_prompt="a sks star", train_text_encoder_ti=True)
    for frac in (0.0, 1.5):
        with pytest.raises(TrainingError, match=f"--train_text_encoder_ti_frac must be in \\(0, 1\\], got {frac}"):
            TrainingConfig(**pivotal, train_text_encoder_ti_frac=frac).validate()
    with pytest.raises(TrainingError, match="add --train_text_encoder_ti, or drop it"):
        TrainingConfig(instance_data_dir="d", instance_prompt="a sks star", train_text_encoder_ti_frac=0.5).validate()
    TrainingConfig(**pivotal, train_text_encoder_ti_frac=0.5).validate()


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_package_reads_in_short_functions_and_never_imports_the_cli_or_app():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in functions(tree):
            length = fn.end_lineno - fn.lineno + 1
            assert length < (100 if fn.name == "train" else 80), f"{path.name}:{fn.name} is {length} lines"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert not name.startswith(("..cli", "app", "superlora_diffusers.cli")), f"{path.name} imports {name}"


def test_peft_adapters_refuse_superlora_only_options_up_front():
    base = ["--instance_data_dir", "d", "--instance_prompt", "a sks star"]
    with pytest.raises(TrainingError, match="--adapter vera adapts nn.Linear layers only"):
        parse_args(base + ["--adapter", "vera", "--target_modules", "unet+conv"])
    with pytest.raises(TrainingError, match="--param_budget is SuperLoRA's"):
        parse_args(base + ["--adapter", "lora", "--param_budget", "5000"])
    with pytest.raises(TrainingError, match="peft trains token rows beside LoRA only"):
        parse_args(base + ["--adapter", "vera", "--train_text_encoder_ti"])
    with pytest.raises(TrainingError, match="--adapter trainable_tokens trains the embedding of --token_abstraction "
                                            "alone; drop --train_text_encoder"):
        parse_args(base + ["--adapter", "trainable_tokens", "--train_text_encoder"])
    with pytest.raises(TrainingError, match="--token_abstraction 'sks' is not a word"):
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "a star", "--adapter", "trainable_tokens"])
    with pytest.raises(TrainingError, match="--loraplus_lr_ratio beside --adapter vera"):
        parse_args(base + ["--adapter", "vera", "--loraplus_lr_ratio", "16"])
    with pytest.raises(TrainingError, match="--loraplus_lr_ratio must be > 0, got 0.0"):
        parse_args(base + ["--loraplus_lr_ratio", "0"])
    assert parse_args(base + ["--adapter", "lora", "--loraplus_lr_ratio", "16"]).loraplus_lr_ratio == 16.0
    assert parse_args(base + ["--adapter", "lokr", "--target_modules", "unet+conv"]).adapter == "lokr"
    assert parse_args(base + ["--adapter", "lora", "--train_text_encoder_ti"]).trains_embedding


def test_timestep_bias_draws_the_biased_timesteps_more_often_and_none_stays_uniform():
    """diffusers' --timestep_bias_strategy: 'earlier' x3 over half the steps draws 3/4 of the timesteps there; 'none'
    is the uniform draw every earlier run made, bit for bit; bad settings are one line each."""
    from superlora_diffusers.training.setup import timestep_weights
    from superlora_diffusers.training.step import sample_timesteps

    def draw(cfg, num_timesteps, n, g):
        return sample_timesteps(timestep_weights(cfg, num_timesteps), num_timesteps, n, g)

    base = dict(instance_data_dir="d", instance_prompt="a sks star")
    early = TrainingConfig(**base, timestep_bias_strategy="earlier", timestep_bias_multiplier=3.0,
                           timestep_bias_portion=0.5).validate()
    drawn = draw(early, 1000, 20_000, torch.Generator().manual_seed(0))
    assert 0.73 < (drawn < 500).float().mean() < 0.77 and drawn.min() >= 0 and drawn.max() < 1000
    late = dataclasses.replace(early, timestep_bias_strategy="later")
    assert 0.73 < (draw(late, 1000, 20_000, torch.Generator().manual_seed(0)) >= 500).float().mean() < 0.77
    band = TrainingConfig(**base, timestep_bias_strategy="range", timestep_bias_multiplier=1e6, timestep_bias_begin=200,
                          timestep_bias_end=300).validate()
    drawn = draw(band, 1000, 1_000, torch.Generator().manual_seed(0))
    assert ((drawn >= 200) & (drawn < 300)).float().mean() > 0.99
    plain = TrainingConfig(**base)
    assert torch.equal(draw(plain, 1000, 8, torch.Generator().manual_seed(1)),
                       torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(TrainingError, match="is past the scheduler's 500 timesteps; use at most 500"):
        draw(dataclasses.replace(band, timestep_bias_end=1000), 500, 4, torch.Generator())
    with pytest.raises(TrainingError, match="--timestep_bias_strategy needs --timestep_bias_multiplier > 0"):
        TrainingConfig(**base, timestep_bias_strategy="earlier", timestep_bias_portion=0.0).validate()
