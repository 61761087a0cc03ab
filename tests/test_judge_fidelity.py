"""The calibrated subject fidelity (toy/fidelity.py): its ends, its hard negatives, the old judge keys, the CLI's errors.

0 must mean the plain class and 1 fresh renders of the subject after the VAE round trip, for a bundled subject and
for one the judge never saw (benchmarks/judge_calibration.py's new subjects); a recolouring of the class must stay
near 0 and blurred renders near 1.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import benchmark_module

from superlora_diffusers.toy import fidelity as Fd
from superlora_diffusers.toy import judge as J
from superlora_diffusers.toy import world


@pytest.fixture(scope="module")
def calib():
    yield benchmark_module("judge_calibration.py", "judge_calibration")
    del sys.modules["judge_calibration"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cal(calib, subject: str, images) -> dict[str, float]:
    return Fd.calibrated_fidelity(images, calib.reference_images(subject), calib.class_of(subject))


@pytest.mark.parametrize("subject", ["striped_star", "vstripe_triangle"])
def test_calibration_ends(calib, subject):
    fresh = Fd.vae_round_trip(calib.render_any(subject, 16, seed=5))
    plain = Fd.vae_round_trip(world.render_class_images(calib.class_of(subject), 16, seed=77))
    top, bottom = cal(calib, subject, fresh), cal(calib, subject, plain)
    assert top["ceiling"] - top["floor"] > 0.6  # a wide range, not a few hundredths
    assert 0.85 < top["calibrated"] < 1.15 and top["subject_match"] >= 0.9
    assert abs(bottom["calibrated"]) < 0.1 and bottom["subject_match"] == 0.0


@pytest.mark.parametrize("subject", ["checker_square", "vstripe_triangle"])
def test_hard_negatives(calib, subject):
    """The class painted in the subject's main colour scores near the floor; blurred renders near the ceiling."""
    shape = calib.class_of(subject)
    recoloured = Fd.vae_round_trip(Fd.render_plain(shape, calib.colors_by_area(subject)[:1], 16, seed=13))
    blurred = calib.blur(Fd.vae_round_trip(calib.render_any(subject, 16, seed=17)), 1.0)
    subject_renders = Fd.vae_round_trip(calib.render_any(subject, 16, seed=17))
    r, b, s = (cal(calib, subject, x)["calibrated"] for x in (recoloured, blurred, subject_renders))
    assert r < 0.25 and s - r > 0.6
    assert b > 0.6


def test_folder_references_and_bad_input(tmp_path):
    for i, im in enumerate(world.render_subject("polka_circle", 4, seed=3)):
        im.save(tmp_path / f"{i:02d}.png")
    images = Fd.vae_round_trip(world.render_subject("polka_circle", 4, seed=9))
    from_folder = Fd.calibrated_fidelity(images, tmp_path, "circle")
    assert from_folder == Fd.calibrated_fidelity(images, Fd.load_instance_images(tmp_path), "circle")
    assert from_folder["calibrated"] > 0.5
    with pytest.raises(ValueError, match="unknown class 'dog'; use one"):
        Fd.calibrated_fidelity(images, tmp_path, "dog")
    with pytest.raises(ValueError, match="at least 2"):
        Fd.calibrated_fidelity(images, [world.render(0)], "circle")


def old_judge_scores(subject_images, recontext, backgrounds, prior, subject, value_range=(-1, 1)):
    """judge_scores before the calibrated keys (commit d63c8bc), verbatim."""
    shape = world.SUBJECTS[subject].shape
    s = J.score(subject_images, subject=subject, value_range=value_range)
    r = J.score(recontext, background=backgrounds, subject=subject, value_range=value_range)
    p = J.score(prior, shape=shape, subject="none", value_range=value_range)
    return {
        "subject_acc": s["subject_acc"],
        "subject_fidelity": s["subject_fidelity"],
        "recontext_background_acc": r["background_acc"],
        "recontext_subject_acc": r["subject_acc"],
        "prior_shape_acc": p["shape_acc"],
        "prior_not_subject": p["subject_acc"],
    }


