"""The figures of a workload study's report: curves per batch size (of the primary metric, and of every other
metric with a goal), the primary metric against batch size with its run-to-run spread and the noise scale, and
training speed per batch size. Drawn from the tables of analysis/workload_tables.py (stored results only); used by
analysis/workload_report.py.
"""

import math

import numpy as np
import pandas as pd

from analysis import noise_figures
from analysis.figures import batch_axis, epoch_axis, fmt, log_scale_if_wide, new_figure
from analysis.workload_tables import EXAMPLES, STEP, Spec
from study import metrics as M

MAX_LINES = 8  # more configurations per batch size than this: the sensitivity figure draws the best one only
X_AXES = ((M.EPOCH, "epoch"), (EXAMPLES, "training examples seen"), (STEP, "optimizer steps (log scale)"))


def direction(spec: Spec, metric: str | None = None) -> str:
    return "higher is better" if spec.higher(metric or spec.primary) else "lower is better"


def _reference_lines(ax, spec: Spec, values, metric: str | None = None) -> None:
    """The metric's (default: the primary one's) goals (dashed) and chance level (dotted), where workload.json
    declares them, with the y axis fitted to the data and the goals: a chance level far off the data is named in
    the legend, not drawn."""
    metric = metric or spec.primary
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    goals = [value for name, value, _ in spec.goals if name == metric]
    if not len(v):
        return
    low, high = min([v.min(), *goals]), max([v.max(), *goals])
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.05
    for value in goals:
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"goal {fmt(value)}")
    chance = spec.chance.get(metric)
    if chance is not None:
        inside = low - 3 * pad <= chance <= high + 3 * pad
        ax.axhline(chance if inside else np.nan, color="grey", linestyle=":", linewidth=1,
                   label=f"chance {fmt(chance)}" + ("" if inside else " (off the axis)"))
        if inside:
            low, high = min(low, chance), max(high, chance)
    ax.set_ylim(low - pad, high + pad)


def _select(table: pd.DataFrame, row: pd.Series, axes: list) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for a in axes:
        mask &= (table[a] == row[a]).to_numpy()
    return table[mask]


def curves(curve_tbl: pd.DataFrame, chosen: pd.DataFrame, spec: Spec, metric: str | None = None):
    """2 x 3 panels: the primary metric (top) and the training loss (bottom) against epoch, examples seen and
    optimizer steps; a line per batch size (its chosen configuration, mean over runs), band min..max over runs.
    With another `metric` (whose values curve_tbl holds as its "metric_" columns): that metric's row alone."""
    rows = (("metric", spec.primary), ("train_loss", M.TRAIN_LOSS)) if metric in (None, spec.primary) else (
        ("metric", metric),)
    fig, axes = new_figure(3 * len(rows), width=4.2, height=3.3)
    lines = []
    for _, config in chosen.sort_values("batch_size").iterrows():
        part = _select(curve_tbl, config, list(spec.axes)).sort_values(M.EPOCH)
        label = f"batch {fmt(config['batch_size'])}"
        colour = None
        for i, (y, name) in enumerate(rows):
            for j, (x, _) in enumerate(X_AXES):
                ax = axes[3 * i + j]
                ok = part[np.isfinite(part[f"{y}_mean"]) & np.isfinite(part[x])]
                if x == STEP:
                    ok = ok[ok[x] > 0]  # step 0 has no place on a log axis
                if ok.empty:
                    continue
                line, = ax.plot(ok[x], ok[f"{y}_mean"], marker="o", color=colour, label=label)
                colour = line.get_color()
                # arrays, not Series: numpy 1.24's masked arrays take a pandas Series's _data (its block manager)
                ax.fill_between(ok[x].to_numpy(), ok[f"{y}_min"].to_numpy(float), ok[f"{y}_max"].to_numpy(float),
                                color=colour, alpha=0.15, linewidth=0)
                if not lines or lines[-1].get_label() != label:
                    lines.append(line)
    for i, (y, name) in enumerate(rows):
        for j, (x, xlabel) in enumerate(X_AXES):
            ax = axes[3 * i + j]
            if y == "metric":
                shown = curve_tbl.merge(chosen[list(spec.axes)], on=list(spec.axes))
                _reference_lines(ax, spec, list(shown["metric_min"]) + list(shown["metric_max"]), name)
            else:
                log_scale_if_wide(ax, curve_tbl["train_loss_mean"])
            if x == M.EPOCH:
                epoch_axis(ax)
            else:
                ax.set_xlabel(xlabel)
            if x == STEP:
                steps_axis(ax)
            ax.set_ylabel(name + (f" ({direction(spec, name)})" if y == "metric" else ""))
            ax.set_title(f"{name} vs {xlabel.split(' (')[0]}")
    best = "each batch size's best configuration, " if len(spec.axes) > 1 else ""
    fig.suptitle(f"{spec.name}: {best}mean over runs (band: min to max)")
    handles = lines + [h for h in axes[0].get_lines() if h.get_label().startswith(("goal", "chance"))]
    if handles:
        fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside right upper")
    return fig


