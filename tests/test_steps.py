"""study/steps.py: the Sobol configurations, the evaluation grid, batch sizes, per-trial limits, the rule's m."""

import math

import numpy as np
import pytest

from study import steps as S
from study.workload import Goal

RANGES = {"lr": (1e-3, 1.0), "one_minus_momentum": (1e-3, 0.5)}
GOAL = Goal("val_error", 0.01, higher_is_better=False)


def test_sobol_same_points_for_the_same_seed_and_inside_the_ranges():
    a = S.sobol_configs(13, RANGES, seed=7, momentum=True)
    assert a == S.sobol_configs(13, RANGES, seed=7, momentum=True)
    assert a != S.sobol_configs(13, RANGES, seed=8, momentum=True)
    assert [c["config"] for c in a] == list(range(13))
    assert all(1e-3 <= c["lr"] <= 1.0 and 0.5 <= c["momentum"] <= 0.999 for c in a)
    # The first n points do not depend on how many are drawn (the study can add configurations later).
    assert S.sobol_configs(5, RANGES, seed=7, momentum=True) == a[:5]
    # Quasi-random: every eighth of the log-lr range holds one of the first 8 points (Sobol's balance).
    u = [(math.log10(c["lr"]) + 3) / 3 for c in S.sobol_configs(8, RANGES, seed=1, momentum=True)]
    assert sorted(int(x * 8) for x in u) == list(range(8))


def test_sobol_without_momentum_and_bad_ranges():
    configs = S.sobol_configs(4, {"lr": (0.01, 0.1)}, seed=0, momentum=False)
    assert all(c["momentum"] is None and 0.01 <= c["lr"] <= 0.1 for c in configs)
    with pytest.raises(ValueError, match="one_minus_momentum"):
        S.sobol_configs(4, {"lr": (0.01, 0.1)}, seed=0, momentum=True)
    with pytest.raises(ValueError, match="0 < low <= high"):
        S.sobol_configs(4, {"lr": (0.1, 0.01)}, seed=0, momentum=False)
    with pytest.raises(ValueError, match="positive integer"):
        S.sobol_configs(0, RANGES, seed=0, momentum=False)


@pytest.mark.parametrize("budget", [1, 7, 10, 11, 100, 12345, 10**6])
def test_eval_grid_resolves_steps_to_ten_percent(budget):
    grid = S.eval_steps(budget)
    assert grid == sorted(set(grid)) and all(isinstance(s, int) for s in grid)
    assert grid[-1] == budget and grid[0] == min(10, budget)
    for a, b in zip(grid, grid[1:]):
        assert b / a <= 1.1 + 1e-12 or b == a + 1


def test_eval_grid_is_geometric_not_linear():
    grid = S.eval_steps(10_000)
    assert len(grid) < 100  # about ln(1000) / ln(1.1) = 72, plus the single steps 10..20
    coarse = S.eval_steps(10_000, resolution=0.5, first=2)
    assert all(b / a <= 1.5 + 1e-12 for a, b in zip(coarse, coarse[1:])) and len(coarse) < len(grid)
    with pytest.raises(ValueError, match="resolution"):
        S.eval_steps(100, resolution=1.5)


def test_default_batch_sizes():
    assert S.default_batch_sizes(60000) == [16 * 2**k for k in range(12)]
    assert S.default_batch_sizes(16) == [16]
    assert S.default_batch_sizes(100, low=8) == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="fewer than the smallest"):
        S.default_batch_sizes(10)


def row(step, error, loss=0.5, **extra):
    return {"step": step, "val_error": error, "train_loss": loss, **extra}


def test_trial_limits_statuses():
    limits = S.TrialLimits(GOAL, budget_steps=1000, chance=0.9)
    assert limits.status(row(0, 0.9, math.nan)) is None  # step 0 has no training loss yet
    assert limits.status(row(100, 0.5)) is None
    assert limits.status(row(100, 0.01)) == S.REACHED
    assert limits.status(row(100, 0.5, math.nan)) == S.DIVERGED
    assert limits.status(row(100, 0.5, diverged=True)) == S.DIVERGED
    assert limits.status(row(1000, 0.02)) == S.CENSORED
    # Chance level: less than 10 % of the way from 0.9 to 0.01, checked from a quarter of the budget on.
    assert limits.status(row(200, 0.85)) is None
    assert limits.status(row(250, 0.85)) == S.INFEASIBLE
    assert limits.status(row(250, 0.79)) is None
    higher = S.TrialLimits(Goal("val_auc", 0.9, higher_is_better=True), 100, chance=0.5)
    assert higher.status({"step": 50, "val_auc": 0.52, "train_loss": 1}) == S.INFEASIBLE
    assert higher.status({"step": 50, "val_auc": 0.91, "train_loss": 1}) == S.REACHED
    with pytest.raises(ValueError, match="equals the chance level"):
        S.TrialLimits(GOAL, 100, chance=0.01)


