"""B_simple in a steps-to-result study: at initialisation, and over the window before the goal was reached.

Library code for analysis/steps.py. Each evaluation row of a steps trial carries its noise probes' pooled means
since the previous evaluation (study.metrics: NOISE_TRACE, the mean tr(Sigma) estimate; NOISE_GRAD_SQ, the mean
|G|^2 estimate; NOISE_PROBES, how many probes; NOISE_SCALE, their ratio). A row may hold any number of probes,
0 among them (its means NaN or absent); a step-0 row may hold the probe at the initial weights.

- At initialisation: the step-0 row's probes where it has any; else the first evaluation after step 0, whose
  probes were taken in steps [0, its step) (at step 0 exactly on the grid from step 1). Kept apart: every
  configuration of a seed starts from the same weights, and B_simple there says nothing about the goal.
- Before the goal: the rows whose probes lie in the last WINDOW of the log steps before the trial's first
  evaluation at the goal, step s_goal: a row's interval [previous step, its step) must start at or after
  s_goal ** (1 - WINDOW) (with WINDOW = 1/2, from sqrt(s_goal) on). On the geometric evaluation grid that is a
  fixed share of the evaluations before the goal at every batch size, close enough to the crossing to describe
  the training the goal measures, and wide enough to hold several probes; it never holds the initialisation.
- Pooled as McCandlish et al. (2018, Appendix A.1) average an estimator: the ratio of the probe-weighted means,
  sum(p T) / sum(p G). Rows without the two means (studies stored before them) fall back to the probe-weighted
  mean of their NOISE_SCALE values.
- Interval: a percentile bootstrap over the window's rows (each row a cluster of its probes, resampled whole, so
  each counts by its probes through the ratio of sums). Why not the delta method: the |G|^2 estimate is a
  difference of two noisy terms and its mean can come near 0, where the ratio's distribution is long-tailed above
  and a symmetric interval would reach below 0; a resample whose pooled |G|^2 is <= 0 counts as B_simple = inf
  (noise swamps the gradient), so the upper end is then open. Percentile intervals from few clusters run a little
  narrow (the spread is that of n, not n - 1); tests/test_steps_noise.py measures the coverage.
- Fewer than MIN_PROBES probes in the window: "too few probes", no number; fewer than MIN_ROWS rows with probes:
  the number without an interval.
"""

import math

import numpy as np

from study import metrics as M
from study.engine.steps import STEP

WINDOW = 0.5  # the share of log steps before the goal's evaluation that B_simple is taken over
MIN_PROBES = 8  # fewer in the window: "too few probes" (a probe's tr(Sigma) has 3 degrees of freedom)
MIN_ROWS = 5  # fewer rows with probes in the window: the value without an interval
N_BOOT = 1000
TOO_FEW = "too few probes"


def probes(row: dict) -> float:
    """The number of probes behind a row's noise means: NOISE_PROBES, 1 where an older row does not say, 0 where it
    is not a finite number."""
    value = row.get(M.NOISE_PROBES, 1)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _finite(row: dict, key: str) -> bool:
    v = row.get(key)
    return isinstance(v, (int, float)) and math.isfinite(v)


def _usable(row: dict) -> bool:
    """Whether a row carries an estimate: probes, and both means or (an older row) a finite NOISE_SCALE."""
    return probes(row) > 0 and ((_finite(row, M.NOISE_TRACE) and _finite(row, M.NOISE_GRAD_SQ))
                                or _finite(row, M.NOISE_SCALE))


def _columns(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probes, numerator, denominator) of the rows that carry an estimate: their mean tr(Sigma) and mean |G|^2
    (pooled as a ratio of sums); rows stored before those means: their NOISE_SCALE values over 1 (so the ratio of
    sums is their probe-weighted mean)."""
    with_probes = [r for r in rows if probes(r) > 0]
    pairs = [r for r in with_probes if _finite(r, M.NOISE_TRACE) and _finite(r, M.NOISE_GRAD_SQ)]
    if pairs or any(M.NOISE_TRACE in r for r in with_probes):
        return (np.array([probes(r) for r in pairs]), np.array([r[M.NOISE_TRACE] for r in pairs], float),
                np.array([r[M.NOISE_GRAD_SQ] for r in pairs], float))
    scales = [r for r in with_probes if _finite(r, M.NOISE_SCALE)]
    return (np.array([probes(r) for r in scales]), np.array([r[M.NOISE_SCALE] for r in scales], float),
            np.ones(len(scales)))


def _ratio(p: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Ratio of probe-weighted sums along the last axis; inf where the pooled |G|^2 is <= 0."""
    top, bottom = (p * num).sum(-1), (p * den).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), math.inf)


