"""The steps-to-result report's figures, drawn from analysis.steps' results (analysis/steps_figures.py saves them).

Conventions every figure keeps: a goal has one colour (C0, C1, ...) and a batch size one colour (batch_colours)
wherever they are a series; axes count the workload's examples in its unit word (`unit`: "examples", "images");
log axes only over positive values (an open or zero end drawn as a triangle); censored batch sizes drawn as arrows
up from their budget; the floor (the step of the last of the first FLOOR_EVALUATIONS evaluations, up to which
nothing is fitted) under steps to result; every band and goal in the legend.
"""

import math

import numpy as np

from analysis.figures import batch_axis, fmt, new_figure
from analysis.steps import FLOOR_EVALUATIONS
from analysis.steps import floor_step as steps_floor
from study.engine.steps import STATUSES

STATUS_STYLE = {"reached": ("o", "tab:green"), "censored": ("s", "tab:orange"),
                "stopped_by_rule": ("^", "tab:blue"), "diverged": ("x", "tab:red"), "infeasible": ("v", "tab:grey")}


ARROW = 2.0  # a censored batch size's arrow runs from its budget to this multiple of it
GOAL_SHIFT = 1.1  # goals' arrows and B_simple points at one batch size sit this factor apart on the batch axis


def _shift(i: int, goals: int) -> float:
    """The factor on the batch axis that sets goal i's marks beside the other goals' at the same batch size."""
    return GOAL_SHIFT ** (i - (goals - 1) / 2)


def goal_label(goal) -> str:
    return str(goal)


def batch_colours(sizes) -> dict:
    """One colour per batch size of the study, light to dark with the size, the same in every figure."""
    from matplotlib import colormaps

    sizes = sorted({int(b) for b in sizes})
    cmap = colormaps["viridis"]
    return {b: cmap(0.9 * i / max(len(sizes) - 1, 1)) for i, b in enumerate(sizes)}


def _batch_axis(ax, sizes, unit: str) -> None:
    batch_axis(ax, sizes)
    ax.set_xlabel(f"batch size ({unit})")


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
    elif math.floor(math.log10(high)) - math.ceil(math.log10(low)) < 2:  # fewer than 3 labelled decades: 2 and 5 too
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    else:  # the decades are labelled, and minor labels would crowd them (as 3 x 10^2)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _legend(ax, **options) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel has nothing to list
        ax.legend(**options)


def _positive(table, key):
    return [r for r in table if math.isfinite(r[key]) and r[key] > 0]


def floor_step(trials) -> float:
    """The floor under steps to result: the step of the FLOOR_EVALUATIONS-th step of the fine grid (10 on the grid
    from step 1, 19 on the grid from step 10 of studies stored before it), the smallest over the trials; NaN when
    no trial evaluated past step 0."""
    return min((f for t in trials for f in [steps_floor(t["rows"])] if not math.isnan(f)), default=math.nan)


