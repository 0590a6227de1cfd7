"""The noise-scale report pieces on hand-made trials: per-trial values, per-batch medians, the reasons a trial has
no estimate, and the figures. Run: python -m pytest tests/test_noise_figures.py -q"""

import math

import pandas as pd
import pytest

from analysis import noise_figures
from analysis.figures import ReportWriter, new_figure
from analysis.trials import Trial
from study import metrics as M
from study.engine.noise import trial_value

NAN = math.nan


def trial(batch: int, run: int, values: list, probes: int = 4, status: str = "TERMINATED", noise: bool = True,
          diverged_at: int | None = None) -> Trial:
    rows = [{M.EPOCH: 0, M.NOISE_SCALE: NAN, M.NOISE_PROBES: 0, M.STATUS: M.STATUS_RUNNING}]
    for epoch, value in enumerate(values, start=1):
        diverged = epoch == diverged_at
        last = epoch == len(values)
        rows.append({M.EPOCH: epoch, M.NOISE_SCALE: value, M.NOISE_PROBES: probes, M.DIVERGED: diverged,
                     M.STATUS: M.STATUS_DIVERGED if diverged else (M.STATUS_DONE if last else M.STATUS_RUNNING)})
    return Trial(stage="batch_sweep", trial_id=f"{batch}_{run}", dirname=f"t{batch}_{run}",
                 config={"target": "mean", "batch_size": batch, "run": run, "noise_scale": noise}, rows=rows,
                 tune_status=status)


def test_trial_value_is_the_last_finite_trained_epoch_and_batches_summarise_runs():
    trials = [trial(16, 0, [2.0, NAN, 4.0, 10.0]), trial(16, 1, [6.0, 8.0, NAN]), trial(64, 0, [NAN, 3.0])]
    assert noise_figures.trial_noise(trials[0]) == 10.0 == trial_value([NAN, 2.0, NAN, 4.0, 10.0])
    table = noise_figures.by_batch(trials).set_index("batch_size")
    assert table.loc[16, "trials"] == 2 and table.loc[16, "median"] == pytest.approx(9.0)
    assert (table.loc[16, "min"], table.loc[16, "max"]) == (8.0, 10.0)
    assert table.loc[64, "median"] == 3.0
    coverage = noise_figures.coverage_table(trials, ["batch_size", "run"]).set_index("trial_id")
    assert coverage.loc["16_0", "trained_epochs"] == 4 and coverage.loc["16_0", "finite_epochs"] == 3
    assert (coverage.loc["16_0", "first"], coverage.loc["16_0", "last"]) == (2.0, 10.0)
    assert (coverage["why_none"] == "").all()


@pytest.mark.parametrize("made, reason", [
    (trial(16, 0, [NAN, NAN], noise=False), "noise scale off"),
    (trial(16, 0, [NAN, NAN], probes=0), "too few steps"),
    (trial(16, 0, [NAN], diverged_at=1), "diverged in epoch 1"),
    (trial(16, 0, [NAN, NAN, NAN], diverged_at=3), "diverged in epoch 3, and |G|^2 estimates <= 0 before"),
    (trial(16, 0, [NAN, NAN]), "the |G|^2 estimate was <= 0 in every epoch"),
    (trial(16, 0, [], status="RUNNING"), "no trained epoch stored yet"),
])
def test_a_trial_without_an_estimate_says_why(made, reason):
    assert reason in noise_figures.why_none(made)
    assert math.isnan(noise_figures.trial_noise(made))


def test_figures_are_drawn_only_from_finite_values(tmp_path):
    report = ReportWriter(tmp_path)
    trials = [trial(16, r, [2.0 + r, 3.0, 4.0]) for r in range(2)] + [trial(256, 0, [30.0, NAN, 50.0])]
    assert noise_figures.over_training(report, trials, lambda c: f"target {c['target']}", "over")
    assert (tmp_path / "over.png").is_file()
    fig, (ax,) = new_figure(1)
    assert noise_figures.overlay(ax, trials)
    twin = ax._noise_twin
    data_line = twin.containers[0].lines[0]
    assert list(data_line.get_xdata()) == [16, 256] and list(data_line.get_ydata()) == pytest.approx([4.0, 50.0])
    empty = [trial(16, 0, [NAN, NAN])]
    assert not noise_figures.over_training(report, empty, lambda c: "x", "none")
    assert not noise_figures.overlay(new_figure(1)[1][0], empty)
    noise_figures.write(report, empty, ["batch_size"], lambda c: "x")
    coverage = pd.read_csv(tmp_path / "noise_coverage.csv")
    assert coverage["why_none"].str.contains("<= 0").all()
