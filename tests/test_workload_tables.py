"""The workload report's tables on hand-made trials and frames (no Ray, no study folder): directions honoured,
intervals as Student's t gives them, diverged runs counted but never averaged, seconds and images per second from
cumulative rows, workload.json read into the report's spec. The end-to-end test is test_report_workload.py."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import workload_tables as T
from analysis.load import WORKLOAD_FILE
from analysis.trials import Trial


def spec(**changes) -> T.Spec:
    base = dict(name="toy", summary="", primary="val_acc", higher_is_better=True, test="test_acc",
                metrics=(("val_acc", True),), axes=("batch_size", "lr"), repeats=("seed",), goals=(), chance={},
                hook="", stage="sweep")
    return T.Spec(**{**base, **changes})


def trials_df(rows) -> pd.DataFrame:
    """rows: (batch_size, lr, seed, outcome, final, best)."""
    return pd.DataFrame.from_records([dict(trial_id=f"t{i}", batch_size=b, lr=lr, seed=s, outcome=o, final=f, best=bb,
                                           train_seconds=1.0, noise_scale=math.nan)
                                      for i, (b, lr, s, o, f, bb) in enumerate(rows)])


NAN = math.nan
TRIALS = trials_df([(8, 0.1, 0, "done", 0.80, 0.85), (8, 0.1, 1, "done", 0.90, 0.91), (8, 0.1, 2, "diverged", NAN, NAN),
                    (8, 0.01, 0, "done", 0.70, 0.70), (32, 0.1, 0, "error", NAN, NAN),
                    (32, 0.01, 0, "done", 0.60, 0.65), (32, 0.01, 1, "done", 0.64, 0.66)])


def test_config_table_means_finished_runs_with_a_t_interval():
    table = T.config_table(TRIALS, ["batch_size", "lr"], "val_acc").set_index(["batch_size", "lr"])
    row = table.loc[(8, 0.1)]
    half = scipy_stats.t.ppf(0.975, 1) * np.std([0.8, 0.9], ddof=1) / math.sqrt(2)
    assert (row["runs"], row["finished"], row["outcomes"]) == (3, 2, "1 diverged, 2 done")
    assert row["final_val_acc"] == pytest.approx(0.85) and row["best_val_acc"] == pytest.approx(0.88)
    assert (row["final_val_acc_low"], row["final_val_acc_high"]) == pytest.approx((0.85 - half, 0.85 + half))
    assert row["interval"] == "t over 2 runs"
    one = table.loc[(8, 0.01)]
    assert one["final_val_acc"] == 0.7 and math.isnan(one["final_val_acc_low"]) and one["interval"] == "one run"
    none = table.loc[(32, 0.1)]
    assert math.isnan(none["final_val_acc"]) and none["finished"] == 0 and none["interval"] == "none finished"


@pytest.mark.parametrize("higher, picks", [(True, {8: 0.1, 32: 0.01}), (False, {8: 0.01, 32: 0.01})])
def test_axis_table_takes_the_best_configuration_in_the_metric_direction(higher, picks):
    configs = T.config_table(TRIALS, ["batch_size", "lr"], "val_acc")
    table = T.axis_table(configs, "batch_size", ["batch_size", "lr"], "val_acc", higher).set_index("batch_size")
    assert {b: table.loc[b, "best_configuration"] for b in table.index} == {b: f"lr {lr}" for b, lr in picks.items()}
    assert table["configurations"].tolist() == [2, 2] and "lr" not in table.columns
    by_lr = T.axis_table(configs, "lr", ["batch_size", "lr"], "val_acc", higher).set_index("lr")
    assert by_lr.loc[0.1, "best_configuration"] == "batch_size 8"  # batch 32 at lr 0.1 has no finished run


def test_a_value_whose_runs_all_failed_keeps_its_row_without_a_number():
    configs = T.config_table(trials_df([(8, 0.1, 0, "done", 0.8, 0.8), (64, 0.1, 0, "diverged", NAN, NAN)]),
                             ["batch_size"], "val_acc")
    table = T.axis_table(configs, "batch_size", ["batch_size"], "val_acc", True).set_index("batch_size")
    assert list(table.index) == [8, 64] and math.isnan(table.loc[64, "final_val_acc"])
    assert table.loc[64, "outcomes"] == "1 diverged" and table.loc[64, "best_configuration"] == "–"


def test_spread_over_finished_runs():
    spread = T.spread_table(TRIALS, ["batch_size", "lr"]).set_index(["batch_size", "lr"])
    row = spread.loc[(32, 0.01)]
    assert row[["runs", "finished", "min", "mean", "max"]].tolist() == pytest.approx([2, 2, 0.60, 0.62, 0.64])
    assert row["cv"] == pytest.approx(np.std([0.6, 0.64], ddof=1) / 0.62)
    assert spread.loc[(8, 0.1), "finished"] == 2 and spread.loc[(8, 0.1), "runs"] == 3


def trial(tid, config, rows) -> Trial:
    return Trial(stage="sweep", trial_id=tid, dirname=tid, config=config, rows=rows, tune_status="TERMINATED")


def rows(errors, seconds_per_epoch, batch, n=100, diverge_at=None):
    out = []
    for e, err in enumerate(errors):
        diverged = diverge_at is not None and e >= diverge_at
        out.append({"epoch": e, "step": e * n // batch, "examples": e * n, "train_seconds": e * seconds_per_epoch,
                    "train_loss": NAN if diverged or e == 0 else err * 2, "val_acc": NAN if diverged else err,
                    "noise_scale": 10.0 * e if e else NAN, "diverged": diverged,
                    "status": "diverged" if diverged else ("done" if e == len(errors) - 1 else "running")})
    return out


def test_trial_and_epoch_frames_from_stored_rows():
    s = spec(axes=("batch_size",), repeats=("seed",), test="")
    ok = trial("a", {"batch_size": 10, "seed": 0}, rows([0.5, 0.9, 0.7], 2.0, 10))
    bad = trial("b", {"batch_size": 10, "seed": 1}, rows([0.5, 0.8, 0.0], 4.0, 10, diverge_at=2))
    frame = T.trial_frame([ok, bad], s).set_index("trial_id")
    assert frame.loc["a", ["final", "best", "best_epoch"]].tolist() == [0.7, 0.9, 1.0]  # higher is better
    assert frame.loc["b", "outcome"] == "diverged" and math.isnan(frame.loc["b", "final"])
    assert math.isnan(frame.loc["b", "best"])  # a diverged run has no value, as in the other reports
    epochs = T.epoch_frame([ok, bad], s)
    a = epochs[epochs["trial_id"] == "a"].set_index("epoch")
    assert math.isnan(a.loc[0, "epoch_seconds"]) and a.loc[1:, "epoch_seconds"].tolist() == [2.0, 2.0]
    assert a.loc[1:, "images_per_second"].tolist() == [50.0, 50.0] and a["step"].tolist() == [0, 10, 20]
    curve = T.curve_table(epochs, ["batch_size"]).set_index("epoch")
    assert curve.loc[1, ["runs", "metric_mean", "train_loss_mean"]].tolist() == pytest.approx([2, 0.85, 1.7])
    assert curve.loc[2, ["runs", "metric_mean", "metric_min"]].tolist() == pytest.approx([1, 0.7, 0.7])
    timing = pd.DataFrame({"trial_id": ["a", "b"], "gpu_share": [0.5, 0.5], "gpu_seconds": [3.0, 1.0]})
    speed = T.timing_by_batch(epochs, frame.reset_index(), timing).iloc[0]
    assert speed["seconds_per_epoch"] == 3.0  # median of 2, 2, 4, 4: the diverged run's epoch 2 was trained too
    assert (speed["epochs_trained"], speed["mean_train_seconds"], speed["total_train_seconds"]) == (4, 4.0, 12.0)
    assert (speed["gpu_share"], speed["gpu_seconds"]) == (0.5, 4.0)


def test_spec_from_workload_json():
    declared = {"name": "toy", "summary": "s", "primary": "val_error",
                "metrics": [{"name": "val_error", "higher_is_better": False},
                            {"name": "val_acc", "higher_is_better": True}],
                "goals": [{"metric": "val_error", "value": 0.1, "higher_is_better": False}],
                "chance": {"val_error": 0.9},
                "axes": {"batch_size": [8, 16], "optimizer": ["sgd"], "lr": [0.1, 0.2], "seed": [0, 1]},
                "report": "my_pkg.report:section"}
    t = trial("a", {"batch_size": 8, "lr": 0.1, "seed": 0}, [{"epoch": 3, "val_error": 0.2, "test_error": 0.3}])
    study = SimpleNamespace(files={WORKLOAD_FILE: declared}, meta={"study": "toy"}, stages={"sweep": [t]},
                            expected_stages=lambda: ["sweep"], trials=lambda stage=None: [t])
    s = T.spec_of(study)
    assert (s.primary, s.higher_is_better, s.test) == ("val_error", False, "test_error")
    assert s.axes == ("batch_size", "lr") and s.repeats == ("seed",)  # one-valued optimizer: a constant
    assert s.goals == (("val_error", 0.1, False),) and s.chance == {"val_error": 0.9}
    assert s.hook == "my_pkg.report:section" and s.stage == "sweep"
    assert T.axis_value({"options": {"width": 4}}, "width") == 4  # a workload's own flag as an axis


def test_sensitivity_draws_the_best_per_batch_size_when_the_other_axes_have_too_many_values():
    from analysis import workload_figures as F

    lrs = [0.001 * 2 ** i for i in range(F.MAX_LINES + 1)]
    trials = trials_df([(b, lr, 0, "done", 0.5 + lr * (b / 8), 0.5) for b in (8, 32) for lr in lrs])
    configs = T.config_table(trials, ["batch_size", "lr"], "val_acc")
    chosen = T.best_rows(configs, ["batch_size"], "val_acc", True)
    s = spec()
    fig = F.sensitivity(T.spread_table(trials, ["batch_size", "lr"]), chosen, [], s)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["best configuration per batch size"]
    few = trials[trials["lr"].isin(lrs[:2])]
    fig = F.sensitivity(T.spread_table(few, ["batch_size", "lr"]), chosen, [], s)
    assert fig.axes[0].get_legend_handles_labels()[1] == [f"lr {lrs[0]:g}", f"lr {lrs[1]:g}"]


def test_the_workloads_own_report_section_is_called_when_asked_and_a_failing_one_is_named(tmp_path, monkeypatch):
    import sys
    import types

    from analysis import workload_report
    from analysis.figures import ReportWriter

    hook = types.ModuleType("toy_report_hook")
    hook.section = lambda report, study: report.heading(f"toy's own section for {study}")
    monkeypatch.setitem(sys.modules, "toy_report_hook", hook)
    report = ReportWriter(tmp_path)
    workload_report.write_hook(report, "study-x", spec(hook="toy_report_hook:section"))  # not asked: not run
    text = report.finish().read_text()
    assert "toy's own section for" not in text and "`toy_report_hook:section` was not run" in text
    report = ReportWriter(tmp_path)
    workload_report.write_hook(report, "study-x", spec(hook="toy_report_hook:section"), "")
    workload_report.write_hook(report, "study-x", spec(hook="toy_report_hook:missing"), "")
    text = report.finish().read_text()
    assert "## toy's own section for study-x" in text
    assert "`toy_report_hook:missing` failed: AttributeError" in text


def test_rows_that_count_steps_only_are_read_per_step():
    s = spec(axes=("batch_size",), test="")
    steps = [{"step": k, "examples": 10 * k, "train_seconds": 0.5 * k, "train_loss": NAN if k == 0 else 1.0 / (k + 1),
              "val_acc": 0.1 * k, "status": "done" if k == 4 else "running"} for k in (0, 2, 4)]
    t = trial("s", {"batch_size": 10, "seed": 0}, steps)
    frame = T.trial_frame([t], s).iloc[0]
    assert (frame["final"], frame["best"]) == pytest.approx((0.4, 0.4))
    curve = T.curve_table(T.epoch_frame([t], s), ["batch_size"])
    assert curve["step"].tolist() == [0, 2, 4] and curve["metric_mean"].tolist() == pytest.approx([0.0, 0.2, 0.4])


def test_a_workload_study_whose_trials_have_not_started_is_reported_as_partial(tmp_path):
    import json

    from analysis import report
    from tests.test_analysis_load import write_state

    root = tmp_path / "w"
    (root / "sweep").mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"study": "toy", "kind": "workload", "args": {}}))
    (root / "workload.json").write_text(json.dumps({"name": "toy", "primary": "val_error",
                                                    "metrics": [{"name": "val_error", "higher_is_better": False}],
                                                    "axes": {"batch_size": [8, 16], "seed": [0]}}))
    write_state(root / "sweep", [(None, f"a_{i}", "PENDING", {"batch_size": b, "seed": 0, "workload": "toy"}, 0)
                                 for i, b in enumerate([8, 16])])
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**PARTIAL RESULTS**" in text and "No trial has reported an epoch yet." in text
    assert "No trial has finished a training epoch yet" in text and not (tmp_path / "out" / "speed.png").exists()
    configs = pd.read_csv(tmp_path / "out" / "configurations.csv")
    assert configs["batch_size"].tolist() == [8, 16] and configs["finished"].tolist() == [0, 0]