def steps_figure(results, per_example: bool, floor: float, level: float, unit: str):
    fig, (ax,) = new_figure(1, width=9.0, height=4.6)
    sizes = [r["batch_size"] for res in results for r in res["table"]]
    grid = np.geomspace(min(sizes), max(sizes), 100)
    g = grid if per_example else np.ones_like(grid)
    once = set()  # the flag markers' labels, listed once for every goal
    tips = []  # the censored arrows' heads

    def label_once(label):
        if label in once:
            return None
        once.add(label)
        return label

    for i, res in enumerate(results):
        colour, name = f"C{i}", goal_label(res["goal"])
        rows = _positive(res["table"], "steps")
        if rows:
            b = np.array([r["batch_size"] for r in rows], dtype=float)
            scale = b if per_example else np.ones_like(b)
            s = np.array([r["steps"] for r in rows]) * scale
            high = np.array([r["upper"] for r in rows]) * scale
            open_end = ~np.isfinite(high)  # some resamples never reach the goal: drawn to 3x, with a triangle
            high = np.where(open_end, s * 3, high)
            ax.errorbar(b, s, yerr=[np.zeros_like(s), high - s], fmt="o", color=colour, capsize=3,
                        label=f"{name}: best; bar up to {level:.0%} of resampled bests")
            if open_end.any():
                ax.plot(b[open_end], high[open_end], "^", color=colour, ms=6, label=label_once("bar open above"))
            for key, style, label in (("edge", dict(marker="o", ms=9), "best on the search edge"),
                                      ("floor", dict(marker="D", ms=8), f"reached within the first "
                                       f"{FLOOR_EVALUATIONS} evaluations (not fitted)"),
                                      ("budget_limited", dict(marker="s", ms=10), "above half its budget"),
                                      ("first", dict(marker="v", ms=11), "at the first evaluation: at most this")):
                chosen = np.array([r["evaluation"] == 1 if key == "first" else r[key] for r in rows])
                if chosen.any():
                    ax.plot(b[chosen], s[chosen], ls="none", mfc="none", mec=colour, **style,
                            label=label_once(label))
            fitted = [r for r in rows if not r["floor"]] or rows
            first = fitted[0]["steps"] * fitted[0]["batch_size"]  # examples: constant under perfect scaling
            ideal = first / grid * g
            # Down to half the lowest point: further it would only stretch the log axis.
            keep = ideal >= 0.5 * s.min()  # (examples: the line is flat, all of it kept)
            ax.plot(grid[keep], ideal[keep], ":", color=colour, lw=1, label=label_once("perfect scaling (dotted)"))
        f = res["fit"]
        if math.isfinite(f["s_min"]) and f["s_min"] > 0 and f["e_min"] > 0:
            ax.plot(grid, (f["s_min"] + f["e_min"] / grid) * g, "-", color=colour, lw=1,
                    label=f"fit, {name}: " + (f"B_crit {fmt(f['b_crit'], 3)} ({res['verdict'][0]})"
                                              if res["verdict"][0] != "not measured" else "B_crit not measured"))
        censored = [r for r in res["table"] if math.isfinite(r["lower_bound"]) and r["lower_bound"] > 0]
        if censored:
            # Goals share a budget: each goal's arrows a little to the side, so none hides another.
            x = np.array([r["batch_size"] for r in censored]) * _shift(i, len(results))
            y = np.array([r["lower_bound"] * (r["batch_size"] if per_example else 1) for r in censored])
            ax.plot(x, y, "_", color=colour, ms=12, mew=2, label=f"{name}: not reached, above its budget (arrow)")
            for xi, yi in zip(x, y):
                ax.annotate("", xy=(xi, yi * ARROW), xytext=(xi, yi),
                            arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.5))
            tips.append(y.max() * ARROW)
    if math.isfinite(floor):
        low = min((r["steps"] for res in results for r in _positive(res["table"], "steps")), default=math.inf)
        # Drawn where it bounds the points; a line a decade below them would only squeeze them together.
        if low <= 10 * floor:
            ax.plot(grid, floor * g, "--", color="grey", lw=1,
                    label=f"floor: the first {FLOOR_EVALUATIONS} evaluations, to step {floor:g} (not fitted)")
        else:
            ax.plot([], [], "--", color="grey", lw=1, label=f"floor (first {FLOOR_EVALUATIONS} evaluations, to step "
                                                            f"{floor:g}): far below")
    _batch_axis(ax, sizes, unit)
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    if tips and ax.get_yscale() == "log":  # annotations are not data: make room for the arrowheads
        low, high = ax.get_ylim()
        ax.set_ylim(low, max(high, 1.3 * max(tips)))
    ax.set_ylabel(f"{unit} to result" if per_example else "steps to result")
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def best_of_k_figure(results):
    """Per goal: the expected best steps over k of the N configurations (left) and the chance that the best of k
    reaches the goal at all (right), one line per batch size."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = new_figure(2 * len(results), width=4.6, height=3.6, ncols=2)
    colours = batch_colours(r["batch_size"] for res in results for r in res["table"])
    for i, res in enumerate(results):
        ax, ax_p = axes[2 * i], axes[2 * i + 1]
        for r in res["table"]:
            curve = r["best_of_k"]
            k, e = np.array(curve["k"]), np.array(curve["expected"])
            shown = np.isfinite(e) & (e > 0)
            if shown.any():
                ax.plot(k[shown], e[shown], "o-", color=colours[r["batch_size"]], ms=3, label=str(r["batch_size"]))
            ax_p.plot(k, curve["p_reached"], "o-", color=colours[r["batch_size"]], ms=3, label=str(r["batch_size"]))
        n = max((len(r["best_of_k"]["k"]) for r in res["table"]), default=1)
        for a in (ax, ax_p):
            a.set_xlim(0.5, n + 0.5)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(goal_label(res["goal"]))
        ax.set_xlabel("configurations tried (k)")
        _log_y(ax)
        ax.set_ylabel("expected best steps to result")
        ax_p.set_title(goal_label(res["goal"]))
        ax_p.set_xlabel("configurations tried (k)")
        ax_p.set_ylabel("P(the best of k reaches the goal)")
        ax_p.set_ylim(-0.03, 1.03)
        _legend(ax_p, fontsize=7, title="batch size", loc="lower right")
    return fig


def lr_figure(results, unit: str):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    for i, res in enumerate(results):
        rows = _positive(res["table"], "best_lr")
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows], dtype=float)
        lr = np.array([r["best_lr"] for r in rows])
        # Goals often share their best configuration: later goals drawn smaller on top, so both stay visible.
        ax.plot(b, lr, "o-" if i == 0 else "s--", ms=8 if i == 0 else 4, color=f"C{i}",
                label=f"best lr, {goal_label(res['goal'])}")
        if i == 0:
            ax.plot(b, lr[0] * b / b[0], ":", color="black", lw=1, label="linear scaling")
            ax.plot(b, lr[0] * np.sqrt(b / b[0]), "--", color="black", lw=1, label="square-root scaling")
    _batch_axis(ax, [r["batch_size"] for res in results for r in res["table"]], unit)
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("learning rate")
    _legend(ax)
    return fig


def map_figure(trials, result, unit: str):
    fig, (ax,) = new_figure(1, width=6.6, height=4.2)
    for status in STATUSES:
        chosen = [t for t in trials if t["status"] == status]
        if chosen:
            marker, colour = STATUS_STYLE[status]
            ax.scatter([t["batch_size"] for t in chosen], [t["lr"] for t in chosen], marker=marker, c=colour,
                       label=status.replace("_", " "))
    best = _positive(result["table"], "best_lr")
    ax.scatter([r["batch_size"] for r in best], [r["best_lr"] for r in best], s=120, facecolors="none",
               edgecolors="black", label="best")
    _batch_axis(ax, [t["batch_size"] for t in trials], unit)
    ax.margins(y=0.08)  # the circles around the best at the range's ends stay whole
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("learning rate")
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def seconds_figure(results, unit: str):
    fig, (ax,) = new_figure(1, width=5.6, height=4.2)
    for i, res in enumerate(results):
        rows = _positive(res["table"], "seconds")
        ax.plot([r["batch_size"] for r in rows], [r["seconds"] for r in rows], "o-", color=f"C{i}",
                label=goal_label(res["goal"]))
    _batch_axis(ax, [r["batch_size"] for res in results for r in res["table"]], unit)
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel("training seconds to result (best config)")
    _legend(ax)
    return fig


def noise_figure(results, level: float, unit: str):
    """B_crit per goal (line and band) beside each batch size's B_simple before the goal (filled, bar: interval;
    a triangle where the interval is open) and at initialisation (open markers)."""
    fig, (ax,) = new_figure(1, width=7.6, height=4.4)
    sizes = [r["batch_size"] for res in results for r in res["table"]]
    once = set()
    for i, res in enumerate(results):
        colour, f, name = f"C{i}", res["fit"], goal_label(res["goal"])
        ms = 8 if i == 0 else 5
        rows = [r for r in _positive(res["table"], "b_simple") if math.isfinite(r["b_simple"])]
        if rows:
            b = np.array([r["batch_size"] for r in rows], dtype=float) * _shift(i, len(results))
            v = np.array([r["b_simple"] for r in rows])
            low = np.array([r["b_simple_low"] for r in rows])
            high = np.array([r["b_simple_high"] for r in rows])
            has = np.isfinite(low)
            open_low, open_high = has & (low <= 0), has & ~np.isfinite(high)
            # An open end drawn to 3x (or a third) of the value, with a triangle: a log axis holds no 0 or inf.
            lo = np.where(has, np.where(open_low, v / 3, low), v)
            hi = np.where(has, np.where(open_high, v * 3, high), v)
            ax.errorbar(b, v, yerr=[v - lo, hi - v], fmt="s", color=colour, ms=ms, capsize=3,
                        label=f"B_simple before {name}, bar: {level:.0%} interval")
            for mask, y, marker, label in ((open_high, hi, "^", "interval open above (|G|^2 <= 0 in resamples)"),
                                           (open_low, lo, "v", "interval reaches <= 0")):
                if mask.any():
                    ax.plot(b[mask], y[mask], marker, color=colour, ms=6, label=None if label in once else label)
                    once.add(label)
        else:  # no number before the goal at any batch size: the legend says why
            notes = sorted({r["b_simple_note"].split(" (")[0] for r in res["table"]} - {""})
            ax.plot([], [], " ", label=f"B_simple before {name}: {', '.join(notes) or 'none'}")
        init = [r for r in _positive(res["table"], "b_simple_init") if math.isfinite(r["b_simple_init"])]
        if init:
            ax.plot([r["batch_size"] * _shift(i, len(results)) for r in init], [r["b_simple_init"] for r in init],
                    "o", mfc="none", mec=colour, ms=ms, label=f"B_simple at initialisation (best for {name})")
        if res["verdict"][0] != "not measured" and math.isfinite(f["b_crit"]):
            ax.axhline(f["b_crit"], color=colour, lw=1, label=f"B_crit for {name} (fit, {res['verdict'][0]}) "
                                                              f"{fmt(f['b_crit'], 3)}")
            low, high = f["b_crit_low"], f["b_crit_high"]
            if math.isfinite(low) and math.isfinite(high) and low > 0:
                ax.axhspan(low, high, color=colour, alpha=0.15, label=f"B_crit for {name}: {level:.0%} interval")
        else:
            ax.plot([], [], " ", label=f"B_crit for {name}: {res['verdict'][0]}")
    _batch_axis(ax, sizes, unit)
    _log_y(ax)  # after batch_axis, which turns minor ticks off
    ax.set_ylabel(f"B_simple, B_crit ({unit})")
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig
