"""B_simple in the steps report (analysis/steps_noise.py): at initialisation apart, and over the window before the
goal, pooled as a ratio of means, with its probes and a bootstrap interval. Synthetic rows with a known answer."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import steps_noise as N
from study import metrics as M
from study.engine import steps as S
from steps_sim import GOAL


def row(step, trace=math.nan, grad_sq=math.nan, probes=0, **extra):
    scale = trace / grad_sq if probes and grad_sq > 0 else math.nan
    return {"step": step, M.NOISE_TRACE: trace, M.NOISE_GRAD_SQ: grad_sq, M.NOISE_PROBES: probes,
            M.NOISE_SCALE: scale, **extra}


def probe_rows(rng, steps, truth, grad_sq=1.0, per_row=1, init=None, reached_at=None):
    """Rows on `steps`: each row the means of `per_row` probes (an int, or a function of the row's index) whose
    estimates scatter around tr(Sigma) = truth(step) * grad_sq and |G|^2 = grad_sq as the engine's do (tr(Sigma)
    with 3 degrees of freedom, |G|^2 with a 60 % spread that can go below 0). The step-0 row carries `init`
    probes when given. val_error reaches GOAL at step `reached_at`."""
    out = []
    for k, step in enumerate([0, *steps]):
        n = (init or 0) if step == 0 else (per_row(k) if callable(per_row) else per_row)
        probe_step = 0 if step == 0 else out[-1]["step"]  # the probes of a row lie in [previous step, step)
        t = truth(probe_step) * grad_sq * rng.chisquare(3, n) / 3
        g = grad_sq * (1 + 0.6 * rng.standard_normal(n))
        error = 0.01 if reached_at is not None and step >= reached_at else 0.5
        out.append(row(step, t.mean() if n else math.nan, g.mean() if n else math.nan, n, val_error=error))
    return out


def test_pooled_as_ratio_of_means_each_row_weighted_by_its_probes():
    rows = [row(10, 2.0, 1.0, 1), row(20, 8.0, 1.0, 3), row(30, 99.0, 1.0, 0), row(40)]  # 0 probes: no weight
    got = N.estimate(rows, min_probes=1)
    assert got["value"] == pytest.approx((2 + 3 * 8) / 4) and got["probes"] == 4 and got["rows"] == 2
    assert N.estimate([row(10, 2.0, 1.0, 1), row(20, 8.0, 3.0, 1)], min_probes=1)["value"] == 2.5  # not 2.33
    # Rows stored before the means: the probe-weighted mean of their noise_scale values.
    old = [{"step": 10, M.NOISE_SCALE: 2.0}, {"step": 20, M.NOISE_SCALE: math.nan}, {"step": 30, M.NOISE_SCALE: 4.0}]
    assert N.estimate(old, min_probes=1)["value"] == 3.0


def test_the_window_is_the_last_half_of_the_log_steps_before_the_goal():
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 100]
    rows = [{"step": s} for s in steps]
    # Goal first met at step 64 (row 7): probes from step 8 = 64 ** 0.5 on, i.e. rows whose interval starts >= 8.
    assert [r["step"] for r in N.window_rows(rows, 7)] == [16, 32, 64]
    assert N.window_rows(rows, 1) == []  # met at step 1: the only probes are the initialisation's
    assert N.init_rows(rows) == [rows[1]]  # no probe at step 0: the first evaluation's, from step 0 to 1
    rows[0] = row(0, 4.0, 2.0, 1)
    assert N.init_rows(rows) == [rows[0]]


def test_known_answer_window_and_initialisation_apart():
    """B_simple 3 at the initial weights, 1,000 early in training and 40 in the window before the goal: the window
    estimate holds 40 in its interval, far from both, and initialisation is reported apart, exactly."""
    rng = np.random.default_rng(0)
    steps = S.eval_steps(400)
    reached = next(s for s in steps if s >= 300)
    truth = lambda s: 3.0 if s == 0 else 1000.0 if s < 300 ** 0.5 - 1 else 40.0  # noqa: E731
    rows = probe_rows(rng, steps, truth, per_row=2, init=1, reached_at=reached)
    until = next(k for k, r in enumerate(rows) if r["val_error"] < 0.05)
    got = N.b_simple(rows, until)
    assert got["b_simple_init"] == pytest.approx(rows[0][M.NOISE_TRACE] / rows[0][M.NOISE_GRAD_SQ])
    assert got["b_simple_init_probes"] == 1
    assert got["b_simple_low"] <= 40 <= got["b_simple_high"] < 100 and 20 < got["b_simple"] < 80
    assert got["b_simple_probes"] == 2 * got["b_simple_rows"] >= 2 * 30 and got["b_simple_note"] == ""


@pytest.mark.parametrize("per_row", [1, 3, lambda k: k % 3])  # 0, 1 or 2 probes a row: NaN rows in between
def test_the_interval_covers_the_truth(per_row):
    """Over 200 synthetic trials, the 95 % interval holds the true B_simple (50) in at least 88 % of them (a
    percentile bootstrap over 18-28 clusters runs a little narrow: 0.90-0.94 over 400 trials when written)."""
    steps = S.eval_steps(120)  # the goal at step 100: its window from step 10 holds ~20 evaluations
    hits, sizes = 0, []
    for seed in range(200):
        rows = probe_rows(np.random.default_rng(seed), steps, lambda s: 50.0, per_row=per_row, reached_at=100)
        got = N.b_simple(rows, next(k for k, r in enumerate(rows) if r["step"] >= 100), seed=seed)
        hits += got["b_simple_low"] <= 50 <= got["b_simple_high"]
        sizes.append(got["b_simple_high"] / got["b_simple_low"])
    assert hits >= 0.88 * 200 and np.median(sizes) < 4  # covering, and not by being wide open


def test_a_window_without_probes_says_too_few_probes():
    rows = [row(0), row(1, 5.0, 1.0, 1), *[row(s) for s in (2, 4, 8, 16, 32)]]  # only the initialisation probe
    got = N.b_simple(rows, 6)
    assert math.isnan(got["b_simple"]) and got["b_simple_note"].startswith(N.TOO_FEW)
    assert got["b_simple_probes"] == 0 and got["b_simple_init"] == 5.0
    assert N.cell(got).startswith("too few probes (0 < 8)")
    few = [row(0), *[row(s, 5.0, 1.0, 1) for s in (1, 2, 3, 4, 5, 6)]]  # goal at 6: window from 2.4, 3 probes
    assert N.b_simple(few, 6)["b_simple_note"] == "too few probes (3 < 8)"
    assert N.b_simple(few, None)["b_simple_note"] == "goal not reached" and N.b_simple(few, None)["b_simple_init"] == 5


def test_few_evaluations_give_a_value_without_an_interval_and_noise_swamping_the_gradient_is_open_above():
    rows = [row(0), row(1), row(20, 1.0, 1.0, 4), row(50, 10.0, 1.0, 4), row(100, 10.0, 1.0, 4)]
    got = N.b_simple(rows, 4)  # the window from step 10: the rows at 50 and 100, 8 probes
    assert got["b_simple"] == 10.0 and math.isnan(got["b_simple_low"]) and "no interval" in got["b_simple_note"]
    swamped = [row(0), *[row(s, 10.0, g, 2) for s, g in zip(range(10, 110, 10), [1, -1] * 5)]]  # mean |G|^2 = 0
    got = N.b_simple(swamped, 10)
    assert got["b_simple"] == math.inf and "swamps" in got["b_simple_note"]
    mostly = [row(0), *[row(s, 10.0, g, 1) for s, g in zip(range(10, 170, 10), [3, -2.5] * 8)]]  # mean 0.25
    got = N.b_simple(mostly, 16)
    assert got["b_simple"] == pytest.approx(40) and got["b_simple_high"] == math.inf and got["b_simple_low"] > 0


def test_per_batch_and_the_csvs_carry_both_estimates(tmp_path):
    from analysis.steps_figures import write_section

    rng = np.random.default_rng(1)
    trials = []
    for i, (batch, reach) in enumerate([(8, 200), (16, 110), (32, 70), (64, 50), (128, 45), (256, 6)]):
        for c in range(2):
            rows = probe_rows(rng, S.eval_steps(300), lambda s: 10.0 * batch ** 0.5, init=1,
                              reached_at=reach * (1 + c))
            trials.append({"trial_id": f"{batch}-{c}", "batch_size": batch, "config": c, "lr": 0.1 * (c + 1),
                           "momentum": None, "status": S.REACHED, "rows": rows})
    text = write_section(trials, [GOAL], tmp_path, n_boot=50)
    table = pd.read_csv(tmp_path / "steps_per_batch.csv")
    for col in ("b_simple_init", "b_simple_init_probes", "b_simple", "b_simple_low", "b_simple_high",
                "b_simple_probes", "b_simple_rows", "b_simple_note"):
        assert col in table
    enough = table[table["batch_size"] < 256]
    truth = 10.0 * enough["batch_size"] ** 0.5
    assert ((enough["b_simple_low"] < truth * 1.3) & (truth < enough["b_simple_high"] * 1.3)).all()
    assert (enough["b_simple_probes"] >= N.MIN_PROBES).all()
    (tiny,) = table[table["batch_size"] == 256].to_dict("records")  # goal at step 6: 3 probes in its window
    assert math.isnan(tiny["b_simple"]) and tiny["b_simple_note"].startswith(N.TOO_FEW)
    (fit,) = pd.read_csv(tmp_path / "steps_fit.csv").to_dict("records")
    assert fit["b_simple_batch_sizes"] == 5 and fit["b_simple_too_few_probes"] == 1
    assert fit["b_simple_init_batch_sizes"] == 6
    assert fit["b_simple_median"] == pytest.approx(np.median(enough["b_simple"]))
    assert "too few probes (3 < 8)" in text and "1 with too few probes" in text