def estimate(rows: list[dict], level: float = 0.95, seed: int = 0, min_probes: int = MIN_PROBES,
             n_boot: int = N_BOOT) -> dict:
    """B_simple over the rows: {"value", "low", "high", "probes", "rows" (with probes), "note"}. value NaN with
    note "too few probes" under min_probes; low/high NaN (note says why) under MIN_ROWS rows; high inf when
    resamples pool a |G|^2 <= 0."""
    p, num, den = _columns(rows)
    out = {"value": math.nan, "low": math.nan, "high": math.nan, "probes": int(p.sum()), "rows": len(p),
           "note": ""}
    if p.sum() < min_probes:
        out["note"] = f"{TOO_FEW} ({int(p.sum())} < {min_probes})"
        return out
    value = float(_ratio(p, num, den))
    if not math.isfinite(value):
        out["note"] = "pooled |G|^2 <= 0: gradient noise swamps the gradient"
        out["value"] = math.inf
        return out
    out["value"] = value
    if len(p) < MIN_ROWS:
        out["note"] = f"no interval: {len(p)} evaluations with probes (< {MIN_ROWS})"
        return out
    draws = np.random.default_rng(seed).integers(0, len(p), size=(n_boot, len(p)))
    reps = _ratio(p[draws], num[draws], den[draws])
    a = (1 - level) / 2
    out["low"] = float(np.quantile(reps, a, method="lower"))
    out["high"] = float(np.quantile(reps, 1 - a, method="higher"))
    return out


def init_rows(rows: list[dict]) -> list[dict]:
    """The rows holding the probes at initialisation (module docstring)."""
    zero = [r for r in rows if r[STEP] <= 0 and _usable(r)]
    if zero:
        return zero
    after = [r for r in rows if r[STEP] > 0]
    return after[:1]


def window_rows(rows: list[dict], until: int, window: float = WINDOW) -> list[dict]:
    """The rows up to row `until` (the first at the goal) whose probes were taken at or after s_goal ** (1 -
    window): a row's interval starts at the previous row's step."""
    start = float(rows[until][STEP]) ** (1 - window)
    return [r for k, r in enumerate(rows[: until + 1]) if k > 0 and r[STEP] > 0 and rows[k - 1][STEP] >= start]


def b_simple(rows: list[dict], until: int | None, level: float = 0.95, seed: int = 0) -> dict:
    """A trial's B_simple at initialisation and over the window before the goal (row `until` is its first at the
    goal; None: never reached, the window is empty): a dict of the columns steps_per_batch.csv carries."""
    init = estimate(init_rows(rows), level, seed, min_probes=1)
    window = estimate(window_rows(rows, until) if until is not None else [], level, seed)
    return {"b_simple_init": init["value"], "b_simple_init_probes": init["probes"],
            "b_simple": window["value"], "b_simple_low": window["low"], "b_simple_high": window["high"],
            "b_simple_probes": window["probes"], "b_simple_rows": window["rows"],
            "b_simple_from": float(rows[until][STEP]) ** (1 - WINDOW) if until is not None else math.nan,
            "b_simple_note": window["note"] if until is not None else "goal not reached"}


def cell(r: dict, digits: int = 3) -> str:
    """B_simple before the goal as a table shows it: value [interval] (probes), or why there is none."""
    from analysis.figures import fmt

    v = r["b_simple"]
    if not (isinstance(v, float) and (math.isfinite(v) or v == math.inf)):
        return r["b_simple_note"] or "–"
    if v == math.inf:
        return f"inf ({r['b_simple_note']}; {r['b_simple_probes']} probes)"
    if math.isfinite(r["b_simple_low"]):
        high = fmt(r["b_simple_high"], digits) if math.isfinite(r["b_simple_high"]) else "open above"
        return f"{fmt(v, digits)} [{fmt(r['b_simple_low'], digits)}, {high}] ({r['b_simple_probes']} probes)"
    return f"{fmt(v, digits)} ({r['b_simple_probes']} probes; {r['b_simple_note']})"
