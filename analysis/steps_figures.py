"""The steps-to-result report section: CSV tables, seven figures and the text that states each rule.

    write_section(trials, goals, out_dir, ranges=..., level=0.95, safety=10, n_boot=1000, seed=0, unit=...) -> markdown

`trials` and `goals` as in analysis/steps.py. The tables and PNGs go to out_dir; the markdown that shows them is
returned for the caller's report.md. A pure function of its inputs: a second call writes the same files.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import steps as A
from analysis import steps_noise as N
from analysis.figures import ReportWriter, fmt
from analysis.steps_plots import (best_of_k_figure, floor_step, goal_label, lr_figure, map_figure,
                                  noise_figure, seconds_figure, steps_figure)
from analysis.steps_verdict import verdict
from study.engine.steps import configs_to_wait_for, strictest
from study.workload import Goal


def _steps_cell(r) -> str:
    """Steps to result of a batch size as the table shows it: a bound where it is one."""
    if math.isfinite(r["steps"]):
        if r["evaluation"] == 0:
            return "0 (met before training)"
        if r["evaluation"] == 1:  # the first evaluation after step 0: anywhere from 0 to it
            return f"<= {fmt(r['steps'], 4)} (first evaluation)"
        return fmt(r["steps"], 4) + (f" (evaluation {r['evaluation']})" if r["floor"] else "")
    if math.isfinite(r["lower_bound"]):
        return f"> {fmt(r['lower_bound'], 4)} (not reached in the budget)"
    return "not reached (every configuration diverged or was infeasible)"


def _flags(r) -> str:
    flags = [f"edge: {r['edge_why']}"] if r["edge"] else []
    flags += ["first evaluations"] if r["floor"] else []
    return "; ".join(flags + (["budget-limited"] if r["budget_limited"] else []))


def _estimate(f, name) -> str:
    value, low, high = f[name], f[f"{name}_low"], f[f"{name}_high"]
    if not math.isfinite(value):
        return "–"
    if value <= 0:
        return "0 (at its bound)"
    return f"{fmt(value, 3)} [{fmt(low, 3)}, {fmt(high, 3) if math.isfinite(high) else 'open above'}]"


def b_simple_summary(table) -> dict:
    """steps_fit.csv's B_simple columns: median, min and max over the batch sizes of B_simple before the goal (those
    whose window held enough probes) and at initialisation, and how many batch sizes had too few probes."""
    out = {}
    for key in ("b_simple", "b_simple_init"):
        values = [r[key] for r in table if not math.isnan(r[key])]  # inf (|G|^2 <= 0) counts: it is the largest
        out.update({f"{key}_median": float(np.median(values)) if values else math.nan,
                    f"{key}_min": min(values, default=math.nan), f"{key}_max": max(values, default=math.nan),
                    f"{key}_batch_sizes": len(values)})
    out["b_simple_too_few_probes"] = sum(r["b_simple_note"].startswith(N.TOO_FEW) for r in table)
    return out


def _noise(value: float, why: str = " (|G|^2 <= 0)") -> str:
    """A B_simple for a table: inf where the pooled |G|^2 estimate was <= 0 (noise swamps the gradient)."""
    return "inf" + why if value == math.inf else fmt(value, 3)


def _spread(noise: dict, key: str) -> str:
    n = noise[f"{key}_batch_sizes"]
    if not n:
        return f"{N.TOO_FEW} at every batch size" if key == "b_simple" else "–"
    text = (f"{_noise(noise[f'{key}_median'], '')} ({_noise(noise[f'{key}_min'], '')}-"
            f"{_noise(noise[f'{key}_max'], '')}), "
            f"{n} batch size{'s' if n != 1 else ''}")
    few = noise["b_simple_too_few_probes"] if key == "b_simple" else 0
    return text + (f"; {few} with {N.TOO_FEW}" if few else "")


def _best_k_shown(best_k: pd.DataFrame) -> pd.DataFrame:
    if best_k.empty:
        return best_k
    n = int(best_k["k"].max())
    ks = sorted({2 ** j for j in range(n.bit_length()) if 2 ** j <= n} | {n})
    chosen = best_k[best_k["k"].isin(ks)]
    wide = chosen.pivot_table(index=["goal", "batch_size"], columns="k", values="expected_steps", sort=False)
    wide.columns = [f"k={k}" for k in wide.columns]
    return wide.reset_index().map(lambda v: "inf" if isinstance(v, float) and math.isinf(v) else v)


def _tables(trials, results, level):
    per_batch, shown, best_k, fits, fits_shown, rows = [], [], [], [], [], []
    for res in results:
        label = goal_label(res["goal"])
        regimes = {r["batch_size"]: r for r in res["regimes"]}
        for r in res["table"]:
            g = regimes.get(r["batch_size"], {})
            row = {"goal": label, **{k: v for k, v in r.items() if k not in ("replicates", "best_of_k")},
                   "ratio_to_2B": g.get("ratio", math.nan), "ratio_low": g.get("low", math.nan),
                   "ratio_high": g.get("high", math.nan), "regime": g.get("regime", ""),
                   "regime_note": g.get("note", "")}
            per_batch.append(row)
            shown.append({"goal": label, "batch_size": r["batch_size"], "configs": r["configs"],
                          "reached": r["reached"], "steps": _steps_cell(r),
                          f"{level:.0%} of resampled bests <=": fmt(r["upper"], 4) if math.isfinite(r["upper"])
                          else "not all reach", "best_lr": r["best_lr"], "flags": _flags(r),
                          "B_simple at init": _noise(r["b_simple_init"]),
                          f"B_simple before the goal [{level:.0%}]": N.cell(r), "S(B)/S(2B)": row["ratio_to_2B"],
                          "regime": row["regime"] + (f" ({row['regime_note']})" if row["regime_note"] else "")})
            curve = r["best_of_k"]
            best_k += [{"goal": label, "batch_size": r["batch_size"], "k": k, "expected_steps": e, "p_reached": p}
                       for k, e, p in zip(curve["k"], curve["expected"], curve["p_reached"])]
        f, (status, cell, _) = res["fit"], res["verdict"]
        noise = b_simple_summary(res["table"])
        fits.append({"goal": label, "status": status, "b_crit_text": cell,
                     **{k: (" ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v) for k, v in f.items()},
                     **noise})
        fits_shown.append({
            "goal": label, "batch sizes fitted": f["batch_sizes"], "S_min": _estimate(f, "s_min"),
            "E_min": _estimate(f, "e_min"), f"B_crit [{level:.0%}]": cell, "B_crit is": status,
            "bracket": (f"[{fmt(f['bracket'][0], 4)}, {fmt(f['bracket'][1], 4)}]"
                        if f["bracket"][0] <= f["bracket"][1] else "–"),  # sizes spanning under 4x bracket nothing
            "leave-one-out": (f"{fmt(f['loo_low'], 3)} to {fmt(f['loo_high'], 3)}" if math.isfinite(f["loo_low"])
                              else "–"),
            "R^2 (log)": f["r2_log"], "failed replicates": f"{f['replicates_failed']} of {f['replicates']}",
            "B_simple before the goal, median (min-max)": _spread(noise, "b_simple"),
            "B_simple at init, median (min-max)": _spread(noise, "b_simple_init")})
    for t in trials:
        row = {k: t.get(k) for k in ("trial_id", "batch_size", "config", "lr", "momentum", "status")}
        row["last_step"] = t["rows"][-1]["step"] if t["rows"] else math.nan
        for res in results:
            row[f"steps {goal_label(res['goal'])}"] = A.steps_to_result(t["rows"], res["goal"])[0]
        rows.append(row)
    order = pd.DataFrame(rows).sort_values(["batch_size", "config"], kind="stable")
    return ((pd.DataFrame(per_batch), pd.DataFrame(shown)), pd.DataFrame(best_k),
            (pd.DataFrame(fits), pd.DataFrame(fits_shown)), order)


def write_section(trials: list[dict], goals: list[Goal], out_dir, ranges: dict | None = None, level: float = 0.95,
                  safety: float = 10.0, n_boot: int = 1000, seed: int = 0, writer: ReportWriter | None = None,
                  unit: str | None = None) -> str:
    """Tables and figures into out_dir; returns the section's markdown. writer: a report to add the section to
    (its folder is then out_dir's place; python -m analysis.report passes its own). unit: what the workload's
    examples are, for the axes ("images"; None: "examples", true of any workload and never wrong for a table)."""
    unit = unit or "examples"
    results = A.analyse(trials, goals, ranges, level, safety, n_boot, seed)
    for res in results:
        res["verdict"] = verdict(res["fit"], level)
    report = writer if writer is not None else ReportWriter(Path(out_dir))
    n = max(sum(1 for t in trials if t["batch_size"] == b) for b in {t["batch_size"] for t in trials})
    m = configs_to_wait_for(n, level, safety)
    pct, floor = f"{level:.0%}", floor_step(trials)
    report.heading("Steps to result")
    report.text(
        f"Per batch size, the fewest steps over its configurations at which the validation metric reached each goal "
        f"(Shallue et al. 2019). A trial's steps to result: its first evaluation at the goal, interpolated "
        "between it and the previous evaluation linearly in (log step, metric); trials that never reached a goal "
        "(censored at the step budget, stopped by the rule, diverged, infeasible) count as not reached.",
        f"How much the best depends on which configurations were drawn: a paired bootstrap over configurations "
        f"({n_boot} resamples, seed {seed}): each resample draws N of the study's configuration indices with "
        f"replacement, the same draw for every batch size (they share their Sobol points). Per batch size it is "
        f"shown one-sided: {pct} of the resampled bests are at or below the bound (a resampled best is never below "
        f"the best, so the interval's lower end would be the best itself). It says how far the best could move "
        f"with another draw of N configurations, not where the best of a larger search would lie: see best of k.",
        f"Early stop that cannot change the result: once m = {m} of the {n} configurations of a batch size reached "
        f"the strictest goal, any trial of that batch size past the m-th smallest of their steps is stopped. It is "
        f"slower than m configurations, so it is the minimum of no bootstrap resample holding one of them; a "
        f"resample holding none (probability (1 - m/N)^N = {(1 - m / n) ** n:.2g}, under a tenth of the interval's "
        f"tail) counts as the m-th fastest's steps, with or without the rule. Infeasible and diverged configurations "
        f"count in N: the bootstrap draws them like any other.",
        "Flags. *Edge*: the best configuration's learning rate, 1 - momentum or lr / (1 - momentum) is the largest "
        "or smallest sampled or lies in the outer 1/N of the sampled log range (the range was too narrow there), "
        "or a neighbour in lr / (1 - momentum) diverged or was infeasible (the best rate may be cut off by "
        f"instability). *First evaluations*: the best reached the goal within its first {A.FLOOR_EVALUATIONS} "
        f"evaluations (up to step {fmt(floor, 4)}, the floor; the grid resolves no finer than one step, and so "
        "early the start-up of training, not the batch size, sets the steps): such batch sizes are "
        "left out of the fit and call no regime. *Budget-limited*: the best took more than half the budget, so "
        "configurations slower than it were cut off. A batch size none of whose configurations reached the goal "
        "is kept as a lower bound: above its budget.",
    )
    (per_batch, per_batch_shown), best_k, (fits, fits_shown), trial_rows = _tables(trials, results, level)
    report.table("steps_per_batch", per_batch, "Steps to result per batch size and goal (best configuration)",
                 shown=per_batch_shown)
    report.figure("steps_to_result", steps_figure(results, False, floor, level, unit),
                  f"Steps to result vs batch size: the best configuration, its bar up to the {pct} bound of the "
                  "resampled bests (a triangle: open above), flagged points (a downward triangle: met at the first "
                  "evaluation, so at most that step), batch sizes that never reached the goal as arrows up from their "
                  "budget, the floor (the first evaluations, not fitted), perfect scaling "
                  "from the smallest fitted batch (dotted) and the fit S_min + E_min / B (solid)")
    report.figure("examples_to_result", steps_figure(results, True, floor, level, unit),
                  "Examples to result (steps x batch size); the fit is S_min B + E_min, the floor its step x B")
    report.table("steps_best_of_k", best_k, "Best of k: the expected fewest steps over k of the N configurations "
                 "and the chance that the best of k reaches the goal (shown: the expected steps at k = 1, 2, 4, ... "
                 "and N; infinite while some k-subset holds no configuration that reached)",
                 shown=_best_k_shown(best_k))
    report.figure("best_of_k", best_of_k_figure(results),
                  "Best of k (Shallue et al. 2019): the expected fewest steps to result over k configurations drawn "
                  "at random from the N (exact, from order statistics; not reached counts as infinite, so a line "
                  "starts once every k-subset holds a configuration that reached), and the chance that the best of "
                  "k reaches the goal at all. Trials stopped by the rule count as not reached, so where it stopped "
                  "some, the small-k end of these curves is pessimistic")
    report.heading("The critical batch size", 3)
    report.text(
        "Fit S(B) = S_min + E_min / B (McCandlish et al. 2018) by least squares on relative residuals (weights "
        "1/S^2), S_min and E_min kept >= 0, over the batch sizes whose best configuration reached the goal after "
        f"its first {A.FLOOR_EVALUATIONS} evaluations; B_crit = E_min / S_min. Intervals: the fit repeated on every "
        "paired bootstrap replicate (replicates with fewer than two batch sizes at the goal give no fit and are "
        "counted). Goodness: R^2 of log S against the log of the curve. B_crit is *measured* inside the bracket "
        "[2 x smallest, largest / 2] of the fitted batch sizes, *extrapolated* outside it, *not measured* when "
        "S_min or E_min is fitted at 0 or R^2 < 0; leave-one-out refits it without each batch size in turn.",
        "Regime at B from r = S(B) / S(2B) and its interval from the same paired replicates: perfect scaling if "
        "r >= 1.8, maximal data parallelism if r <= 1.1; in between, perfect scaling if the interval holds 2 but "
        "not 1, maximal data parallelism if it holds 1 but not 2, undetermined if it holds both, otherwise "
        "diminishing returns; undetermined where B or 2B reached the goal within the first evaluations.",
    )
    report.table("steps_fit", fits, "Fit per goal: S_min, E_min, B_crit with intervals, what B_crit is, the bracket, "
                 "leave-one-out, how well it fits, and B_simple over the batch sizes beside B_crit", shown=fits_shown)
    report.bullets(f"{goal_label(res['goal'])}: " + " ".join(res["verdict"][2] or ["no flag."]) for res in results)
    report.text(
        "B_simple beside B_crit: the gradient noise scale measured in the same runs by probes at fixed weights, for "
        "each batch size's best configuration, in two places. *Before the goal*: over the evaluations whose probes "
        f"lie in the last {N.WINDOW:.0%} of the log steps up to its first evaluation at the goal (from step "
        f"s_goal^{1 - N.WINDOW:g} on), pooled as the ratio of the probes' mean tr(Sigma) to their mean |G|^2 "
        f"(McCandlish et al. 2018, Appendix A.1), with the number of probes and a {pct} percentile bootstrap over "
        "those evaluations (each resampled with all its probes; a resample whose pooled |G|^2 is <= 0 counts as "
        f"unbounded, so the interval is then open above); \"{N.TOO_FEW}\" where the window holds fewer than "
        f"{N.MIN_PROBES}, no interval where fewer than {N.MIN_ROWS} evaluations hold probes. *At initialisation*: "
        "the probes at the initial weights (the step-0 evaluation's, else the first evaluation's), apart: they "
        "describe the untrained model, not the training the goal measures. McCandlish et al. predict B_crit ~ "
        "B_noise averaged over training, B_simple standing in for B_noise.")
    report.figure("b_crit_vs_b_simple", noise_figure(results, level, unit),
                  f"B_crit from the fit (line; band: its {pct} interval; left out when not measured) and B_simple of "
                  f"each batch size's best configuration before the goal (filled, bar: its {pct} interval) and at "
                  "initialisation (open); batch sizes with too few probes before the goal show only the latter")
    report.figure("best_lr", lr_figure(results, unit),
                  "Best learning rate vs batch size, with linear and square-root scaling from the smallest batch")
    strict = next(r for r in results if r["goal"] == strictest(goals))
    report.figure("lr_map", map_figure(trials, strict, unit),
                  f"Every configuration by batch size and learning rate, by status (strictest goal "
                  f"{goal_label(strict['goal'])}); circled: the best per batch size there")
    report.figure("seconds_to_result", seconds_figure(results, unit),
                  "Measured training seconds to result of each batch size's best configuration")
    counts = pd.crosstab(trial_rows["batch_size"], trial_rows["status"]).reset_index()
    report.table("steps_trials", trial_rows, "Every trial (in the CSV): status, last evaluated step, steps to each "
                 "goal; shown: trials per status and batch size", shown=counts)
    return "\n".join(report.lines)
