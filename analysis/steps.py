"""Steps to result, the fit S(B) = S_min + E_min / B and the critical batch size, from stored evaluation rows.

Library code: the steps-to-result report calls `write_section(trials, goals, out_dir)`. Pure functions of the
stored rows (numpy only); the same inputs and seed give the same numbers. A trial is a dict:
    {"trial_id", "batch_size", "config", "lr", "momentum" (None without momentum),
     "status" (study.engine.steps.STATUSES, or study.metrics.STATUS_OOM: left out of every table),
     "budget" (optional: its step budget; else its last evaluated step),
     "rows": [{"step", "examples", "train_seconds", <metric>, "noise_scale", ...} per evaluation, by step]}
A goal is a study.workload.Goal (read from study.json with Goal.from_dict).

Rules, stated once (the report repeats them):
- Steps to result of a trial: the first evaluation that reaches the goal, interpolated between it and the previous
  evaluation linearly in (log step, metric); the first evaluation itself when there is no earlier one after step 0
  or the earlier metric is not finite. A trial that never reached it (censored, stopped, diverged, infeasible)
  has infinite steps. Training seconds to result: linear in steps at the same point.
- Per batch size: the minimum over its configurations, and the paired bootstrap over configurations: each replicate
  draws N of the study's configuration indices with replacement, the same draw for every batch size. Reported per
  batch size as a one-sided bound, `level` of the resampled minima are at most it (a resampled minimum is never
  below the minimum). A resample that holds none of the m fastest configurations (m =
  study.engine.steps.configs_to_wait_for) counts as the m-th fastest's steps, a lower bound on its minimum: exactly what
  the early-stop rule keeps, so the analysis is the same with and without it. Such resamples are a share
  (1 - m/N)^N, a tenth of the interval's tail. A batch size none of whose configurations reached the goal keeps
  its budget as a lower bound; one whose best is above half its budget is budget-limited; one whose best reached
  the goal at one of its first FLOOR_EVALUATIONS evaluations is on the floor: left out of the fit and the regimes.
- The fit: S(B) = S_min + E_min / B by least squares on relative residuals (weights 1/S^2: each batch size
  counts by its relative error, as the bootstrap spread of a minimum grows with it), S_min, E_min >= 0 (scipy's
  nnls); B_crit = E_min / S_min. Intervals: the same fit on each paired bootstrap replicate; replicates with fewer
  than two batch sizes at the goal give no fit and are counted. Checked: the bracket [2 x smallest, largest / 2]
  of the fitted batch sizes, and B_crit refitted without each batch size (analysis/steps_verdict.py words it).
- Regime at B from r = S(B) / S(2B) and its bootstrap interval: perfect scaling if r >= 1.8, maximal data
  parallelism if r <= 1.1; in between, perfect scaling if the interval holds 2 but not 1, maximal data parallelism
  if it holds 1 but not 2, undetermined if it holds both or there is no interval, else diminishing returns;
  undetermined where B or 2B is on the floor.
- B_simple of the best configuration (of the first, where none reached the goal): at initialisation, and over the
  window before its first evaluation at the goal, with its probes and a bootstrap interval (analysis/steps_noise.py).
"""

import math

import numpy as np

from analysis.steps_configs import best_of_k, edges
from analysis.steps_noise import b_simple
from study import metrics as M
from study.engine.steps import DIVERGED, INFEASIBLE, STEP, configs_to_wait_for, eval_steps
from study.workload import Goal

# A best configuration that reached the goal at one of its first ten evaluations after step 0 sits on the floor
# under steps to result: steps 1 to 10 on the grid from step 1 (study.engine.steps.eval_steps), where whole steps
# resolve no better than 10 % and the start-up of training, not the batch size, sets the steps; steps 10 to 19 on the
# grid from step 10 of studies stored before it, where nothing below the first evaluation is measured. S(B) there
# cannot show how much further a larger batch would cut it.
FLOOR_EVALUATIONS = 10

PERFECT, DIMINISHING, MAXIMAL, UNDETERMINED = ("perfect scaling", "diminishing returns",
                                              "maximal data parallelism", "undetermined")


