"""Steps to result, the fit S(B) = S_min + E_min / B and the critical batch size, from stored evaluation rows.

Library code: the steps-to-result report calls `write_section(trials, goals, out_dir)`. Pure functions of the
stored rows (numpy only); the same inputs and seed give the same numbers. A trial is a dict:
    {"trial_id", "batch_size", "config", "lr", "momentum" (None without momentum),
     "status" (study.steps.STATUSES, or study.metrics.STATUS_OOM: left out of every table),
     "rows": [{"step", "examples", "train_seconds", <metric>, "noise_scale", ...} per evaluation, by step]}
A goal is {"metric", "value", "higher_is_better"} as in workload.json.

Rules, stated once (the report repeats them):
- Steps to result of a trial: the first evaluation that reaches the goal, interpolated between it and the previous
  evaluation linearly in (log step, metric); the first evaluation itself when there is no earlier one after step 0
  or the earlier metric is not finite. A trial that never reached it (censored, stopped, diverged, infeasible)
  has infinite steps. Training seconds to result: linear in steps at the same point.
- Per batch size: the minimum over its configurations, and a percentile bootstrap interval over configurations.
  A resample that holds none of the m fastest configurations (m = study.steps.configs_to_wait_for) counts as the
  m-th fastest's steps, a lower bound on its minimum: exactly what the early-stop rule keeps, so the analysis is
  the same with and without it. Such resamples are a share (1 - m/N)^N, a tenth of the interval's tail.
- The fit: S(B) = S_min + E_min / B by least squares on relative residuals (weights 1/S^2: each batch size
  counts by its relative error, as the bootstrap spread of a minimum grows with it), S_min, E_min >= 0 (scipy's
  nnls); B_crit = E_min / S_min. Intervals: the same fit on each bootstrap replicate (one resample per batch size).
- Regime at B from r = S(B) / S(2B) and its bootstrap interval: perfect scaling if r >= 1.8, maximal data
  parallelism if r <= 1.1; in between, perfect scaling if the interval holds 2 but not 1, maximal data parallelism
  if it holds 1 but not 2, undetermined if it holds both or there is no interval, else diminishing returns.
"""

import math

import numpy as np

from study import metrics as M
from study.steps import STEP, configs_to_wait_for, reached

EXAMPLES = "examples"  # training examples seen when the row was evaluated
NOISE_TRACE = "noise_trace"  # if stored: mean tr(Sigma) estimate behind the row's noise_scale
NOISE_GRAD_SQ = "noise_grad_sq"  # if stored: mean |G|^2 estimate behind it

PERFECT, DIMINISHING, MAXIMAL, UNDETERMINED = ("perfect scaling", "diminishing returns",
                                              "maximal data parallelism", "undetermined")


def steps_to_result(rows: list[dict], goal: dict) -> tuple[float, float, int | None]:
    """(steps, train_seconds, index of the first reaching row) at the goal; (inf, nan, None) if never reached."""
    for k, row in enumerate(rows):
        value = float(row.get(goal["metric"], math.nan))
        if not reached(value, goal):
            continue
        s2, sec2 = float(row[STEP]), float(row.get(M.TRAIN_SECONDS, math.nan))
        prev = rows[k - 1] if k > 0 else None
        v1 = float(prev.get(goal["metric"], math.nan)) if prev else math.nan
        if prev is None or prev[STEP] <= 0 or not math.isfinite(v1) or not math.isfinite(value) or v1 == value:
            return s2, sec2, k
        s1, sec1 = float(prev[STEP]), float(prev.get(M.TRAIN_SECONDS, math.nan))
        t = (goal["value"] - v1) / (value - v1)  # in (0, 1]: v1 missed the goal, value met it
        steps = math.exp(math.log(s1) + t * (math.log(s2) - math.log(s1)))
        return steps, sec1 + (steps - s1) / (s2 - s1) * (sec2 - sec1), k
    return math.inf, math.nan, None


def bootstrap_minima(steps: np.ndarray, n_boot: int, rng: np.random.Generator, level: float,
                     safety: float) -> np.ndarray:
    """n_boot resampled minima of one batch size's steps (inf: not reached), each capped at the m-th fastest."""
    n = len(steps)
    mins = steps[rng.integers(0, n, size=(n_boot, n))].min(axis=1)
    m = configs_to_wait_for(n, level, safety)
    ordered = np.sort(steps)
    if np.isfinite(ordered[m - 1]):
        mins = np.minimum(mins, ordered[m - 1])
    return mins


def interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval from order statistics (no interpolation, so an infinite replicate stays infinite)."""
    a = (1 - level) / 2
    return float(np.quantile(values, a, method="lower")), float(np.quantile(values, 1 - a, method="higher"))


def _on_edge(value, sampled: list, bounds, n: int) -> bool:
    """Whether a sampled value lies in the outer 1/n of its log range, or is the largest or smallest sampled."""
    if value is None:
        return False
    if value in (min(sampled), max(sampled)):
        return True
    if bounds is None:
        return False
    lo, hi = (math.log10(b) for b in bounds)
    u = (math.log10(value) - lo) / (hi - lo) if hi > lo else 0.5
    return u < 1 / n or u > 1 - 1 / n


def per_batch(trials: list[dict], goal: dict, ranges: dict | None = None, level: float = 0.95,
              safety: float = 10.0, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One dict per batch size: the best configuration, its steps/examples/seconds to result, the interval, the
    edge flag and `replicates` (n_boot bootstrap minima, for the fit and the regimes). Sorted by batch size."""
    out = []
    # An out-of-memory trial measured nothing about its configuration: it is a failure, not a censored trial.
    trials = [t for t in trials if t.get("status") != M.STATUS_OOM]
    for batch in sorted({t["batch_size"] for t in trials}):
        group = sorted((t for t in trials if t["batch_size"] == batch), key=lambda t: t["config"])
        results = [steps_to_result(t["rows"], goal) for t in group]
        steps = np.array([r[0] for r in results])
        rng = np.random.default_rng([seed, batch])
        reps = bootstrap_minima(steps, n_boot, rng, level, safety)
        low, high = interval(reps, level)
        best = int(np.argmin(steps))
        found = bool(np.isfinite(steps[best]))
        b = group[best]
        lrs = [t["lr"] for t in group]
        moms = [1 - t["momentum"] for t in group if t.get("momentum") is not None]
        edge_lr = _on_edge(b["lr"], lrs, (ranges or {}).get("lr"), len(group))
        edge_mom = b.get("momentum") is not None and _on_edge(1 - b["momentum"], moms,
                                                              (ranges or {}).get("one_minus_momentum"), len(group))
        out.append({
            "batch_size": batch, "configs": len(group), "reached": int(np.isfinite(steps).sum()),
            "steps": float(steps[best]), "low": low, "high": high,
            "examples": float(steps[best]) * batch, "seconds": results[best][1] if found else math.nan,
            "best_config": b["config"] if found else None, "best_lr": b["lr"] if found else math.nan,
            "best_momentum": b.get("momentum") if found else None,
            "edge": bool(found and (edge_lr or edge_mom)), "edge_lr": bool(found and edge_lr),
            "edge_momentum": bool(found and edge_mom), "b_simple": b_simple(b["rows"], results[best][2]) if found
            else math.nan, "replicates": reps,
        })
    return out


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
    """The fit over a per_batch table (batch sizes whose best reached the goal), with bootstrap intervals and its
    goodness: R^2 of log S against log of the fitted curve, and the largest relative residual."""
    used = [r for r in table if math.isfinite(r["steps"])]
    b = np.array([r["batch_size"] for r in used], dtype=float)
    s = np.array([r["steps"] for r in used])
    s_min, e_min = fit_curve(b, s)
    out = {"batch_sizes": len(used), "s_min": s_min, "e_min": e_min, "b_crit": _b_crit(s_min, e_min)}
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
    for name, values in (("s_min", [x[0] for x in boots]), ("e_min", [x[1] for x in boots]),
                         ("b_crit", [_b_crit(*x) for x in boots])):
        v = np.array([x for x in values if not math.isnan(x)])
        out[f"{name}_low"], out[f"{name}_high"] = interval(v, level) if len(v) else (math.nan, math.nan)
    return out


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
        out.append({"batch_size": batch, "ratio": ratio, "low": low, "high": high,
                    "regime": regime(ratio, low, high)})
    return out


def b_simple(rows: list[dict], until: int | None) -> float:
    """B_simple of a trial over its evaluations after step 0 up to row `until` (the first to reach the goal; its
    noise_scale covers the steps before it). Numerator and denominator averaged separately when the rows carry
    them (noise_trace, noise_grad_sq: each row's means over its own probes), each row weighted by its number of
    probes (noise_probes; 1 where not stored), so that the result is the mean over every probe of the span;
    else the mean of the finite per-row noise_scale values."""
    if until is None:
        return math.nan
    span = [r for r in rows[: until + 1] if r[STEP] > 0]
    pairs = [(_probes(r), r[NOISE_TRACE], r[NOISE_GRAD_SQ]) for r in span if NOISE_TRACE in r and NOISE_GRAD_SQ in r
             and math.isfinite(r[NOISE_TRACE]) and math.isfinite(r[NOISE_GRAD_SQ])]
    pairs = [p for p in pairs if p[0] > 0]
    if pairs:
        grad_sq = sum(p[0] * p[2] for p in pairs)
        return sum(p[0] * p[1] for p in pairs) / grad_sq if grad_sq > 0 else math.nan
    values = [float(r.get(M.NOISE_SCALE, math.nan)) for r in span]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _probes(row: dict) -> float:
    """The number of probes behind a row's noise means (1 where the row does not say)."""
    try:
        value = float(row.get(M.NOISE_PROBES, 1))
    except (TypeError, ValueError):
        return 1.0
    return value if math.isfinite(value) else 1.0


def analyse(trials: list[dict], goals: list[dict], ranges: dict | None = None, level: float = 0.95,
            safety: float = 10.0, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per goal: {"goal", "table" (per_batch), "fit", "regimes"}: everything the report prints."""
    if not trials:
        raise ValueError("no trials to analyse: the study stored none")
    out = []
    for goal in goals:
        table = per_batch(trials, goal, ranges, level, safety, n_boot, seed)
        out.append({"goal": goal, "table": table, "fit": fit(table, level), "regimes": regimes(table, level)})
    return out