def sensitivity(spread: pd.DataFrame, chosen: pd.DataFrame, trials: list, spec: Spec):
    """The final primary metric against batch size: mean over finished runs, bars min..max; a line per
    configuration of the other axes (or the best one per batch size when there are too many), and B_simple per
    batch size dotted on the right axis."""
    fig, (ax,) = new_figure(1, width=6.4, height=4.8)
    others = [a for a in spec.axes if a != "batch_size"]
    groups = [(", ".join(f"{a} {fmt(v)}" for a, v in zip(others, key if isinstance(key, tuple) else (key,))), part)
              for key, part in spread.groupby(others, sort=True, dropna=False)] if others else [(spec.primary, spread)]
    if len(groups) > MAX_LINES:
        groups = [("best configuration per batch size", spread.merge(chosen[list(spec.axes)], on=list(spec.axes)))]
    for label, part in groups:
        part = part[part["finished"] > 0].sort_values("batch_size")
        ax.errorbar(part["batch_size"], part["mean"], yerr=[part["mean"] - part["min"], part["max"] - part["mean"]],
                    marker="o", capsize=3, label=label)
    _reference_lines(ax, spec, list(spread["min"]) + list(spread["max"]))
    if noise_figures.overlay(ax, trials):
        twin = ax._noise_twin
        twin.set_yscale("linear")  # log only where B_simple spans decades
        log_scale_if_wide(twin, [y for line in twin.get_lines() for y in line.get_ydata()])
    batch_axis(ax, spread["batch_size"])
    ax.set_ylabel(f"final {spec.primary} ({direction(spec)})")
    ax.set_title(f"final {spec.primary} vs batch size")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)  # off the curves and the
    # right-hand axis' points
    return fig


def speed(timing: pd.DataFrame, trials: pd.DataFrame):
    """Seconds per training epoch, images per second, and each finished trial's training seconds per batch size."""
    fig, axes = new_figure(3, width=4.2, height=3.3)
    columns = (("seconds_per_epoch", "training seconds per epoch (s)", "seconds per epoch (median)"),
               ("images_per_second", "training images per second", "training speed (median over epochs)"))
    for ax, (column, ylabel, title) in zip(axes, columns):
        ok = timing[np.isfinite(timing[column])]
        ax.plot(ok["batch_size"], ok[column], marker="o")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        log_scale_if_wide(ax, ok[column])
    ax = axes[2]
    done = trials[(trials["outcome"] == "done") & np.isfinite(trials["train_seconds"])]
    ax.plot(done["batch_size"], done["train_seconds"], ".", alpha=0.6, label="one finished run")
    ax.plot(timing["batch_size"], timing["mean_train_seconds"], marker="o", label="mean over finished runs")
    ax.set_ylabel("training seconds per trial (s)")
    ax.set_title("total training time")
    ax.legend(fontsize="small")
    for ax in axes:
        batch_axis(ax, trials["batch_size"])
    return fig


def steps_axis(ax) -> None:
    """Log x axis of optimizer steps, ticked at 1, 2, 5 x 10^k in plain numbers (the default's minor labels
    overlap over the one or two decades a study spans)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def has_finite(values) -> bool:
    return any(math.isfinite(float(v)) for v in values)
