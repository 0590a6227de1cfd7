"""study/engine/steps.py: the Sobol configurations and their seeds, the evaluation grid, step budgets (and the driver's budget
flags), batch sizes, per-trial limits, the rule's m and why failed trials count in its N."""

import math
from pathlib import Path

import numpy as np
import pytest

from study.engine import steps as S
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
    assert grid[-1] == budget and grid[0] == 1
    assert grid[:10] == list(range(1, min(10, budget) + 1))  # every step up to 10: evaluation k is step k there
    for a, b in zip(grid, grid[1:]):
        assert b / a <= 1.1 + 1e-12 or b == a + 1


def test_eval_grid_is_geometric_not_linear():
    grid = S.eval_steps(10_000)
    assert len(grid) == 88  # the steps 1..10, then about ln(1000) / ln(1.1) = 72, a few more for the rounding
    coarse = S.eval_steps(10_000, resolution=0.5, first=2)
    assert all(b / a <= 1.5 + 1e-12 for a, b in zip(coarse, coarse[1:])) and len(coarse) < len(grid)
    with pytest.raises(ValueError, match="resolution"):
        S.eval_steps(100, resolution=1.5)


def test_step_budgets_starve_no_batch_size_and_the_epoch_rule_stays():
    batches = [8 * 2**k for k in range(8)]  # 8 .. 1024
    epochs = S.step_budgets(batches, 8192, 2, S.EPOCHS)
    assert epochs[8] == 2048 and epochs[1024] == 16  # the starved batch size the epoch rule gave
    sqrt = S.step_budgets(batches, 8192, 2)
    assert sqrt[8] == 2048 and sqrt[32] == 1024 and sqrt[1024] == 182  # 2048 x sqrt(8 / B)
    for small, large in zip(batches, batches[1:]):
        # No faster than perfect scaling (steps halve as B doubles), no slower than constant steps.
        assert sqrt[small] / 2 <= sqrt[large] <= sqrt[small]
        assert sqrt[large] * large >= sqrt[small] * small  # so the examples never shrink
    # The floor: 100 steps where the sqrt rule would give fewer, never above the smallest batch size's budget.
    assert S.step_budgets([16, 256, 4096], 1200, 1) == {16: 75, 256: 75, 4096: 75}
    assert S.step_budgets([16, 4096], 16_000, 1) == {16: 1000, 4096: 100}
    with pytest.raises(ValueError, match="scaling"):
        S.step_budgets([16], 100, 1, "linear")


def test_budget_flags_and_the_budget_of_a_study_stored_before_the_sqrt_rule():
    from study.errors import StudyError
    from study.commands.steps_args import budgets_of, fill
    from study.commands.steps_study import parser
    from study.workload import resolve

    digits = str(Path(__file__).resolve().parents[1] / "examples" / "digits_workload.py")
    workload = resolve(digits)
    p = parser(workload)
    args = fill(p.parse_args([digits, "--batch-sizes", "16", "64", "--budget-epochs", "2"]), workload, 1200)
    assert args.budget_scaling == S.SQRT and budgets_of(args, 1200) == {16: 150, 64: 100}  # the floor of 100
    args = fill(p.parse_args([digits, "--batch-sizes", "16", "64", "--budget-epochs", "2", "--budget-scaling",
                              "epochs"]), workload, 1200)
    assert budgets_of(args, 1200) == {16: 150, 64: 38}
    args = fill(p.parse_args([digits, "--batch-sizes", "16", "64", "--budget-steps", "70"]), workload, 1200)
    assert budgets_of(args, 1200) == {16: 70, 64: 70}
    with pytest.raises(StudyError, match="--budget-scaling"):
        fill(p.parse_args([digits, "--budget-steps", "70", "--budget-scaling", "sqrt"]), workload, 1200)
    # --resume of a study whose study.json predates --budget-scaling: its trials had epochs at every batch size.
    old = p.parse_args([digits, "--batch-sizes", "16", "64", "--budget-epochs", "2"])
    old.resume = True
    assert fill(old, workload, 1200).budget_scaling == S.EPOCHS and budgets_of(old, 1200) == {16: 150, 64: 38}


