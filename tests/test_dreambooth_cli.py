"""Trainer input handling: flags, bad input (one line, exit 2, nothing lost), budgets, batching."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from superlora_diffusers import config_from_preset, count_parameters
from superlora_diffusers.training import TrainingError, main, parse_args
from superlora_diffusers.training.adapter import adapter_config, choose_config_for_budget, describe
from superlora_diffusers.training.data import epoch_batches, list_images, load_examples

SD_LIKE = [(320, 320)] * 8 + [(320, 768)] * 2 + [(640, 640)] * 8 + [(640, 768)] * 2


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def write_images(folder, n=3, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size + 8), (40 * i, 100, 200)).save(folder / f"img{i}.png")
    return folder


def test_missing_instance_dir_is_one_clear_line(tmp_path, capsys):
    code, err = run_main(capsys, "--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", "a sks star",
                         "--output_dir", str(tmp_path / "out"))
    assert code == 2
    assert err.count("\n") == 0 and "does not exist" in err and "Traceback" not in err


def test_empty_instance_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, "--instance_data_dir", str(tmp_path / "empty"), "--instance_prompt", "x",
                         "--output_dir", str(tmp_path / "out"))
    assert code == 2 and "holds no images" in err


def test_non_images_are_skipped_with_a_warning(tmp_path, caplog):
    folder = write_images(tmp_path / "inst", n=2)
    (folder / "notes.md").write_text("hello")
    (folder / "img0.txt").write_text("a photo of sks star on a black background")
    with caplog.at_level(logging.WARNING):
        files = list_images(folder, "--instance_data_dir")
    assert [f.name for f in files] == ["img0.png", "img1.png"]
    assert "notes.md" in caplog.text
    examples = load_examples(str(folder), "a photo of sks star", 32, True, ".txt", "x")
    assert examples.pixels.shape == (2, 3, 32, 32)
    assert examples.pixels.min() >= -1 and examples.pixels.max() <= 1
    assert examples.prompts == ["a photo of sks star on a black background", "a photo of sks star"]


def test_unreadable_image_is_named(tmp_path):
    folder = write_images(tmp_path / "inst", n=1)
    (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(TrainingError, match="broken.png"):
        load_examples(str(folder), "p", 32, False, ".txt", "x")


def test_existing_weights_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "superlora_weights.safetensors").write_bytes(b"precious")
    folder = write_images(tmp_path / "inst")
    code, err = run_main(capsys, "--instance_data_dir", str(folder), "--instance_prompt", "x", "--output_dir", str(out))
    assert code == 2 and "--overwrite_output_dir" in err
    assert (out / "superlora_weights.safetensors").read_bytes() == b"precious"


def test_prior_preservation_needs_class_flags():
    with pytest.raises(TrainingError, match="--class_prompt"):
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--with_prior_preservation"])
    with pytest.raises(TrainingError, match="add --with_prior_preservation"):  # not silently ignored
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--prior_loss_target", "base_model"])
    with pytest.raises(TrainingError, match="--ema_decay must be in"):
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--use_ema", "--ema_decay", "1.5"])
    with pytest.raises(TrainingError, match="multiple of 8 .* got 20; use 24"):  # up front, not after training
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--resolution", "20"])


@pytest.mark.parametrize("pivotal, budget, expected", [
    (False, 100_000, ("lora", "weight", 4)),  # LoRA r=4 (81,408 here) was measured best
    (False, 30_000, ("lora", "weight", 1)),   # without the embedding, per-weight r=1 beat the shared layouts
    (True, 30_000, ("tucker", "shape", 6)),   # with it, the shared-bases axes layout beat every other
    (True, 16_000, ("tucker", "shape", 1)),   # rank 6 with shared bases (16,808 here) does not fit: tucker-axes r=1
    (False, 10_000, ("tucker", "shape", 1)),  # 4,440 here; the cube G=12 (15,540) does not fit
])
def test_param_budget_takes_the_best_measured_recipe_that_fits(pivotal, budget, expected):
    config, why = choose_config_for_budget(budget, SD_LIKE, pivotal=pivotal)
    assert (config.factorization, config.groups, config.rank) == expected and "measured recipe" in why
    assert count_parameters(config, SD_LIKE) <= budget


def toy_targets(targets: str) -> tuple[list[tuple[int, int]], list[int]]:
    """(shapes, kernels) of the embedded toy's weights that `targets` names."""
    from superlora_diffusers.components import target_kernels, target_shapes
    from superlora_diffusers.toy import load_toy_pipeline

    pipe = load_toy_pipeline()
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return target_shapes(components, targets), target_kernels(components, targets)


