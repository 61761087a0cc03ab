"""The quality benchmark's report: the arithmetic behind every claim in docs/benchmarks.md' quality section.

Synthetic JSON lines (no training): per-subject gains over the base model, seed noise as the std over seeds of
the per-seed mean, and the equal-quality search that decides whether a parameter ratio may be claimed.
"""

from __future__ import annotations

import argparse

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def quality():
    return benchmark_module("quality.py", "quality_benchmark")


SUBJECTS = ["striped_star", "polka_circle", "rainbow_heart", "checker_square"]
BASE_FID = {"striped_star": 0.84, "polka_circle": 0.83, "rainbow_heart": 0.85, "checker_square": 0.82}


def rows_for(method: str, params: int, gain: float, seeds=(0, 1, 2), subjects=SUBJECTS, jitter: float = 0.01):
    """Final rows whose fidelity is base + gain + a seed-dependent offset (-jitter, 0, +jitter)."""
    out = []
    for seed in seeds:
        for s in subjects:
            out.append(dict(method=method, subject=s, seed=seed, lr=3e-3, phase="final", params=params,
                            file_bytes=4 * params, subject_acc=0.5, subject_fidelity=BASE_FID[s] + gain + jitter * (seed - 1),
                            recontext_background_acc=0.9, prior_shape_acc=0.9))
    return out


def base_rows():
    return [dict(method="base", subject=s, seed=0, lr=0.0, phase="base", params=0, file_bytes=0, subject_acc=0.0,
                 subject_fidelity=f, recontext_background_acc=1.0, prior_shape_acc=0.95) for s, f in BASE_FID.items()]


def test_summary_gains_and_seed_noise(quality):
    stats, base, _ = quality.summarise(base_rows() + rows_for("lora_r4", 154_240, 0.07))
    st = stats["lora_r4"]
    assert (st["subjects"], st["seeds"], st["n"]) == (4, 3, 12)
    assert st["fidelity_gain"][0] == pytest.approx(0.07)
    # per-seed means are gain -0.01, 0, +0.01 over the base: their std (ddof 1) is 0.01
    assert st["subject_fidelity_seedstd"] == pytest.approx(0.01)
    assert st["prior_shape_drift"][0] == pytest.approx(-0.05)


def test_judge_noise_is_the_binomial_error_of_the_accuracies(quality, tmp_path):
    """Accuracy 0.5 on 16 images per run: one run's error is 0.125; four subjects of a seed 0.0625; 12 runs 0.036.
    A run scored on more images (n_eval 64) is less noisy, one at accuracy 0 or 1 not at all."""
    rows = rows_for("lora_r4", 154_240, 0.07)
    stats, _, _ = quality.summarise(base_rows() + rows)
    assert stats["lora_r4"]["judge_se"] == pytest.approx((0.125 * 12 ** 0.5 / 12, 0.0625))
    assert quality.judge_noise([dict(rows[0], n_eval=64)]) == pytest.approx((0.0625, 0.0625))
    assert quality.judge_noise([dict(rows[0], subject_acc=1.0), dict(rows[1], subject_acc=0.0)]) == (0.0, 0.0)
    jsonl, table = tmp_path / "q.jsonl", tmp_path / "table.md"
    jsonl.write_text("".join(__import__("json").dumps(r) + "\n" for r in base_rows() + rows))
    quality.report(argparse.Namespace(jsonl=str(jsonl), plot=None, table=str(table)))
    assert "- `lora_r4`: ± 0.036 / ± 0.062" in table.read_text()


def test_loraplus_runs_are_a_row_of_their_own(quality):
    plus = [dict(r, loraplus_lr_ratio=4.0) for r in rows_for("ax_r1_ti", 12_866, 0.06)]
    stats, _, _ = quality.summarise(base_rows() + rows_for("ax_r1_ti", 12_866, 0.05) + plus)
    assert sorted(stats) == ["ax_r1_ti", "ax_r1_ti_loraplus4"]
    assert stats["ax_r1_ti"]["n"] == stats["ax_r1_ti_loraplus4"]["n"] == 12
    assert stats["ax_r1_ti_loraplus4"]["fidelity_gain"][0] == pytest.approx(0.06)
    assert stats["ax_r1_ti_loraplus4"]["loraplus"] == 4.0 and stats["ax_r1_ti"]["loraplus"] is None


def test_a_method_on_two_layer_slices_is_refused_not_averaged(quality):
    """axks_r6_ti is 12,377 parameters with the convs and 4,448 without: one row for both would be a third thing."""
    conv = [dict(r, targets="conv", text=True) for r in rows_for("axks_r6_ti", 12_377, 0.08)]
    attention = [dict(r, targets="attention", text=True) for r in rows_for("axks_r6_ti", 4_448, -0.03, seeds=(0,))]
    assert quality.summarise(base_rows() + conv)[0]["axks_r6_ti"]["params"] == 12_377
    with pytest.raises(ValueError, match=r"axks_r6_ti ran on more than one layer slice .*report each slice"):
        quality.summarise(base_rows() + conv + attention)