def test_judge_scores_keeps_the_old_keys_bit_identical():
    from superlora_diffusers.evaluate import judge_scores

    bgs = [world.BACKGROUND_NAMES[i % 4] for i in range(8)]
    subj = (Fd.vae_round_trip(world.render_subject("striped_star", 8, seed=21)) + 1) / 2  # as quality.py: [0, 1]
    rectx = (Fd.vae_round_trip([world.render(i, subject="striped_star", background=b) for i, b in enumerate(bgs)]) + 1) / 2
    prior = (Fd.vae_round_trip(world.render_class_images("star", 8, seed=22)) + 1) / 2
    new = judge_scores(subj, rectx, bgs, prior, "striped_star", value_range=(0, 1))
    old = old_judge_scores(subj, rectx, bgs, prior, "striped_star", value_range=(0, 1))
    assert {k: new[k] for k in old} == old
    assert list(new)[:len(old)] == list(old)
    assert new["subject_fidelity_cal"] > 0.7 and new["prior_not_subject_match"] == 1.0
    generic = judge_scores(subj, rectx, bgs, prior, reference_images=world.reference_images("striped_star"),
                           class_name="star", value_range=(0, 1))
    assert not set(generic) & {"subject_acc", "subject_fidelity", "recontext_subject_acc", "prior_not_subject"}
    assert generic == {k: new[k] for k in generic}


@pytest.mark.parametrize("args, message", [
    (["--instance_dir", "{missing}", "--class_name", "star"], "--instance_dir '{missing}' does not exist"),
    (["--instance_dir", "{empty}", "--class_name", "star"], "holds no images"),
    (["--instance_dir", "{one}", "--class_name", "star"], "give at least 2"),
    (["--instance_dir", "{two}", "--class_name", "dog"], "unknown class 'dog'; use one the toy judge knows: circle"),
    (["--instance_dir", "{two}"], "--instance_dir needs --class_name"),
    (["--subject", "striped_star", "--class_name", "circle"], "striped_star is a star; drop --class_name"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    from superlora_diffusers.evaluate import main

    dirs = {name: tmp_path / name for name in ("missing", "empty", "one", "two")}
    for name, n in (("empty", 0), ("one", 1), ("two", 2)):
        dirs[name].mkdir()
        for i, im in enumerate(world.render_subject("striped_star", n, seed=1)):
            im.save(dirs[name] / f"{i}.png")
    fill = {k: str(v) for k, v in dirs.items()}
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "adapter")] + [a.format(**fill) for a in args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    assert message.format(**fill) in e.value.code


def test_cli_scores_any_subject_from_its_images(tmp_path):
    from superlora_diffusers import SuperLoRAConfig  # (attaches the pipeline verbs)
    from superlora_diffusers.evaluate import main
    from superlora_diffusers import inject_superlora
    from superlora_diffusers.toy import load_toy_pipeline

    pipe = load_toy_pipeline()

    inject_superlora(pipe._superlora_components(), SuperLoRAConfig.lora(rank=2))
    pipe.save_superlora_weights(tmp_path / "adapter")
    (tmp_path / "instances").mkdir()
    for i, im in enumerate(Fd.render_plain("triangle", [(250, 125, 5), (20, 30, 110)], 2, seed=4)):
        im.save(tmp_path / "instances" / f"{i}.png")
    main([str(tmp_path / "adapter"), "--instance_dir", str(tmp_path / "instances"), "--class_name", "triangle",
          "--n", "2", "--steps", "2"])
    scores = json.loads((tmp_path / "adapter" / "judge_scores.json").read_text())
    assert scores["class_name"] == "triangle" and scores["subject_head"].startswith("not available")
    assert scores["base"].keys() == scores["adapter"].keys() >= {"subject_fidelity_cal", "subject_match"}
    assert "subject_acc" not in scores["base"]