def steps_to_result(rows: list[dict], goal: Goal) -> tuple[float, float, int | None]:
    """(steps, train_seconds, index of the first reaching row) at the goal; (inf, nan, None) if never reached."""
    for k, row in enumerate(rows):
        value = float(row.get(goal.metric, math.nan))
        if not goal.reached(value):
            continue
        s2, sec2 = float(row[STEP]), float(row.get(M.TRAIN_SECONDS, math.nan))
        prev = rows[k - 1] if k > 0 else None
        v1 = float(prev.get(goal.metric, math.nan)) if prev else math.nan
        if prev is None or prev[STEP] <= 0 or not math.isfinite(v1) or not math.isfinite(value) or v1 == value:
            return s2, sec2, k
        s1, sec1 = float(prev[STEP]), float(prev.get(M.TRAIN_SECONDS, math.nan))
        t = (goal.value - v1) / (value - v1)  # in (0, 1]: v1 missed the goal, value met it
        steps = math.exp(math.log(s1) + t * (math.log(s2) - math.log(s1)))
        return steps, sec1 + (steps - s1) / (s2 - s1) * (sec2 - sec1), k
    return math.inf, math.nan, None


def config_draws(n_configs: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_configs) positions into the study's sorted configuration indices: one resample of configurations
    per replicate, shared by every batch size (the same Sobol point is trained at each, so a good or bad point
    moves every batch size's minimum together; resampling them independently would ignore that)."""
    return np.random.default_rng(seed).integers(0, n_configs, size=(n_boot, n_configs))


def bootstrap_minima(steps: np.ndarray, draws: np.ndarray, m: int) -> np.ndarray:
    """The n_boot resampled minima of one batch size: steps[j] for the j-th configuration of the study (inf: not
    reached or not run at this batch size), draws from config_draws; each capped at the m-th fastest."""
    mins = steps[draws].min(axis=1)
    ordered = np.sort(steps)
    if np.isfinite(ordered[m - 1]):
        mins = np.minimum(mins, ordered[m - 1])
    return mins


def interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval from order statistics (no interpolation, so an infinite replicate stays infinite)."""
    a = (1 - level) / 2
    return float(np.quantile(values, a, method="lower")), float(np.quantile(values, 1 - a, method="higher"))


def upper(values: np.ndarray, level: float) -> float:
    """One-sided: `level` of the values are at most this. A resampled minimum is never below the minimum itself,
    so a two-sided interval of it would be one-sided in disguise."""
    return float(np.quantile(values, level, method="higher"))


def evaluation_number(rows: list[dict], k: int) -> int:
    """Which step of the trial's fine grid (study.engine.steps.eval_steps, from its first evaluated step) row k's step
    is (1: the first); 0 for a row at step 0. The grid's count, not the rows': a trial on the coarse schedule
    (study.engine.eval_schedule) evaluates only some of the fine grid's steps."""
    step = rows[k][STEP]
    if not step > 0:
        return 0
    first = min(r[STEP] for r in rows if r[STEP] > 0)
    return len(eval_steps(int(step), first=int(first)))


def floor_step(rows: list[dict]) -> float:
    """The step of the FLOOR_EVALUATIONS-th step of the trial's fine grid (10 on the grid from step 1, 19 on the
    grid from step 10 of studies stored before it); NaN for a trial with no evaluation after step 0."""
    steps = [r[STEP] for r in rows if r[STEP] > 0]
    if not steps:
        return math.nan
    first = int(min(steps))
    return float(eval_steps(first * 1000 + 1000, first=first)[FLOOR_EVALUATIONS - 1])


def per_batch(trials: list[dict], goal: Goal, ranges: dict | None = None, level: float = 0.95,
              safety: float = 10.0, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One dict per batch size: the best configuration, its steps/examples/seconds to result, the one-sided upper
    bound of the resampled minima, the flags (edge, first evaluations, budget-limited), the lower bound where no
    configuration reached the goal, and `replicates` (n_boot paired bootstrap minima, for the fit and the regimes).
    Sorted by batch size."""
    out = []
    # An out-of-memory trial measured nothing about its configuration: it is a failure, not a censored trial.
    trials = [t for t in trials if t.get("status") != M.STATUS_OOM]
    universe = sorted({t["config"] for t in trials})
    position = {c: j for j, c in enumerate(universe)}
    draws = config_draws(len(universe), n_boot, seed)
    for batch in sorted({t["batch_size"] for t in trials}):
        group = sorted((t for t in trials if t["batch_size"] == batch), key=lambda t: t["config"])
        results = [steps_to_result(t["rows"], goal) for t in group]
        steps = np.array([r[0] for r in results])
        by_config = np.full(len(universe), math.inf)
        for t, s in zip(group, steps):
            by_config[position[t["config"]]] = min(by_config[position[t["config"]]], s)
        reps = bootstrap_minima(by_config, draws, configs_to_wait_for(len(group), level, safety))
        best = int(np.argmin(steps))
        found = bool(np.isfinite(steps[best]))
        b = group[best]
        budget = max(_budget(t) for t in group)
        censored = sum(t.get("status") not in (DIVERGED, INFEASIBLE) and not math.isfinite(x)
                       for t, x in zip(group, steps))
        evaluation = evaluation_number(b["rows"], results[best][2]) if found else None
        edge = edges(b, group, ranges) if found else []
        out.append({
            "batch_size": batch, "configs": len(group), "reached": int(np.isfinite(steps).sum()),
            "steps": float(steps[best]), "upper": upper(reps, level),
            # No configuration reached the goal within its budget: S(B) is above it (if the censored ones would
            # ever get there; diverged and infeasible ones are taken not to).
            "lower_bound": float(budget) if not found and censored else math.nan,
            "budget": float(budget), "evaluation": evaluation,
            "floor": bool(found and evaluation <= FLOOR_EVALUATIONS),
            "budget_limited": bool(found and steps[best] > budget / 2),
            "examples": float(steps[best]) * batch, "seconds": results[best][1] if found else math.nan,
            "best_config": b["config"] if found else None, "best_lr": b["lr"] if found else math.nan,
            "best_momentum": b.get("momentum") if found else None,
            "edge": bool(edge), "edge_why": ", ".join(edge), "edge_lr": "lr" in edge,
            "edge_momentum": "1 - momentum" in edge,
            **b_simple(b["rows"], results[best][2] if found else None, level, seed),
            "best_of_k": best_of_k(steps), "replicates": reps,
        })
    return out


def _budget(trial: dict) -> float:
    """The trial's step budget as stored with it, else its last evaluated step (the budget if it was censored)."""
    if trial.get("budget") is not None:
        return float(trial["budget"])
    return float(trial["rows"][-1][STEP]) if trial["rows"] else math.nan


def fit_curve(batch_sizes, steps) -> tuple[float, float]:
    """(S_min, E_min) of S(B) = S_min + E_min / B, least squares on relative residuals, both >= 0. Points with
    infinite steps are left out; fewer than two finite points give (nan, nan)."""
    from scipy.optimize import nnls

    b, s = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    keep = np.isfinite(s) & (s > 0)
    if keep.sum() < 2:
        return math.nan, math.nan
    b, s = b[keep], s[keep]
    # (S_i - a - c/B_i) / S_i = 1 - a/S_i - c/(B_i S_i): an ordinary least squares in (a, c) after the scaling.
    (s_min, e_min), _ = nnls(np.column_stack([1 / s, 1 / (b * s)]), np.ones_like(s))
    return float(s_min), float(e_min)


def _b_crit(s_min: float, e_min: float) -> float:
    if not (math.isfinite(s_min) and math.isfinite(e_min)):
        return math.nan
    return e_min / s_min if s_min > 0 else math.inf


def fit(table: list[dict], level: float = 0.95) -> dict:
    """The fit over a per_batch table (batch sizes whose best reached the goal after the first evaluations), with
    bootstrap intervals, the failed replicates, its goodness (R^2 of log S against the log of the curve, the largest
    relative residual), the bracket it can measure and a leave-one-out check (analysis.steps_verdict reads them)."""
    used = [r for r in table if math.isfinite(r["steps"]) and r["steps"] > 0 and not r.get("floor")]
    b = np.array([r["batch_size"] for r in used], dtype=float)
    s = np.array([r["steps"] for r in used])
    s_min, e_min = fit_curve(b, s)
    out = {"batch_sizes": len(used), "s_min": s_min, "e_min": e_min, "b_crit": _b_crit(s_min, e_min),
           "floor_left_out": [r["batch_size"] for r in table if r.get("floor")],
           "not_reached": [r["batch_size"] for r in table if not math.isfinite(r["steps"])],
           "bracket": (2 * b.min(), b.max() / 2) if len(b) else (math.nan, math.nan)}
    if math.isfinite(s_min):
        curve = s_min + e_min / b
        log_res = np.log(s) - np.log(curve)
        spread = ((np.log(s) - np.log(s).mean()) ** 2).sum()
        out["r2_log"] = float(1 - (log_res ** 2).sum() / spread) if spread > 0 else math.nan
        out["max_rel_residual"] = float(np.abs(s / curve - 1).max())
    else:
        out["r2_log"] = out["max_rel_residual"] = math.nan
    reps = np.array([r["replicates"] for r in used]) if used else np.empty((0, 0))
    boots = [fit_curve(b, reps[:, i]) for i in range(reps.shape[1])] if used else []
    out["replicates"] = len(table[0]["replicates"]) if table else 0
    out["replicates_failed"] = sum(1 for x in boots if math.isnan(x[0])) if used else out["replicates"]
    for name, values in (("s_min", [x[0] for x in boots]), ("e_min", [x[1] for x in boots]),
                         ("b_crit", [_b_crit(*x) for x in boots])):
        v = np.array([x for x in values if not math.isnan(x)])
        out[f"{name}_low"], out[f"{name}_high"] = interval(v, level) if len(v) else (math.nan, math.nan)
    out["loo_low"], out["loo_high"], out["loo_batch"] = leave_one_out(b, s, out["b_crit"])
    return out


def leave_one_out(b: np.ndarray, s: np.ndarray, b_crit: float) -> tuple[float, float, int | None]:
    """B_crit refitted without each batch size in turn (three or more fitted): (lowest, highest, the batch size
    whose removal moves it furthest in log); NaNs where it cannot be done."""
    if len(b) < 3 or not math.isfinite(b_crit) or b_crit <= 0:
        return math.nan, math.nan, None
    values = [_b_crit(*fit_curve(np.delete(b, i), np.delete(s, i))) for i in range(len(b))]
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = [abs(math.log(v / b_crit)) if v > 0 else math.inf for v in values]
    finite = [v for v in values if not math.isnan(v)]
    return min(finite), max(finite), int(b[int(np.argmax(moved))])


def regime(ratio: float, low: float, high: float) -> str:
    """The regime at B from r = S(B) / S(2B) and its interval (rule in the module docstring)."""
    if not math.isfinite(ratio):
        return UNDETERMINED
    if ratio >= 1.8:
        return PERFECT
    if ratio <= 1.1:
        return MAXIMAL
    if math.isnan(low) or math.isnan(high):  # no interval (too few finite replicates): it holds neither 1 nor 2
        return UNDETERMINED
    holds_two, holds_one = low <= 2 <= high, low <= 1 <= high
    if holds_two and holds_one:
        return UNDETERMINED
    return PERFECT if holds_two else MAXIMAL if holds_one else DIMINISHING


def regimes(table: list[dict], level: float = 0.95) -> list[dict]:
    """Per batch size B whose double 2B is in the table: r = S(B) / S(2B), its interval and the regime."""
    by_batch = {r["batch_size"]: r for r in table}
    out = []
    for batch, row in by_batch.items():
        twice = by_batch.get(2 * batch)
        if twice is None:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = row["steps"] / twice["steps"]
            low, high = interval(row["replicates"] / twice["replicates"], level)
        # 2B never reached the goal (censored by the budget): S(B) / S(2B) = 0 says nothing about the regime.
        ratio = ratio if math.isfinite(ratio) and ratio > 0 else math.nan
        # On the grid's floor S(2B) cannot fall below the first evaluation: the ratio would read as a plateau.
        floor = row.get("floor") or twice.get("floor")
        out.append({"batch_size": batch, "ratio": ratio, "low": low, "high": high,
                    "regime": UNDETERMINED if floor else regime(ratio, low, high),
                    "note": "first evaluations" if floor else ""})
    return out


def analyse(trials: list[dict], goals: list[Goal], ranges: dict | None = None, level: float = 0.95,
            safety: float = 10.0, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per goal: {"goal", "table" (per_batch), "fit", "regimes"}: everything the report prints."""
    if not trials:
        raise ValueError("no trials to analyse: the study stored none")
    out = []
    for goal in goals:
        table = per_batch(trials, goal, ranges, level, safety, n_boot, seed)
        out.append({"goal": goal, "table": table, "fit": fit(table, level), "regimes": regimes(table, level)})
    return out