def test_equal_quality_picks_smallest_superlora_within_noise(quality):
    rows = (base_rows() + rows_for("lora_r4", 154_240, 0.070) + rows_for("lora_r1", 38_560, 0.065)
            + rows_for("d2_g4_r8", 54_400, 0.062) + rows_for("t3_g12_r5", 12_840, 0.040))
    stats, _, _ = quality.summarise(rows)
    eq = quality.equal_quality(stats)
    # lora_r1 is closer still but is not a SuperLoRA; t3_g12_r5 is smaller but 0.03 below (noise 0.01)
    assert eq["method"] == "d2_g4_r8"
    assert eq["ratio"] == pytest.approx(154_240 / 54_400)


def test_equal_quality_needs_as_many_seeds_as_the_reference(quality):
    rows = base_rows() + rows_for("lora_r4", 154_240, 0.07) + rows_for("t5_g1_r1", 101, 0.07, seeds=(0,))
    stats, _, _ = quality.summarise(rows)
    assert stats["t5_g1_r1"]["seeds"] == 1
    assert quality.equal_quality(stats)["method"] is None
    rows += rows_for("t5_g1_r1", 101, 0.07, seeds=(1, 2))
    stats, _, _ = quality.summarise(rows)
    assert quality.equal_quality(stats)["method"] == "t5_g1_r1"


def test_report_table_marks_partial_and_single_seed_methods(quality, tmp_path):
    rows = (base_rows() + rows_for("lora_r4", 154_240, 0.07) + rows_for("t3_g12_r5", 12_840, 0.01, seeds=(0,))
            + rows_for("lokr_r4", 28_000, 0.03, seeds=(0,), subjects=SUBJECTS[:2]))
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    table, png = tmp_path / "table.md", tmp_path / "q.png"
    quality.report(argparse.Namespace(jsonl=str(jsonl), plot=str(png), table=str(table)))
    lines = {line.split("|")[1].strip(): line for line in table.read_text().splitlines() if line.startswith("| `")}
    assert "4 x 3" in lines["`lora_r4`"] and "±" in lines["`lora_r4`"]
    assert "4 x 1" in lines["`t3_g12_r5`"] and "±" not in lines["`t3_g12_r5`"]  # one seed: no noise to show
    partial = [k for k in lines if k.startswith("`lokr_r4`")]
    assert partial and "partial: 2 of 4 subjects" in partial[0]
    assert png.stat().st_size > 10_000
    text = table.read_text()  # per subject, mean over seeds: striped_star's base 0.84 + gain 0.07 (jitter averages out)
    assert "| method | striped_star (0.840) | polka_circle (0.830) |" in text
    assert "| `lora_r4` (3 seeds) | 0.50 / 0.910 | 0.50 / 0.900 |" in text
    assert "| `lokr_r4` (1 seed) | 0.50 / 0.860 | 0.50 / 0.850 | - | - |" in text  # seed 0 only (gain - jitter); "-": not run


def test_report_seed_filter_compares_like_for_like(quality, tmp_path):
    rows = base_rows() + rows_for("lora_r4", 154_240, 0.07) + rows_for("t3_g12_r5", 12_840, 0.05, seeds=(0,))
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    table = tmp_path / "table.md"
    quality.report(argparse.Namespace(jsonl=str(jsonl), plot=None, table=str(table), seeds=[0]))
    lora = next(line for line in table.read_text().splitlines() if line.startswith("| `lora_r4`"))
    assert "4 x 1" in lora and "+0.060" in lora  # seed 0 alone: gain 0.07 - jitter 0.01
    assert "- none: every method trained at the one rate" in table.read_text()  # no search rows: said, not blank
    assert list(tmp_path.glob("*.png")) == []  # no plot unless asked


def test_report_reads_several_files_as_one(quality, tmp_path):
    """Methods run into different files (e.g. a later recipe beside the committed finals) share one table."""
    import json

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in base_rows() + rows_for("lora_r4", 154_240, 0.07)))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows_for("ax_r1_ti", 12_866, 0.05)))
    table = tmp_path / "table.md"
    quality.report(argparse.Namespace(jsonl=f"{first},{second}", plot=None, table=str(table)))
    rows = {line.split("|")[1].strip() for line in table.read_text().splitlines() if line.startswith("| `")}
    assert {"`lora_r4`", "`ax_r1_ti`"} <= rows