def test_every_configuration_has_its_own_seed_drawn_from_the_study_seed():
    configs = S.sobol_configs(16, RANGES, seed=3, momentum=True)
    seeds = [c["seed"] for c in configs]
    assert len(set(seeds)) == 16 and all(0 <= s < 2**31 for s in seeds)
    assert seeds == [S.config_seed(3, i) for i in range(16)]
    assert [c["seed"] for c in S.sobol_configs(4, RANGES, seed=3, momentum=True)] == seeds[:4]  # not on n
    assert set(seeds).isdisjoint(c["seed"] for c in S.sobol_configs(16, RANGES, seed=4, momentum=True))


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


def test_the_infeasible_rule_waits_past_the_warmup_and_a_floor_of_steps():
    at_chance = lambda step: row(step, 0.88)  # noqa: E731
    # A small budget: the floor of 50 steps, not a quarter of 100 (25, the rule before it waited).
    small = S.TrialLimits(GOAL, budget_steps=100, chance=0.9)
    assert small.infeasible_from() == 50
    assert small.status(at_chance(49)) is None and small.status(at_chance(50)) == S.INFEASIBLE
    # A warmup of 300 steps: the learning rate is still ramping up, so wait past it, then a quarter of the rest.
    warm = S.TrialLimits(GOAL, budget_steps=1300, chance=0.9, warmup_steps=300)
    assert warm.infeasible_from() == 300 + 250
    assert warm.status(at_chance(325)) is None and warm.status(at_chance(549)) is None
    assert warm.status(at_chance(550)) == S.INFEASIBLE
    # A budget that ends before the rule may fire: censored at the budget, never infeasible.
    short = S.TrialLimits(GOAL, budget_steps=40, chance=0.9)
    assert [short.status(at_chance(s)) for s in (10, 39, 40)] == [None, None, S.CENSORED]
    with pytest.raises(ValueError, match="warmup_steps"):
        S.TrialLimits(GOAL, 100, warmup_steps=-1)


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


@pytest.mark.parametrize("failed", [0, 3, 6])
def test_failed_configurations_count_in_n_and_the_rule_changes_no_bootstrap_replicate(failed):
    """8 configurations of one batch size, `failed` of them infeasible or diverged (never reach), run in parallel
    on the evaluation grid through ResultRule; the paired bootstrap's replicates are the same with and without it."""
    from analysis.steps import bootstrap_minima, config_draws

    n, rng = 8, np.random.default_rng(failed)
    grid = S.eval_steps(5000)
    draws = config_draws(n, 20_000, seed=failed)
    m = S.configs_to_wait_for(n)
    for _ in range(20):
        true = rng.lognormal(np.log(300), 0.8, n)  # steps to result without the rule (inf: never)
        true[rng.choice(n, failed, replace=False)] = math.inf
        true[true > 5000] = math.inf  # censored at the budget
        rule, ruled = S.ResultRule(configs=n), true.copy()
        running = set(range(n))
        for step in grid:
            for c in sorted(running):
                if true[c] <= step:  # reached at this evaluation (its first at the goal)
                    rule.reached(16, str(c), step)
                    running.discard(c)
            for c in sorted(running):
                if rule.should_stop(16, step):
                    ruled[c] = math.inf
                    running.discard(c)
        if np.isfinite(true).sum() >= m:  # the rule could fire: stopped trials are slower than the m-th fastest
            assert all(true[c] > np.sort(true)[m - 1] for c in np.flatnonzero(ruled != true))
        assert np.array_equal(bootstrap_minima(true, draws, m), bootstrap_minima(ruled, draws, m))
    # The share of resamples that miss the m fastest does not depend on which others failed: (1 - m/n)^n, below the
    # limit. Taking m from the 8 - 3 that did not fail would give 4, and a share of (1 - 4/8)^8, above it.
    limit = 0.05 / 2 / 10
    share = lambda k: np.isin(draws, np.arange(k)).any(axis=1).__invert__().mean()  # noqa: E731
    assert share(m) <= limit and abs(share(m) - (1 - m / n) ** n) < 0.001
    if failed == 3:
        assert S.configs_to_wait_for(n - failed) == 4 and share(4) > limit
