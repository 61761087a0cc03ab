"""Tests of the embedded toy world, base model and judge (fast: tiny batches, few steps, seeded)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from superlora_diffusers.toy import ASSETS_DIR, BASE_MODEL_DIR, JUDGE_PATH, resolve_base_model, world
from superlora_diffusers.toy import judge as J


# ---------------------------------------------------------------------------------------------
# world
# ---------------------------------------------------------------------------------------------

def test_world_is_deterministic():
    a, sa = world.make_dataset(20, seed=7, subject_frac=0.3, textured_frac=0.1)
    b, sb = world.make_dataset(20, seed=7, subject_frac=0.3, textured_frac=0.1)
    c, _ = world.make_dataset(20, seed=8)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and [s.to_dict() for s in sa] == [s.to_dict() for s in sb]
    assert not np.array_equal(a, c)
    assert np.array_equal(np.asarray(world.render(3, shape="star", color="red")),
                          np.asarray(world.render(3, shape="star", color="red")))
    s1 = [np.asarray(im) for im in world.render_subject("striped_star", 3, seed=1)]
    s2 = [np.asarray(im) for im in world.render_subject("striped_star", 3, seed=1)]
    assert all(np.array_equal(x, y) for x, y in zip(s1, s2))


def test_world_attributes_and_subjects():
    assert len(world.SHAPES) >= 6 and len(world.COLORS) >= 5 and len(world.BACKGROUNDS) >= 3
    assert len(world.SUBJECTS) >= 6
    for name, sub in world.SUBJECTS.items():
        assert sub.shape in world.SHAPES
        assert sub.instance_prompt == f"a photo of sks {sub.shape}"
        assert sub.class_prompt == f"a photo of a {sub.shape}"
        ims = world.render_subject(name, 2, seed=0, size=32)
        assert ims[0].size == (32, 32) and ims[0].mode == "RGB"
    # a rendered red object is mostly red-ish where it differs from the background
    arr = np.asarray(world.render(0, shape="square", color="red", background="white")).astype(int)
    fg = arr[(np.abs(arr - 245).sum(-1) > 150)]
    assert len(fg) > 30 and fg[:, 0].mean() > 150 and fg[:, 1].mean() < 80


def test_caption_grammar_roundtrip_and_no_sks():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sc = world.sample_scene(rng)
        cap = world.make_caption(sc, rng)
        assert "sks" not in cap.split()
        p = world.parse_prompt(cap)
        assert p["shape"] == sc.shape
        assert p["color"] in (None, sc.color)
        assert p["background"] in (None, sc.background)
    assert world.parse_prompt("an orange ring on a light blue background") == {
        "shape": "ring", "color": "orange", "background": "light blue", "token": None}
    assert world.parse_prompt("a photo of sks star")["token"] == "sks"
    assert world.parse_prompt("a photo of a star")["shape"] == "star"
    with pytest.raises(ValueError):
        world.make_caption(world.sample_scene(rng, subject="striped_star"), rng)


# ---------------------------------------------------------------------------------------------
# shipped base model
# ---------------------------------------------------------------------------------------------

def test_resolve_base_model():
    assert resolve_base_model("toy") == BASE_MODEL_DIR
    assert resolve_base_model(None) == BASE_MODEL_DIR
    assert resolve_base_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert resolve_base_model("/some/dir") == "/some/dir"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(BASE_MODEL_DIR, sub)), sub


def test_assets_size_budget():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS_DIR) for f in fs)
    assert total <= 30 * 1024 * 1024, total
    assert os.path.getsize(JUDGE_PATH) < 1024 * 1024


def test_tokenizer_is_real_clip_and_self_contained():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(BASE_MODEL_DIR, "tokenizer"))
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("sks").input_ids == [49406, 48136, 49407]


@pytest.fixture(scope="module")
def pipe():
    from superlora_diffusers.toy import load_toy_pipeline

    return load_toy_pipeline()


def test_load_offline_and_generate(pipe):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32
    # the UNet has cross-attention transformer blocks with the usual projections
    names = [n for n, _ in pipe.unet.named_modules()]
    for proj in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k"):
        assert any(n.endswith(proj) for n in names), proj
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    out = pipe("a red star on a white background", num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0)).images
    assert out[0].size == (32, 32)
    # the folder loads like any SD checkpoint, component by component too
    unet = UNet2DConditionModel.from_pretrained(resolve_base_model("toy"), subfolder="unet")
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_base_model_generations_are_judged_correct(pipe):
    prompts = ["a red circle on a white background", "a blue square on a gray background",
               "a yellow triangle on a black background", "a green star on a light blue background",
               "a purple heart on a white background", "an orange ring on a gray background",
               "a blue cross on a white background", "a red diamond on a light blue background"]
    imgs = pipe(prompts, num_inference_steps=12, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0)).images
    res = J.score_prompts(imgs, prompts)
    # a broken model (noise, wrong conditioning) scores near chance: 1/8, 1/6, 1/4
    assert res["shape_acc"] >= 0.5, res
    assert res["color_acc"] >= 0.5, res
    assert res["background_acc"] >= 0.5, res


def test_base_model_does_not_know_the_subjects(pipe):
    # pretraining never saw subject renders or "sks": "a photo of sks <class>" gives a plain member
    # of the class, which the judge must not take for the subject (2 images per subject, 10 steps)
    names = list(world.SUBJECTS) * 2
    prompts = [world.SUBJECTS[n].instance_prompt for n in names]
    imgs = pipe(prompts, num_inference_steps=10, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0)).images
    pred = J.predict(imgs)
    hits = sum(p == n for p, n in zip(pred["subject"], names))
    assert hits <= 1, list(zip(pred["subject"], names))
    assert np.mean([p == world.SUBJECTS[n].shape for p, n in zip(pred["shape"], names)]) >= 0.5


# ---------------------------------------------------------------------------------------------
# judge
# ---------------------------------------------------------------------------------------------

def test_judge_accuracy_on_fresh_renders():
    imgs, scenes = world.make_dataset(300, seed=2024, subject_frac=0.3, textured_frac=0.1)
    pred = J.predict(imgs)
    for key in ("shape", "background"):
        acc = np.mean([p == getattr(s, key) for p, s in zip(pred[key], scenes)])
        assert acc >= 0.95, (key, acc)
    col = [(p, s.color) for p, s in zip(pred["color"], scenes) if s.color is not None]
    assert np.mean([p == t for p, t in col]) >= 0.95
    sub = np.mean([p == (s.subject or "none") for p, s in zip(pred["subject"], scenes)])
    assert sub >= 0.95, sub


def test_score_api():
    ims = world.render_subject("checker_square", 6, seed=5)
    r = J.score(ims, shape="square", subject="checker_square")
    assert set(r) == {"n", "shape_acc", "subject_acc", "subject_fidelity"}
    assert r["shape_acc"] >= 0.8 and r["subject_acc"] >= 0.8 and r["subject_fidelity"] > 0.5
    plain = world.render_class_images("square", 6, seed=5)
    r2 = J.score(plain, shape="square", subject="checker_square")
    assert r2["subject_acc"] <= 0.2 and r2["subject_fidelity"] < r["subject_fidelity"]
    # tensors in [-1, 1] work too
    x = world.to_tensor(np.stack([np.asarray(im) for im in ims]))
    assert J.score(x, shape="square")["shape_acc"] == r["shape_acc"]
    r3 = J.score_prompts(plain, ["a photo of a square"] * 6)
    assert "shape_acc" in r3 and "color_acc" not in r3


def test_decoder_refinement_keeps_the_latent_space(tmp_path):
    """`vae --decoder_only` + `export_vae` (how the shipped decoder was refined): encoder and scaling factor
    untouched, so the UNet's latent space stays valid; the refinement is recorded in training_info.json."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    from superlora_diffusers.toy import pretrain

    base = tmp_path / "base"
    shutil.copytree(BASE_MODEL_DIR, base)
    work = str(tmp_path / "work")
    pretrain.main(["vae", "--work_dir", work, "--init_from", str(base), "--decoder_only", "--device", "cpu",
                   "--workers", "1", "--vae_data", "32", "--vae_steps", "3", "--vae_batch", "4", "--vae_lr", "1e-2"])
    pretrain.main(["export_vae", "--work_dir", work, "--out", str(base)])
    old = AutoencoderKL.from_pretrained(BASE_MODEL_DIR, subfolder="vae")
    new = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert all(torch.equal(v, new_sd[k]) for k, v in old_sd.items() if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(v, new_sd[k]) for k, v in old_sd.items() if k.startswith("decoder."))
    assert new.config.scaling_factor == old.config.scaling_factor
    info = json.loads((base / "training_info.json").read_text())
    assert info["refinements"][-1]["decoder_only"] and info["refinements"][-1]["steps"] == 3
    assert info["unet_steps"] == json.loads(open(os.path.join(BASE_MODEL_DIR, "training_info.json")).read())["unet_steps"]


def test_evaluate_writes_scores_and_the_subject_and_class_prompt_grids(pipe, tmp_path):
    from PIL import Image

    from superlora_diffusers import SuperLoRAConfig  # (attaches the pipeline verbs)
    from superlora_diffusers.evaluate import main
    from superlora_diffusers import inject_superlora

    module = inject_superlora(pipe._superlora_components(), SuperLoRAConfig.lora(rank=2))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.05)
    pipe.save_superlora_weights(tmp_path)
    pipe.unload_superlora_weights()
    main([str(tmp_path), "--subject", "striped_star", "--n", "2", "--steps", "2"])
    scores = json.loads((tmp_path / "judge_scores.json").read_text())
    assert scores["base"].keys() == scores["adapter"].keys() >= {"subject_acc", "prior_shape_acc"}
    info = scores["adapter_info"]  # the README's demo figures name their adapter from this file
    assert info["num_parameters"] == module.num_parameters() and info["adapted_layers"] == len(module.shapes)
    assert info["config"] == SuperLoRAConfig.lora(rank=2).to_dict()
    for name in ("compare.png", "compare_prior.png"):
        assert Image.open(tmp_path / name).size == (8 * 96, 2 * 96)
