"""The gradient noise scale in the reports: B_simple per batch size overlaid on the sensitivity figures, B_simple
over training per batch size, and per trial how many trained epochs have an estimate, or why none does.

Reads stored results only (study.engine.noise writes `noise_scale` and `noise_probes` per epoch). Used by the
papers' report sections (analysis.papers); a trial's B_simple is study.metrics.trial_value of its trained
epochs (the last finite one; one epoch's value is the ratio of its probes' mean tr(Sigma) and mean |G|^2).
"""

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.figures import ReportWriter, epoch_axis, new_figure
from analysis.trials import Trial
from study import metrics as M
from study.metrics import trial_value


def _values(trial: Trial) -> list[tuple[int, float, int]]:
    """(epoch, B_simple, probes) of each trained epoch (epoch 0 trains nothing)."""
    out = []
    for row in trial.rows:
        epoch = row.get(M.EPOCH)
        # An out-of-memory row ends a trial without training that epoch: not an epoch with no probe.
        if isinstance(epoch, (int, float)) and epoch >= 1 and row.get(M.STATUS) != M.STATUS_OOM:
            value = row.get(M.NOISE_SCALE)
            value = float(value) if isinstance(value, (int, float)) and value is not None else math.nan
            out.append((int(epoch), value, int(row.get(M.NOISE_PROBES) or 0)))
    return out


def trial_noise(trial: Trial) -> float:
    """The trial's B_simple (study.metrics.trial_value of its trained epochs; NaN if none)."""
    return trial_value(v for _, v, _ in _values(trial))


def why_none(trial: Trial) -> str:
    """Why a trial has no finite estimate ('' when it has one)."""
    values = _values(trial)
    if any(math.isfinite(v) for _, v, _ in values):
        return ""
    if trial.config.get("noise_scale") is False:
        return "noise scale off (--no-noise-scale)"
    if any(r.get(M.STATUS) == M.STATUS_OOM for r in trial.rows):
        return "ran out of GPU memory" + (f" in epoch {values[-1][0] + 1}" if values else " before its first epoch")
    if not values:
        return "no trained epoch stored yet" if trial.outcome in ("running", "pending") else "no trained epoch"
    if trial.outcome == "diverged" and len(values) <= 1:
        return f"diverged in epoch {values[-1][0]} (NaN loss, NaN gradients)"
    if not any(M.NOISE_PROBES in r for r in trial.rows):
        return "no probe count stored (a study from before the fixed-weight estimator)"
    if not any(p for _, _, p in values):
        return "too few steps: no probe step in any epoch (fewer steps than --noise-every, or batches of 1)"
    if trial.outcome == "diverged":
        return f"diverged in epoch {values[-1][0]}, and |G|^2 estimates <= 0 before"
    return "the |G|^2 estimate was <= 0 in every epoch: gradient noise swamps the gradient at this batch size"


def coverage_table(trials: list, keys: list) -> pd.DataFrame:
    """One row per trial: trained epochs, epochs with a finite B_simple, their first, last (the trial's B_simple,
    study.metrics.trial_value) and median value, and why none."""
    rows = []
    for t in trials:
        values = _values(t)
        finite = [(e, v) for e, v, _ in values if math.isfinite(v)]
        rows.append({**{k: t.config.get(k) for k in keys}, "trial_id": t.trial_id, "outcome": t.outcome,
                     "trained_epochs": len(values), "finite_epochs": len(finite),
                     "probes_per_epoch": values[-1][2] if values else 0,
                     "first": finite[0][1] if finite else math.nan, "last": finite[-1][1] if finite else math.nan,
                     "median": float(np.median([v for _, v in finite])) if finite else math.nan,
                     "why_none": why_none(t)})
    return pd.DataFrame.from_records(rows, columns=[*keys, "trial_id", "outcome", "trained_epochs", "finite_epochs",
                                                    "probes_per_epoch", "first", "last", "median", "why_none"])


