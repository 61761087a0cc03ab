"""The `superlora` command: help, inspect, export, merge, generate, train; every bad input is one line + exit 2."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image
from safetensors.torch import load_file

from superlora_diffusers import SuperLoRAConfig
from superlora_diffusers.cli import main
from superlora_diffusers import inject_superlora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny base pipeline and a random (ΔW != 0) adapter for it."""
    root = tmp_path_factory.mktemp("cli")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "base")
    module = inject_superlora(pipe._superlora_components(),
                              SuperLoRAConfig.lorta(fold=3, groups=2, rank=3, target_modules="unet+text"))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    pipe.save_superlora_weights(root / "adapter", metadata={"instance_prompt": "a photo of sks star"})
    return {"root": root, "base": root / "base", "adapter": root / "adapter",
            "file": root / "adapter" / "superlora_weights.safetensors"}


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# ---- help ------------------------------------------------------------------------------------------------

def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("inspect", "export", "merge", "generate", "train"):
        assert command in out
    assert "superlora export" in out and "examples:" in out
    for command in ("inspect", "export", "merge", "generate"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and f"usage: superlora {command}" in out
    code, out, _ = run(capsys, "export", "--help")
    assert "--rank" in out and "--energy" in out and "--force" in out and "kohya" in out


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="superlora")
    assert script.value == "superlora_diffusers.cli:main" and script.load() is main
    installed = Path(sys.executable).with_name("superlora")
    if installed.exists():  # an editable install puts the command beside the interpreter
        assert "superlora_diffusers.cli" in installed.read_text()


def test_no_command_prints_help_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: superlora" in err


# ---- inspect ---------------------------------------------------------------------------------------------

def test_inspect_reports_config_targets_size_fingerprint(files, capsys):
    code, out, _ = run(capsys, "inspect", files["adapter"])
    assert code == 0
    header = load_file(files["file"])
    n_params = sum(v.numel() for v in header.values())
    from safetensors import safe_open

    with safe_open(str(files["file"]), "pt") as f:
        metadata = f.metadata()
    assert f"{files['file'].stat().st_size:,} bytes" in out
    assert "tucker rank=3 groups=2 fold=3" in out
    assert f"{n_params:,} trainable" in out and "rank-1 LoRA" in out
    assert "40 layers (unet: 32, text_encoder: 8)" in out
    assert metadata["base_fingerprint"] in out
    assert "instance_prompt:  a photo of sks star" in out
    code, out, _ = run(capsys, "inspect", files["file"], "--json", "--targets")
    info = json.loads(out)
    assert info["num_parameters"] == n_params and info["num_targets"] == 40
    assert info["targets"][0][0].startswith("unet.") and info["config"]["factorization"] == "tucker"
    code, out, _ = run(capsys, "inspect", files["file"], "--targets")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q  32x32" in out


def test_inspect_checks_the_base(files, capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", files["adapter"], "--base", files["base"])
    assert code == 0 and "fits base:        yes" in out
    from conftest import tiny_components
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**tiny_components(cross_attention_dim=24)).save_pretrained(tmp_path / "other")
    code, _, err = run(capsys, "inspect", files["adapter"], "--base", tmp_path / "other")
    assert_one_line_error(code, err, "another base model")
    code, _, err = run(capsys, "merge", files["adapter"], "--base", tmp_path / "other", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "superlora_weights.safetensors", "another base model")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m*"))


# ---- bad input on every command ----------------------------------------------------------------------------

def test_missing_and_wrong_files(files, capsys, tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    lora = tmp_path / "lora.safetensors"
    assert run(capsys, "export", files["adapter"], "--to", "lora", "--rank", "2", "--out", lora)[0] == 0
    for command in (["inspect"], ["export", "--to", "diff"], ["merge", "--base", files["base"], "--out", tmp_path / "m"]):
        name, rest = command[0], command[1:]
        code, _, err = run(capsys, name, tmp_path / "missing.safetensors", *rest)
        assert_one_line_error(code, err, "not found")
        code, _, err = run(capsys, name, tmp_path / "notes.safetensors", *rest)
        assert_one_line_error(code, err, "not a readable safetensors file")
        code, _, err = run(capsys, name, lora, *rest)
        assert_one_line_error(code, err, "is a LoRA, not a SuperLoRA")
    code, _, err = run(capsys, "generate", "--base", files["base"], "--adapter", tmp_path / "missing", "--prompt", "x",
                       "--out", tmp_path / "img")
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "m").exists() and not (tmp_path / "img").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["export", "{adapter}", "--to", "lora"], "needs --rank R or --energy E"),
    (["export", "{adapter}", "--to", "lora", "--rank", "0"], "positive integer"),
    (["export", "{adapter}", "--to", "lora", "--rank", "two"], "positive integer"),
    (["export", "{adapter}", "--to", "kohya", "--energy", "1.5"], "(0, 1]"),
    (["export", "{adapter}", "--to", "lora", "--rank", "2", "--energy", "0.9"], "not allowed with"),
    (["export", "{adapter}", "--to", "diff", "--rank", "2"], "takes no --rank"),
    (["export", "{adapter}", "--to", "lokr", "--rank", "2"], "invalid choice"),
    (["export", "{adapter}"], "--to"),
    (["export", "{adapter}", "--to", "lora", "--rank", "2", "--out", "{tmp}/x.bin"], "must end in .safetensors"),
    (["merge", "{adapter}", "--out", "{tmp}/m"], "--base"),
    (["merge", "{adapter}", "--base", "{tmp}/nowhere", "--out", "{tmp}/m"], "not found"),
    (["merge", "{adapter}", "--base", "{tmp}", "--out", "{tmp}/m"], "no model_index.json"),
    (["generate", "--base", "{base}", "--prompt", "x", "--steps", "-1"], "positive integer"),
    (["generate", "--base", "{tmp}/nowhere", "--prompt", "x", "--out", "{tmp}/img"], "not found"),
    (["generate", "--adapter", "{adapter}"], "--prompt"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(files, capsys, tmp_path, argv, fragment):
    argv = [a.format(adapter=files["adapter"], base=files["base"], tmp=tmp_path) for a in argv]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "m").exists() and not (tmp_path / "img").exists()


