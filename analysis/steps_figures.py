"""The steps-to-result report section: CSV tables, six figures and the text that states each rule.

    write_section(trials, goals, out_dir, ranges=..., level=0.95, safety=10, n_boot=1000, seed=0) -> markdown

`trials` and `goals` as in analysis/steps.py. The tables and PNGs go to out_dir; the markdown that shows them is
returned for the caller's report.md. A pure function of its inputs: a second call writes the same files.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import steps as A
from analysis.figures import ReportWriter, batch_axis, fmt, new_figure
from study.steps import STATUSES, configs_to_wait_for, strictest

STATUS_STYLE = {"reached": ("o", "tab:green"), "censored": ("s", "tab:orange"),
                "stopped_by_rule": ("^", "tab:blue"), "diverged": ("x", "tab:red"), "infeasible": ("v", "tab:grey")}


def _goal_label(goal: dict) -> str:
    return f"{goal['metric']} {'>=' if goal['higher_is_better'] else '<='} {goal['value']:g}"


def _log_y(ax) -> None:
    """A log y axis whose ticks carry numbers even when the data span less than a decade (the log axis then
    labels no major tick)."""
    from matplotlib import ticker

    lim = ax.dataLim
    if not (math.isfinite(lim.y0) and lim.y0 > 0):  # nothing positive drawn (no batch size reached the goal)
        ax.text(0.5, 0.5, "nothing to draw: no configuration reached the goal", ha="center", va="center",
                transform=ax.transAxes)
        return
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 3, 5)))
    low, high = ax.get_ylim()
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if high / low < 30:
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)


def _legend(ax, **options) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel has nothing to list
        ax.legend(**options)


def _finite(table, key):
    return [r for r in table if math.isfinite(r[key])]


def _steps_figure(results, per_example: bool):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    for i, res in enumerate(results):
        colour = f"C{i}"
        rows = _finite(res["table"], "steps")
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows], dtype=float)
        scale = b if per_example else np.ones_like(b)
        s = np.array([r["steps"] for r in rows]) * scale
        low = np.array([r["low"] for r in rows]) * scale
        high = np.array([r["high"] for r in rows]) * scale
        open_end = ~np.isfinite(high)  # some resamples never reach the goal: drawn to 3x, with a triangle
        high = np.where(open_end, s * 3, high)
        ax.errorbar(b, s, yerr=[s - low, high - s], fmt="o", color=colour, capsize=3, label=_goal_label(res["goal"]))
        if open_end.any():
            ax.plot(b[open_end], high[open_end], "^", color=colour, ms=6,
                    label="interval open above" if i == 0 else None)
        edge = np.array([r["edge"] for r in rows])
        if edge.any():
            ax.plot(b[edge], s[edge], "o", mfc="white", mec=colour, ms=8, label="best on the search edge")
        grid = np.geomspace(b.min(), b.max(), 100)
        g = grid if per_example else 1.0
        first = rows[0]["steps"] * b[0]  # examples at the smallest batch: constant under perfect scaling
        ax.plot(grid, first / grid * g, ":", color=colour, lw=1, label="perfect scaling" if i == 0 else None)
        f = res["fit"]
        if math.isfinite(f["s_min"]):
            ax.plot(grid, (f["s_min"] + f["e_min"] / grid) * g, "-", color=colour, lw=1,
                    label=f"fit: B_crit {fmt(f['b_crit'], 3)}")
    batch_axis(ax, [t["batch_size"] for res in results for t in res["table"]])
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("examples to result" if per_example else "steps to result")
    _legend(ax, fontsize=7)
    return fig


def _lr_figure(results):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    for i, res in enumerate(results):
        rows = _finite(res["table"], "best_lr")
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows], dtype=float)
        lr = np.array([r["best_lr"] for r in rows])
        # Goals often share their best configuration: later goals drawn smaller on top, so both stay visible.
        ax.plot(b, lr, "o-" if i == 0 else "s--", ms=8 if i == 0 else 4, color=f"C{i}",
                label=f"best lr, {_goal_label(res['goal'])}")
        if i == 0:
            ax.plot(b, lr[0] * b / b[0], ":", color="black", lw=1, label="linear scaling")
            ax.plot(b, lr[0] * np.sqrt(b / b[0]), "--", color="black", lw=1, label="square-root scaling")
    batch_axis(ax, [r["batch_size"] for res in results for r in res["table"]])
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("learning rate")
    _legend(ax)
    return fig


def _map_figure(trials, result):
    fig, (ax,) = new_figure(1, width=6.6, height=4.2)
    for status in STATUSES:
        chosen = [t for t in trials if t["status"] == status]
        if chosen:
            marker, colour = STATUS_STYLE[status]
            ax.scatter([t["batch_size"] for t in chosen], [t["lr"] for t in chosen], marker=marker, c=colour,
                       label=status.replace("_", " "))
    best = [r for r in result["table"] if math.isfinite(r["best_lr"])]
    ax.scatter([r["batch_size"] for r in best], [r["best_lr"] for r in best], s=120, facecolors="none",
               edgecolors="black", label="best")
    batch_axis(ax, [t["batch_size"] for t in trials])
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("learning rate")
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _seconds_figure(results):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    for i, res in enumerate(results):
        rows = _finite(res["table"], "seconds")
        ax.plot([r["batch_size"] for r in rows], [r["seconds"] for r in rows], "o-", color=f"C{i}",
                label=_goal_label(res["goal"]))
    batch_axis(ax, [r["batch_size"] for res in results for r in res["table"]])
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("training seconds to result (best config)")
    _legend(ax)
    return fig


def _noise_figure(results):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    sizes = [r["batch_size"] for res in results for r in res["table"]]
    for i, res in enumerate(results):
        colour, f = f"C{i}", res["fit"]
        rows = _finite(res["table"], "b_simple")
        # Goals often share their best configuration: later goals drawn smaller on top, so both stay visible.
        ax.plot([r["batch_size"] for r in rows], [r["b_simple"] for r in rows], "s", color=colour,
                ms=8 if i == 0 else 4, label=f"B_simple before {_goal_label(res['goal'])}")
        if math.isfinite(f["b_crit"]):
            ax.axhline(f["b_crit"], color=colour, lw=1, label=f"B_crit (fit) {fmt(f['b_crit'], 3)}")
            if math.isfinite(f["b_crit_low"]) and math.isfinite(f["b_crit_high"]):
                ax.axhspan(f["b_crit_low"], f["b_crit_high"], color=colour, alpha=0.15)
    batch_axis(ax, sizes)
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("batch size (examples)")
    _legend(ax, fontsize=7)
    return fig


def _tables(trials, results):
    per_batch, fits, rows = [], [], []
    for res in results:
        label = _goal_label(res["goal"])
        regimes = {r["batch_size"]: r for r in res["regimes"]}
        for r in res["table"]:
            g = regimes.get(r["batch_size"], {})
            per_batch.append({"goal": label, **{k: v for k, v in r.items() if k != "replicates"},
                              "ratio_to_2B": g.get("ratio", math.nan), "ratio_low": g.get("low", math.nan),
                              "ratio_high": g.get("high", math.nan), "regime": g.get("regime", "")})
        simple = [r["b_simple"] for r in res["table"] if math.isfinite(r["b_simple"])]
        fits.append({"goal": label, **res["fit"], "b_simple_median": float(np.median(simple)) if simple else math.nan,
                     "b_simple_min": min(simple, default=math.nan), "b_simple_max": max(simple, default=math.nan)})
    for t in trials:
        row = {k: t.get(k) for k in ("trial_id", "batch_size", "config", "lr", "momentum", "status")}
        row["last_step"] = t["rows"][-1]["step"] if t["rows"] else math.nan
        for res in results:
            row[f"steps {_goal_label(res['goal'])}"] = A.steps_to_result(t["rows"], res["goal"])[0]
        rows.append(row)
    order = pd.DataFrame(rows).sort_values(["batch_size", "config"], kind="stable")
    return pd.DataFrame(per_batch), pd.DataFrame(fits), order


def write_section(trials: list[dict], goals: list[dict], out_dir, ranges: dict | None = None, level: float = 0.95,
                  safety: float = 10.0, n_boot: int = 1000, seed: int = 0, writer: ReportWriter | None = None) -> str:
    """Tables and figures into out_dir; returns the section's markdown. writer: a report to add the section to
    (its folder is then out_dir's place; python -m analysis.report passes its own)."""
    results = A.analyse(trials, goals, ranges, level, safety, n_boot, seed)
    report = writer if writer is not None else ReportWriter(Path(out_dir))
    n = max(sum(1 for t in trials if t["batch_size"] == b) for b in {t["batch_size"] for t in trials})
    m = configs_to_wait_for(n, level, safety)
    pct = f"{level:.0%}"
    report.heading("Steps to result")
    report.text(
        f"Per batch size, the fewest steps over its configurations at which the validation metric reached each goal "
        f"(Shallue et al. 2019), with a {pct} percentile bootstrap interval over configurations ({n_boot} "
        f"resamples, seed {seed}). A trial's steps to result: its first evaluation at the goal, interpolated "
        "between it and the previous evaluation linearly in (log step, metric); trials that never reached a goal "
        "(censored at the step budget, stopped by the rule, diverged, infeasible) count as not reached.",
        f"Early stop that cannot change the result: once m = {m} of the {n} configurations of a batch size reached "
        f"the strictest goal, any trial of that batch size past the m-th smallest of their steps is stopped. It is "
        f"slower than m configurations, so it is the minimum of no bootstrap resample holding one of them; a "
        f"resample holding none (probability (1 - m/N)^N = {(1 - m / n) ** n:.2g}, under a tenth of the interval's "
        f"tail) counts as the m-th fastest's steps, with or without the rule.",
        "The best configuration is flagged *on the edge* when its learning rate (or 1 - momentum) is the largest "
        "or smallest sampled or lies in the outer 1/N of the sampled log range: the range was too narrow there.",
    )
    per_batch, fits, trial_rows = _tables(trials, results)
    report.table("steps_per_batch", per_batch, "Steps to result per batch size and goal (best configuration)",
                 shown=per_batch[["goal", "batch_size", "configs", "reached", "steps", "low", "high",
                                  "best_lr", "edge", "b_simple", "ratio_to_2B", "regime"]])
    report.figure("steps_to_result", _steps_figure(results, False),
                  "Steps to result vs batch size: best configuration with its bootstrap interval (a triangle: open "
                  "above, some resamples never reach the goal), perfect scaling from the smallest batch (dotted) and "
                  "the fit S_min + E_min / B (solid)")
    report.figure("examples_to_result", _steps_figure(results, True),
                  "Examples to result (steps x batch size); the fit is S_min B + E_min")
    report.heading("The critical batch size", 3)
    report.text(
        "Fit S(B) = S_min + E_min / B (McCandlish et al. 2018) by least squares on relative residuals (weights "
        "1/S^2), S_min and E_min kept >= 0, over the batch sizes whose best configuration reached the goal; "
        "B_crit = E_min / S_min. Intervals: the fit repeated on every bootstrap replicate (one resample of "
        "configurations per batch size). Goodness: R^2 of log S against the log of the curve, and the largest "
        "relative residual.",
        "Regime at B from r = S(B) / S(2B) and its interval from the same replicates: perfect scaling if r >= 1.8, "
        "maximal data parallelism if r <= 1.1; in between, perfect scaling if the interval holds 2 but not 1, "
        "maximal data parallelism if it holds 1 but not 2, undetermined if it holds both, otherwise diminishing "
        "returns. (A bootstrap interval of a minimum over configurations is one-sided: its lower end is the "
        "minimum itself unless several configurations tie near it.)",
    )
    report.table("steps_fit", fits, "Fit per goal: S_min, E_min, B_crit with intervals, how well it fits, and "
                 "B_simple over the batch sizes (median, min, max) beside B_crit",
                 shown=fits[["goal", "batch_sizes", "s_min", "s_min_low", "s_min_high", "e_min", "b_crit",
                             "b_crit_low", "b_crit_high", "r2_log", "max_rel_residual", "b_simple_median",
                             "b_simple_min", "b_simple_max"]])
    report.text(
        "B_simple beside B_crit: the gradient noise scale measured in the same runs, over each batch size's best "
        "configuration's evaluations up to the one that reached the goal (numerator and denominator averaged "
        "separately where the rows store them, else the mean of the per-evaluation values). McCandlish et al. "
        "predict B_crit ~ B_noise averaged over training, B_simple standing in for B_noise.")
    report.figure("b_crit_vs_b_simple", _noise_figure(results),
                  "B_crit from the fit (line, band: interval) and B_simple of each batch size's best configuration")
    report.figure("best_lr", _lr_figure(results),
                  "Best learning rate vs batch size, with linear and square-root scaling from the smallest batch")
    strict = next(r for r in results if r["goal"] == strictest(goals))
    report.figure("lr_map", _map_figure(trials, strict),
                  f"Every configuration by batch size and learning rate, by status (strictest goal "
                  f"{_goal_label(strict['goal'])}); circled: the best per batch size there")
    report.figure("seconds_to_result", _seconds_figure(results),
                  "Measured training seconds to result of each batch size's best configuration")
    counts = pd.crosstab(trial_rows["batch_size"], trial_rows["status"]).reset_index()
    report.table("steps_trials", trial_rows, "Every trial (in the CSV): status, last evaluated step, steps to each "
                 "goal; shown: trials per status and batch size", shown=counts)
    return "\n".join(report.lines)