def by_batch(trials: list) -> pd.DataFrame:
    """Per batch size: the median and range over trials of each trial's B_simple (trials with one)."""
    values = pd.DataFrame({"batch_size": [t.config.get("batch_size") for t in trials],
                           "b_simple": [trial_noise(t) for t in trials]})
    values = values[np.isfinite(values["b_simple"])]
    return (values.groupby("batch_size")["b_simple"].agg(trials="count", median="median", min="min", max="max")
            .reset_index())


def _log_axis(axis) -> None:
    """A log scale labelled in plain numbers (3, 40, 0.5): B_simple often spans less than a decade, where the
    default labels minor ticks as 3 x 10^0."""
    from matplotlib.ticker import LogFormatter

    axis.axes.set_yscale("log")
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def overlay(ax, trials: list, colour: str = "grey", label: str = "") -> bool:
    """B_simple per batch size, as that batch size's runs measured it (median of the trials' values, bars min..max
    over runs), on a right-hand axis of a batch-size panel: B_simple depends on the batch size it is measured at
    (~100x between batch 16 and 1024 on MNIST), so no single value stands for the grid. Returns False (and draws
    nothing) when no trial has an estimate."""
    table = by_batch(trials)
    if table.empty:
        return False
    twin = getattr(ax, "_noise_twin", None) or ax.twinx()
    ax._noise_twin = twin  # several targets on one panel share the right-hand axis
    twin.errorbar(table["batch_size"], table["median"], yerr=[table["median"] - table["min"],
                                                              table["max"] - table["median"]],
                  color=colour, marker="s", linestyle=":", capsize=2, alpha=0.8, label=f"{label}B_simple")
    # The twin axis' lines are not in the panel's legend: a handle without data there names the dotted line.
    ax.plot([], [], color=colour, marker="s", linestyle=":", alpha=0.8, label=f"{label}B_simple per batch (right)")
    _log_axis(twin.yaxis)
    twin.set_ylabel("B_simple (images), dotted")
    twin.grid(False)
    return True


def over_training(report: ReportWriter, trials: list, panel_of: Callable[[dict], str], name: str) -> bool:
    """B_simple per epoch: a panel per panel_of(config), a line per batch size (median over runs, band min..max).
    Returns False (and draws nothing) when no epoch has an estimate."""
    records = [{"panel": panel_of(t.config), "batch_size": t.config.get("batch_size"), M.EPOCH: e, "b": v}
               for t in trials for e, v, _ in _values(t) if math.isfinite(v) and v > 0]
    if not records:
        return False
    table = pd.DataFrame.from_records(records)
    panels = sorted(table["panel"].unique(), key=str)
    fig, axes = new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        part = table[table["panel"] == panel]
        for batch, group in sorted(part.groupby("batch_size"), key=lambda kv: kv[0]):
            s = group.groupby(M.EPOCH)["b"].agg(["median", "min", "max"]).sort_index()
            line = ax.plot(s.index, s["median"], marker="o", label=f"batch {batch}")[0]
            # arrays, not Series: numpy 1.24's masked arrays take a pandas Series's _data (its block manager)
            ax.fill_between(s.index.to_numpy(), s["min"].to_numpy(float), s["max"].to_numpy(float),
                            color=line.get_color(), alpha=0.15, linewidth=0)
        _log_axis(ax.yaxis)
        epoch_axis(ax)
        ax.set_ylabel("B_simple (images)")
        ax.set_title(panel)
        ax.legend()
    report.figure(name, fig, "Gradient noise scale B_simple over training per batch size (median over runs, "
                             "band: min to max)")
    return True


def write(report: ReportWriter, trials: list, keys: list, panel_of: Callable[[dict], str]) -> None:
    """The noise-scale section's figure over training and the per-trial coverage table."""
    if not over_training(report, trials, panel_of, "noise_over_training"):
        report.text("No trained epoch has a finite gradient noise scale: nothing to draw over training.")
    table = coverage_table(trials, keys)
    if len(table):
        report.text("Per trial: trained epochs with a finite B_simple, its first, last and median value, and why a "
                    "trial has none. A trial's B_simple, in every figure, table and TensorBoard's HPARAMS, is its "
                    "last finite value.")
        report.table("noise_coverage", table, "Gradient noise scale per trial")