# ---- export / merge / generate through the command ----------------------------------------------------------

def test_export_writes_reports_and_never_overwrites(files, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(files["adapter"], adapter)
    code, out, _ = run(capsys, "export", adapter, "--to", "lora", "--rank", "4", "--report", tmp_path / "r.json")
    assert code == 0
    default = adapter / "pytorch_lora_weights.safetensors"  # beside the adapter: load_lora_weights(folder) finds it
    assert default.is_file() and f"wrote {default}" in out and "overall" in out and "worst layer" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["layers"]) == 40 and report["rank"] == 4 and 0 < report["overall_relative_error"] < 1
    before = default.read_bytes()
    code, _, err = run(capsys, "export", adapter, "--to", "lora", "--rank", "8")
    assert_one_line_error(code, err, "already exists", "--force")
    assert default.read_bytes() == before
    code, _, err = run(capsys, "export", adapter, "--to", "lora", "--rank", "8", "--report", tmp_path / "r.json")
    assert_one_line_error(code, err, "already exists")
    code, out, _ = run(capsys, "export", adapter, "--to", "lora", "--rank", "8", "--force")
    assert code == 0 and default.read_bytes() != before
    code, out, _ = run(capsys, "export", adapter / "superlora_weights.safetensors", "--to", "kohya", "--energy", "0.99",
                       "-v")
    assert code == 0 and (adapter / "superlora_weights_kohya_e0.99.safetensors").is_file()
    assert out.count("  rank ") == 40  # -v: every layer
    code, out, _ = run(capsys, "export", adapter, "--to", "diff", "--out", tmp_path)
    assert code == 0 and "bit for bit" in out and (tmp_path / "superlora_diff.safetensors").is_file()


def test_merge_and_generate(files, capsys, tmp_path):
    out = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", files["adapter"], "--base", files["base"], "--out", out)
    assert code == 0 and (out / "model_index.json").is_file() and "wrote" in stdout
    (out / "marker").write_text("keep me")
    code, _, err = run(capsys, "merge", files["adapter"], "--base", files["base"], "--out", out)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "marker").exists()

    images = tmp_path / "images"
    argv = ["generate", "--base", files["base"], "--adapter", files["adapter"], "--prompt", "a photo of sks star",
            "--steps", "2", "--num-images", "2", "--seed", "7", "--out", images]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and sorted(p.name for p in images.iterdir()) == ["image_0007.png", "image_0008.png"]
    with_adapter = Image.open(images / "image_0007.png").convert("RGB").tobytes()
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "already exists", "--force")
    # the merged model, generated with no adapter, gives the same picture (up to PNG rounding)
    code, _, _ = run(capsys, "generate", "--base", out, "--prompt", "a photo of sks star", "--steps", "2",
                     "--num-images", "1", "--seed", "7", "--out", images, "--force")
    assert code == 0
    merged = Image.open(images / "image_0007.png").convert("RGB").tobytes()
    assert max(abs(a - b) for a, b in zip(with_adapter, merged)) <= 1


# ---- train forwards to the trainer --------------------------------------------------------------------------

def test_train_forwards_to_the_trainer(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--instance_data_dir" in out and "--param_budget" in out
    code, _, err = run(capsys, "train", "--instance_data_dir", tmp_path / "nope", "--instance_prompt", "a sks star",
                       "--output_dir", tmp_path / "out")
    assert_one_line_error(code, err.splitlines()[-1] if err else "", "does not exist")
    assert not (tmp_path / "out").exists()


def test_base_toy_is_the_default(capsys, tmp_path):
    from superlora_diffusers import toy
    from superlora_diffusers.cli import build_parser

    assert build_parser().parse_args(["generate", "--prompt", "x"]).base == "toy"
    code, _, err = run(capsys, "generate", "--prompt", "a photo of a star", "--steps", "1", "--num-images", "1",
                       "--out", tmp_path / "img")
    if not os.path.exists(os.path.join(toy.BASE_MODEL_DIR, "model_index.json")):
        assert_one_line_error(code, err, "toy base model is missing")
        return
    assert code == 0, err
    image = Image.open(tmp_path / "img" / "image_0000.png")
    assert image.size[0] >= 16 and image.mode == "RGB"
