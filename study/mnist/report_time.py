"""The MNIST regression report's training-time section: seconds per finished trial, and the time each run takes to
reach a test MSE within REACH_FACTOR of its target's best final one, per batch size.

Apart from report.py, which writes the other sections of the batch-size sweep and calls `write_time` with the sweep
table, the per-epoch table and the targets in its order; the time-to-reach tables read alone here.
"""

import math

import pandas as pd

from analysis.figures import ReportWriter, batch_axis, log_scale_if_wide, new_figure
from study import metrics as M

REACH_FACTOR = 1.1  # time to reach: first epoch with test MSE <= 1.1 x the target's best final MSE


def reach_table(sweep: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the first epoch (and training seconds) with test MSE <= REACH_FACTOR x the target's best final."""
    best = sweep.groupby("target")["final_test_mse"].min()
    rows = []
    for trial_id, part in epochs.sort_values([M.EPOCH]).groupby("trial_id", sort=True):
        target = part["target"].iloc[0]
        threshold = REACH_FACTOR * best.get(target, math.nan)
        hit = part[part[M.TEST_MSE] <= threshold]
        rows.append({"trial_id": trial_id, "threshold_mse": threshold,
                     "epoch_reached": hit[M.EPOCH].iloc[0] if len(hit) else math.nan,
                     "seconds_to_reach": hit[M.TRAIN_SECONDS].iloc[0] if len(hit) else math.nan})
    return pd.DataFrame.from_records(rows, columns=["trial_id", "threshold_mse", "epoch_reached", "seconds_to_reach"])


def write_time(report: ReportWriter, sweep: pd.DataFrame, epochs: pd.DataFrame, targets: list) -> None:
    """The section; `targets` in the order the report draws them."""
    report.heading("Training time")
    merged = sweep.merge(reach_table(sweep, epochs), on="trial_id", how="left")
    rows = []
    for (target, batch), part in merged.groupby(["target", "batch_size"], sort=True):
        done = part[part["outcome"] == "done"]  # a diverged or errored run's seconds cover fewer epochs
        rows.append({"target": target, "batch_size": batch, "runs": len(part), "finished": len(done),
                     "mean_train_seconds": done[M.TRAIN_SECONDS].mean(),
                     "mean_final_test_mse": part["final_test_mse"].mean(),
                     "threshold_mse": part["threshold_mse"].iloc[0],
                     "runs_reached": int(part["seconds_to_reach"].notna().sum()),
                     "median_epoch_reached": part["epoch_reached"].median(),
                     "median_seconds_to_reach": part["seconds_to_reach"].median()})
    table = pd.DataFrame.from_records(rows)
    report.text(f"Training seconds are the summed epoch times of a finished trial (evaluation and gradient-noise "
                f"probes excluded: the probes' share of an epoch depends on the batch size; in a study stored "
                f"before they were timed apart the probes are in). "
                f"Time to reach: "
                f"the training seconds up to the first epoch whose test MSE is at most {REACH_FACTOR} x the best "
                f"final test MSE of that target over all batch sizes and runs (median over the runs that reach "
                f"it; runs_reached counts them).")
    report.table("time", table, "Training time, final MSE and time to reach the MSE threshold")
    fig, (ax_time, ax_mse, ax_reach) = new_figure(3)
    for target in targets:
        part = table[table["target"] == target]
        trials = sweep[(sweep["target"] == target) & (sweep["outcome"] == "done")]
        line, = ax_time.plot(part["batch_size"], part["mean_train_seconds"], marker="o", label=f"target: {target}")
        ax_time.plot(trials["batch_size"], trials[M.TRAIN_SECONDS], ".", color=line.get_color(), alpha=0.5)
        ax_mse.plot(part["batch_size"], part["mean_final_test_mse"], marker="o", label=f"target: {target}")
        ax_reach.plot(part["batch_size"], part["median_seconds_to_reach"], marker="o", label=f"target: {target}")
    for ax, ylabel, title in ((ax_time, "training seconds per trial (s)", "training time (dots: runs)"),
                              (ax_mse, "final test MSE (target units²)", "final MSE (mean over runs)"),
                              (ax_reach, "training seconds to reach (s)", f"time to ≤ {REACH_FACTOR} x best MSE")):
        batch_axis(ax, sweep["batch_size"])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    log_scale_if_wide(ax_mse, table["mean_final_test_mse"])
    report.figure("time", fig, "Training seconds per trial, final MSE and time to reach the threshold vs batch size")
    missing = not_reached(table)
    if missing:
        report.text(f"Not in the time-to-reach panel (no run reached its target's threshold): {missing}.")


def not_reached(table: pd.DataFrame) -> str:
    """The (target, batch sizes) the time-to-reach panel cannot draw, in words; "" when every one is drawn."""
    gone = table[table["runs_reached"] == 0]
    return "; ".join(f"target {t}: batch " + ", ".join(str(b) for b in part["batch_size"])
                     for t, part in gone.groupby("target", sort=False))