def test_param_budget_takes_the_shared_bases_recipes_with_pivotal_tuning():
    """On the toy's demo layers, with the embedding: rank 6 with shared bases where it fits, rank 4 where neither
    it nor tucker-axes r=1 does, rank 2 under the kernel axis; without the embedding they were not measured, so
    never taken."""
    shapes, kernels = toy_targets("unet+conv+text")
    config, why = choose_config_for_budget(15_000, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.share_axes, config.kernel_axis) == (6, True, True) and "tucker-axes-shared" in why
    assert count_parameters(config, shapes, kernels) == 12_249
    config, _ = choose_config_for_budget(8_000, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.share_axes) == (4, True) and count_parameters(config, shapes, kernels) == 5_969
    config, _ = choose_config_for_budget(15_000, shapes, pivotal=False, kernels=kernels)
    assert not config.share_axes
    # under the kernel axis's 3,109: rank 2 trained whole (2,374), which measured ahead of it
    config, why = choose_config_for_budget(3_237 - 128 - 1, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.share_axes, config.projection) == (2, True, "none") and "measured recipe" in why
    assert count_parameters(config, shapes, kernels) == 2_374
    # under that: rank 4 trained in a random subspace, 1,360 of its 5,969 entries
    config, why = choose_config_for_budget(2_374 - 1, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.share_axes, config.projection) == (4, True, "fastfood") and "measured recipe" in why
    config, why = choose_config_for_budget(1_500 - 128, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.share_axes, config.projection) == (4, True, "fastfood") and "measured recipe" in why
    assert count_parameters(config, shapes, kernels) == 1_360


def test_param_budget_takes_the_attention_slice_recipes_on_attention_only_targets():
    """On the toy's UNet + CLIP attention (kernels known, no conv), with the embedding: the rank-16 axes layout through
    an isometric vector (axi_r16_ti, 15,000 with the embedding), then rank 10 trained whole; with a conv among the
    targets, or kernels unknown, the conv-slice ranking as before."""
    shapes, kernels = toy_targets("unet+text")
    config, why = choose_config_for_budget(15_000 - 128, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.projection, config.groups) == (16, "isometric", "shape") and "measured" in why
    assert count_parameters(config, shapes, kernels) == 14_872
    config, _ = choose_config_for_budget(14_000, shapes, pivotal=True, kernels=kernels)
    assert (config.rank, config.projection) == (10, "none") and count_parameters(config, shapes, kernels) == 13_072
    assert choose_config_for_budget(15_000 - 128, shapes, pivotal=True)[0].share_axes  # kernels unknown: as before
    assert choose_config_for_budget(15_000 - 128, shapes, pivotal=False, kernels=kernels)[0].projection == "none"


def test_param_budget_takes_the_kernel_axis_recipe_below_the_axes_one():
    """With conv targets (their k_h·k_w known), a budget under tucker-axes takes its kernel-axis variant."""
    shapes = SD_LIKE + [(64, 64 * 9)] * 3 + [(128, 64 * 9)]
    kernels = [1] * len(SD_LIKE) + [9] * 4
    axes = count_parameters(config_from_preset("tucker-axes"), shapes, kernels)
    config, why = choose_config_for_budget(axes - 1, shapes, pivotal=True, kernels=kernels)
    assert config.kernel_axis and config.groups == "shape" and "measured recipe" in why
    assert count_parameters(config, shapes, kernels) < axes - 900  # each conv shape: c_in + 9 rows, not c_in·9
    config, _ = choose_config_for_budget(axes - 1, shapes, pivotal=True)  # kernels unknown: it cannot fit,
    assert config.projection == "fastfood"  # the next measured recipe (the projected shared layout) does
    assert "kernel_axis" in describe(config_from_preset("tucker-axes", kernel_axis=True))


@pytest.mark.parametrize("budget", [40, 300, 1_000, 4_000])
def test_param_budget_below_the_recipes_takes_the_largest_config_that_fits(budget):
    config, why = choose_config_for_budget(budget, SD_LIKE)
    n = count_parameters(config, SD_LIKE)
    assert n <= budget and "not measured" in why
    assert n >= 0.5 * budget  # the search is dense enough to use most of the budget


