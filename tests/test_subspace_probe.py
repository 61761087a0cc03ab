"""The subspace probe (benchmarks/subspace_probe.py): its config is the quality run's, cut short, and its report's
arithmetic (paired loss gaps, the lowest-loss pick beside the judge's scores) on synthetic curves."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def probe():
    return benchmark_module("subspace_probe.py", "subspace_probe")


def test_config_is_the_quality_run_cut_short(probe, tmp_path):
    quality = probe.quality  # the benchmark the probe cuts short
    job = dict(method="axksp_r4_ti_ps2", subject="striped_star", draw=2, seed=0, steps=40, lr=3e-3, work_dir=str(tmp_path))
    cfg = probe.probe_config(job)
    full = quality.training_config(dict(method="axksp_r4_ti_ps2", subject="striped_star", seed=0, lr=3e-3, steps=1500,
                                        prior_weight=1.0, targets="conv", text=True, ti_lr=quality.TI_LR), tmp_path)
    assert cfg.projection_seed == 2 and cfg.max_train_steps == 40 and cfg.lr_scheduler == "constant"
    changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(full, k)}
    assert changed == {"max_train_steps", "checkpointing_steps", "output_dir"}


def test_report_pairs_the_curves_and_sets_the_pick_beside_the_judge(probe):
    noise = [0.3 + 0.2 * ((7 * i) % 5) for i in range(100)]  # the same batches: the same per-step noise
    rows = [dict(subject="s", draw=d, loss=[x - 0.01 * d for x in noise]) for d in (0, 1, 2)]
    gap, se = probe.paired(rows[2]["loss"], rows[0]["loss"])
    assert gap == pytest.approx(-0.02) and se == pytest.approx(0, abs=1e-9)
    scores = {("s", probe.method_of(d)): dict(subject_acc=acc, subject_fidelity=0.8)
              for d, acc in ((0, 0.4), (1, 0.1), (2, 0.1))}
    lines = probe.summarise(rows, scores)
    assert "| s | 2 (picked) | -0.0200 ± 0.0000 | - | - | - | 0.10 / 0.800 |" in lines
    assert lines[-1].endswith("subject acc 0.100 over 1 subjects; the mean over the draws: 0.200")


def test_binding_is_the_share_of_the_fit_the_class_prompt_does_not_get(probe):
    rows = [dict(method="m", subject=s, draw=None, base_inst_subject=0.16, inst_subject=0.06, inst_class=0.06 + b,
                 binding=b, drift=0.01) for s, b in (("a", 0.02), ("b", 0.04))]
    scores = {("a", "m"): dict(subject_acc=0.5)}
    (line,) = probe.binding(rows, scores)[2:]
    assert line == "| m | 2 | 0.1000 | 0.0300 | 30.0% | +0.0100 | 0.50 (1) |"
