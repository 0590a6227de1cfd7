"""analysis/steps.py: interpolation and censoring, the fit, the regime rule, B_simple, and that the early-stop rule
changes no result (simulated trials from tests/steps_sim.py)."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import steps as A
from steps_sim import GOAL, LOOSE, curve_rows, replay, simulate
from study.engine import steps as S
from study.workload import Goal

BATCHES = [16 * 2**k for k in range(9)]  # 16 .. 4096


def test_interpolation_is_exact_for_a_metric_linear_in_log_steps():
    for true in (123.4, 1000.0, 5555.5):
        steps, seconds, k = A.steps_to_result(curve_rows(true, 32, budget=20_000), GOAL)
        assert steps == pytest.approx(true, rel=1e-9)
        assert seconds == pytest.approx(true * 32 * 1e-4, rel=0.06)  # linear in steps between two evaluations
        assert k is not None


def test_interpolation_rule_by_hand():
    rows = [{"step": 0, "val_error": 0.9}, {"step": 100, "val_error": 0.2, "train_seconds": 1.0},
            {"step": 400, "val_error": 0.0, "train_seconds": 4.0}]
    # Half way from 0.2 to 0.0: half way from log 100 to log 400, i.e. step 200.
    goal = Goal("val_error", 0.1, higher_is_better=False)
    steps, seconds, k = A.steps_to_result(rows, goal)
    assert (steps, seconds, k) == (pytest.approx(200.0), pytest.approx(2.0), 2)
    # Reached at the first evaluation after step 0: that evaluation, no interpolation toward step 0.
    assert A.steps_to_result(rows[:1] + rows[2:], goal)[0] == 400
    equal = Goal("val_error", 0.2, higher_is_better=False)
    assert A.steps_to_result(rows, equal)[0] == 100  # equal to the goal counts as reached
    higher = [{"step": 10, "val_auc": 0.5}, {"step": 1000, "val_auc": 0.9}]
    assert A.steps_to_result(higher, Goal("val_auc", 0.7, higher_is_better=True))[0] == \
        pytest.approx(100.0)


def test_censored_and_diverged_trials_count_as_not_reached():
    censored = curve_rows(50_000, 16, budget=1000)
    assert A.steps_to_result(censored, GOAL) == (math.inf, pytest.approx(math.nan, nan_ok=True), None)
    nan_rows = [{"step": 10, "val_error": math.nan}, {"step": 20, "val_error": math.nan}]
    assert A.steps_to_result(nan_rows, GOAL)[0] == math.inf
    trials = [{"batch_size": 16, "config": i, "lr": 0.1 * (i + 1), "momentum": None,
               "rows": curve_rows(t, 16, budget=1000)} for i, t in enumerate([math.inf, 400.0, 5000.0])]
    (row,) = A.per_batch(trials, GOAL, n_boot=200)
    assert row["steps"] == pytest.approx(400.0) and row["reached"] == 1 and row["best_config"] == 1
    assert row["examples"] == pytest.approx(400 * 16)
    none = A.per_batch(trials[:1], GOAL, n_boot=50)[0]
    assert none["steps"] == math.inf and none["best_config"] is None and not none["edge"]


def test_exact_curve_is_recovered_exactly():
    s_min, e_min = A.fit_curve(BATCHES, [500 + 32000 / b for b in BATCHES])
    assert (s_min, e_min) == (pytest.approx(500), pytest.approx(32000))
    assert math.isnan(A.fit_curve([16], [100])[0])


@pytest.mark.parametrize("seed", range(10))
def test_fit_recovers_s_min_e_min_and_b_crit_from_noisy_curves(seed):
    s_min, e_min = 800.0, 800.0 * 256  # B_crit = 256, inside the 16..4096 sweep
    # 3 % log-normal noise per batch size and 1.5 % per configuration; the best of 16 Sobol points also lies a
    # varying distance from the best rate. (At 5 % noise B_crit came within 15 % over ten seeds, not 10 %.)
    trials, sobol = simulate(s_min, e_min, BATCHES, configs=16, budget=200_000, noise=0.03, seed=seed)
    for t in trials:
        t["status"] = "n/a"
    (result,) = A.analyse(trials, [GOAL], ranges={"lr": (1e-3, 1.0)}, n_boot=200, seed=seed)
    fit = result["fit"]
    assert fit["b_crit"] == pytest.approx(256, rel=0.10)
    assert fit["s_min"] == pytest.approx(s_min, rel=0.10) and fit["e_min"] == pytest.approx(e_min, rel=0.10)
    assert fit["b_crit_low"] <= 256 <= fit["b_crit_high"]
    assert fit["r2_log"] > 0.98 and fit["max_rel_residual"] < 0.2
    regimes = {r["batch_size"]: r["regime"] for r in result["regimes"]}
    assert regimes[16] == A.PERFECT and regimes[4096 // 2] == A.MAXIMAL


def test_regime_rule():
    assert A.regime(1.95, 1.7, 2.1) == A.PERFECT
    assert A.regime(1.85, 0.9, 3.0) == A.PERFECT  # the point estimate decides at the ends
    assert A.regime(1.7, 1.5, 2.05) == A.PERFECT  # in between: the interval holds 2, not 1
    assert A.regime(1.5, 1.3, 1.7) == A.DIMINISHING
    assert A.regime(1.05, 0.9, 1.2) == A.MAXIMAL
    assert A.regime(1.08, 0.5, 2.5) == A.MAXIMAL
    assert A.regime(1.2, 0.95, 1.4) == A.MAXIMAL  # in between: holds 1, not 2
    assert A.regime(1.5, 0.9, 2.2) == A.UNDETERMINED  # holds both
    assert A.regime(math.nan, math.nan, math.nan) == A.UNDETERMINED
    assert A.regime(1.5, math.nan, math.nan) == A.UNDETERMINED  # in between without an interval
    assert A.regime(1.5, 1.3, math.nan) == A.UNDETERMINED
    assert A.regime(1.9, math.nan, math.nan) == A.PERFECT  # the point estimate still decides at the ends


def test_edge_of_the_search_space_is_flagged():
    lrs = [0.001, 0.01, 0.1, 0.9]
    def trial(i, steps):
        return {"batch_size": 16, "config": i, "lr": lrs[i], "momentum": None, "rows": curve_rows(steps, 16, 10**5)}
    best_largest = A.per_batch([trial(i, s) for i, s in enumerate([900, 800, 700, 100])], GOAL, n_boot=50)[0]
    assert best_largest["edge"] and best_largest["edge_lr"]
    inner = A.per_batch([trial(i, s) for i, s in enumerate([900, 100, 700, 800])], GOAL, {"lr": (1e-4, 10)},
                        n_boot=50)[0]
    assert not inner["edge"]
    near_end = A.per_batch([trial(i, s) for i, s in enumerate([900, 100, 700, 800])], GOAL, {"lr": (0.009, 1)},
                           n_boot=50)[0]
    assert near_end["edge"]  # 0.01 lies in the lowest quarter of log(0.009 .. 1)


def strip(result):
    """The result without what the rule may change on purpose: how many configurations reached the goal, and the
    best-of-k curves where a k-subset may miss the m fastest (the trials it stopped count as not reached there)."""
    out = []
    for goal in result:
        table = [{k: v for k, v in r.items() if k not in ("reached", "replicates", "best_of_k")} for r in goal["table"]]
        reps = [r["replicates"] for r in goal["table"]]
        out.append((goal["goal"], table, reps, goal["fit"], goal["regimes"]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_early_stop_rule_changes_no_result(seed):
    budget = 100_000
    trials, _ = simulate(600.0, 600.0 * 128, BATCHES, configs=16, budget=budget, noise=0.05, seed=seed,
                         penalty=10.0)  # steep: the worst rates never reach the goal in the budget
    free = replay(trials, budget, rule=None)
    ruled = replay(trials, budget, rule=S.ResultRule(configs=16))
    stopped = [t for t in ruled if t["status"] == S.STOPPED_BY_RULE]
    assert len(stopped) >= 20  # the rule did stop trials: the comparison below tests something
    steps_free = sum(t["rows"][-1]["step"] for t in free)
    steps_ruled = sum(t["rows"][-1]["step"] for t in ruled)
    assert steps_ruled < 0.85 * steps_free  # and it saved training (25-30 % in these simulations)
    kwargs = dict(ranges={"lr": (1e-3, 1.0)}, n_boot=500, seed=seed)
    a, b = (A.analyse(x, [GOAL, LOOSE], **kwargs) for x in (free, ruled))
    for (goal_a, table_a, reps_a, fit_a, reg_a), (goal_b, table_b, reps_b, fit_b, reg_b) in zip(strip(a), strip(b)):
        assert goal_a == goal_b and table_a == table_b and fit_a == fit_b and reg_a == reg_b
        assert all(np.array_equal(x, y) for x, y in zip(reps_a, reps_b))
    m = S.configs_to_wait_for(16)
    for goal_a, goal_b in zip(a, b):
        for row_a, row_b in zip(goal_a["table"], goal_b["table"]):
            # A k-subset with k > N - m holds one of the m fastest, which the rule never stops.
            assert row_a["best_of_k"]["expected"][16 - m:] == row_b["best_of_k"]["expected"][16 - m:]


def test_write_section_writes_every_table_and_figure(tmp_path):
    from analysis.steps_figures import write_section

    budget = 100_000
    trials, _ = simulate(600.0, 600.0 * 128, BATCHES, configs=16, budget=budget, noise=0.05, seed=0, penalty=10.0)
    ruled = replay(trials, budget, rule=S.ResultRule(configs=16))
    text = write_section(ruled, [GOAL, LOOSE], tmp_path, ranges={"lr": (1e-3, 1.0)}, n_boot=200)
    names = ["steps_to_result", "examples_to_result", "best_of_k", "b_crit_vs_b_simple", "best_lr", "lr_map",
             "seconds_to_result"]
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and f"({name}.png)" in text
    per_batch = pd.read_csv(tmp_path / "steps_per_batch.csv")
    assert len(per_batch) == 2 * len(BATCHES) and set(per_batch["regime"].dropna()) <= set(
        [A.PERFECT, A.DIMINISHING, A.MAXIMAL, A.UNDETERMINED])
    fit = pd.read_csv(tmp_path / "steps_fit.csv")
    assert len(fit) == 2 and (fit["b_crit_low"] <= fit["b_crit"]).all() and (fit["b_crit"] <= fit["b_crit_high"]).all()
    best_k = pd.read_csv(tmp_path / "steps_best_of_k.csv")
    assert len(best_k) == 2 * len(BATCHES) * 16 and (best_k["p_reached"].between(0, 1)).all()
    trials_csv = pd.read_csv(tmp_path / "steps_trials.csv")
    assert len(trials_csv) == len(ruled) and "stopped_by_rule" in set(trials_csv["status"])
    assert "m = 5 of the 16 configurations" in text and "perfect scaling if r >= 1.8," in text
    again = tmp_path / "again"
    assert write_section(ruled, [GOAL, LOOSE], again, ranges={"lr": (1e-3, 1.0)}, n_boot=200) == text
    assert (again / "steps_fit.csv").read_bytes() == (tmp_path / "steps_fit.csv").read_bytes()


def test_an_out_of_memory_trial_is_a_failure_left_out_of_the_per_batch_results():
    from types import SimpleNamespace

    from analysis.steps_report import status_of
    from study import metrics as M

    oom = SimpleNamespace(dirname="t", rows=[{"step": 0, "val_error": 0.9, M.STATUS: M.STATUS_RUNNING},
                                            {M.EPOCH: 0, M.STATUS: M.STATUS_OOM, M.MESSAGE: "out of memory"}])
    assert status_of(oom, {}) == M.STATUS_OOM
    rows = lambda reach: [{"step": s, "val_error": 0.01 if s >= reach else 0.9} for s in (0, 10, 20, 40)]  # noqa: E731
    trials = [{"trial_id": "a", "batch_size": 16, "config": 0, "lr": 0.1, "momentum": None, "status": S.REACHED,
               "rows": rows(40)},
              {"trial_id": "b", "batch_size": 16, "config": 1, "lr": 0.2, "momentum": None, "status": M.STATUS_OOM,
               "rows": rows(10)}]  # rows of an out-of-memory trial never count, whatever they say
    (row,) = A.per_batch(trials, GOAL, n_boot=20)
    assert row["configs"] == 1 and row["best_config"] == 0 and row["steps"] > 20