def test_param_budget_counts_the_pivotal_embedding():
    argv = ["--instance_data_dir", "d", "--instance_prompt", "a sks star", "--param_budget", "4500"]
    config, how = adapter_config(parse_args(argv), lambda targets: SD_LIKE, token_parameters=128)
    assert config.groups == "shape" and "tucker-axes" in how  # 4,440 fits: the embedding does not train
    with_ti = parse_args(argv + ["--train_text_encoder_ti"])
    config, how = adapter_config(with_ti, lambda targets: SD_LIKE, token_parameters=128)
    assert count_parameters(config, SD_LIKE) + 128 <= 4500 and "measured recipe" in how
    assert config.projection == "fastfood"  # 4,440 + 128 does not fit: the next measured recipe, in a subspace


def test_param_budget_below_anything_is_an_error():
    with pytest.raises(TrainingError, match="raise it"):
        choose_config_for_budget(3, SD_LIKE)


def test_flags_override_the_preset():
    args = parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--superlora_preset", "lorta",
                       "--rank", "3", "--groups", "2", "--fold", "4", "--projection_ratio", "0.1"])
    config, how = adapter_config(args, lambda targets: SD_LIKE)
    assert (config.factorization, config.rank, config.groups, config.fold) == ("tucker", 3, 2, 4)
    assert config.projection == "fastfood" and "lorta" in how
    bad = parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--superlora_preset", "lora", "--fold", "3"])
    with pytest.raises(TrainingError, match="tucker"):
        adapter_config(bad, lambda targets: SD_LIKE)


def test_axes_flags_reach_the_config_and_refuse_other_layouts():
    base = ["--instance_data_dir", "d", "--instance_prompt", "p", "--superlora_preset", "tucker-axes"]
    config, how = adapter_config(parse_args(base + ["--kernel_axis", "--share_axes"]), lambda targets: SD_LIKE)
    assert config.groups == "shape" and config.kernel_axis and config.share_axes and "share_axes" in how
    plain, _ = adapter_config(parse_args(base), lambda targets: SD_LIKE)
    assert count_parameters(config, SD_LIKE) < count_parameters(plain, SD_LIKE)  # 320- and 640-wide bases shared
    with pytest.raises(TrainingError, match="share_axes shares the bases of the axes layout"):
        adapter_config(parse_args(base[:4] + ["--share_axes"]), lambda targets: SD_LIKE)


def test_train_text_encoder_adds_the_text_encoder_to_the_targets():
    from superlora_diffusers.targets import TEXT_ENCODER_PATTERN

    def targets(*flags: str):
        args = parse_args(["--instance_data_dir", "d", "--instance_prompt", "p", "--train_text_encoder", *flags])
        return adapter_config(args, lambda targets: SD_LIKE)[0].target_modules

    assert targets() == "unet+text"
    assert targets("--target_modules", "unet+conv") == "unet+conv+text"
    assert targets("--target_modules", "unet+text") == "unet+text"
    assert targets("--target_modules", "to_q,to_v") == ["to_q", "to_v", TEXT_ENCODER_PATTERN]
    assert targets("--target_modules", r"unet\.up_blocks\.\d+\.resnets\.\d+\.conv1") == [
        r"unet\.up_blocks\.\d+\.resnets\.\d+\.conv1", TEXT_ENCODER_PATTERN]  # one pattern is a pattern, not a preset
    with pytest.raises(TrainingError, match="no text-encoder variant"):
        targets("--target_modules", "unet-cross")


def test_text_encoder_targets_without_training_it_are_refused(tmp_path, capsys):
    code, err = run_main(capsys, "--instance_data_dir", str(write_images(tmp_path / "inst")), "--instance_prompt",
                         "a sks star", "--target_modules", "unet+conv+text", "--report_to", "none",
                         "--output_dir", str(tmp_path / "out"))
    last = err.splitlines()[-1]  # (above it: the base model's loading progress bar)
    assert code == 2 and last.startswith("error:") and "add --train_text_encoder" in last and "Traceback" not in err
    assert not (tmp_path / "out" / "superlora_weights.safetensors").exists()


def test_epoch_batches_are_seeded_and_split_across_processes():
    one = epoch_batches(10, 2, seed=0, epoch=3, process=0, processes=1)
    assert one == epoch_batches(10, 2, seed=0, epoch=3, process=0, processes=1)
    assert one != epoch_batches(10, 2, seed=0, epoch=4, process=0, processes=1)
    assert sorted(i for b in one for i in b) == list(range(10))
    p0 = epoch_batches(10, 2, seed=0, epoch=3, process=0, processes=2)
    p1 = epoch_batches(10, 2, seed=0, epoch=3, process=1, processes=2)
    assert len(p0) == len(p1) == 2
    assert not set(i for b in p0 for i in b) & set(i for b in p1 for i in b)
    assert epoch_batches(3, 4, seed=0, epoch=0, process=0, processes=1)[0].__len__() == 4  # wraps tiny sets