def test_strictest_goal():
    goals = [Goal("val_error", v, higher_is_better=False) for v in (0.03, 0.01, 0.02)]
    assert S.strictest(goals).value == 0.01
    auc = [Goal("val_auc", v, higher_is_better=True) for v in (0.9, 0.95)]
    assert S.strictest(auc).value == 0.95
    with pytest.raises(ValueError, match="one metric"):
        S.strictest(goals + auc)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 32, 100, 1000])
def test_configs_to_wait_for_is_the_smallest_m_below_the_limit(n):
    m = S.configs_to_wait_for(n)
    limit = 0.025 / 10
    assert (1 - m / n) ** n <= limit
    assert m == 1 or (1 - (m - 1) / n) ** n > limit
    # The probability it bounds, checked by simulation: resamples that miss all m fastest.
    rng = np.random.default_rng(n)
    draws = rng.integers(0, n, size=(20000, n))
    assert (draws.min(axis=1) >= m).mean() <= 2 * limit + 0.002


def test_result_rule_threshold_and_the_tune_adapter():
    rule = S.ResultRule(configs=8)
    assert rule.m == 5
    for trial, step in enumerate((300, 100, 200, 500)):
        rule.reached(64, str(trial), step)
    rule.reached(64, "3", 500)  # the same trial again: still 4
    assert not rule.should_stop(64, 10_000)  # only 4 of 5 reached
    rule.reached(64, "4", 400)
    assert rule.threshold(64) == 500 and rule.should_stop(64, 501) and not rule.should_stop(64, 500)
    assert not rule.should_stop(128, 10_000)  # another batch size has its own count

    stopper = S.tune_stopper(S.ResultRule(configs=1), S.TrialLimits(GOAL, 1000))
    result = {"config": {"batch_size": 16}, **row(40, 0.5)}
    assert stopper("a", result) is False
    assert stopper("b", {"config": {"batch_size": 16}, **row(50, 0.01)}) is False  # reached: recorded
    assert stopper("b", {"config": {"batch_size": 16}, **row(50, 0.01)}) is False  # Tune's repeat
    assert stopper("a", dict(result, step=51)) is True and stopper.stopped == {"a": 51}
    assert stopper("c", {"config": {"batch_size": 32}, **row(51, 0.5)}) is False


@pytest.mark.slow
def test_tune_stopper_in_a_real_grid_stops_the_slow_configurations(local_ray, tmp_path):
    from ray import tune

    def reaching_trial(config):  # nested: pickled by value, so Ray's workers need not import this test module
        """Reports val_error on the study's grid; configuration c reaches 0.01 at step 100 (c + 1)."""
        for step in S.eval_steps(2000):
            error = 0.01 if step >= 100 * (config["config"] + 1) else 0.5
            tune.report({"step": step, "val_error": error, "train_loss": 1.0})
            if error <= 0.01:
                return

    stopper = S.tune_stopper(S.ResultRule(configs=8), S.TrialLimits(GOAL, 2000))
    results = tune.Tuner(
        reaching_trial,
        param_space={"batch_size": 16, "config": tune.grid_search(list(range(8)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),  # in config order: 0..4 reach before 5..7 start
        run_config=tune.RunConfig(storage_path=str(tmp_path), stop=stopper, verbose=0),
    ).fit()
    last = {r.config["config"]: r.metrics["step"] for r in results}
    assert all(100 * (c + 1) <= last[c] < 110 * (c + 1) for c in range(5)), (last, stopper.stopped)  # reached
    assert all(500 < last[c] < 100 * (c + 1) for c in range(5, 8))  # stopped just past the 5th fastest's step
    assert sorted(last[c] for c in range(5, 8)) == sorted(stopper.stopped.values())
