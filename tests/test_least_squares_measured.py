"""The engine's steps-to-result trial on the least-squares workload against its exact answers (study/workloads/
least_squares.py): what the measurement gets right, and where a single run's steps to result cannot be the exact
curve's (docs/steps-to-result.md, "A check with a known answer").

The exact recursion gives the expected loss E[L_t] of SGD at every step. (1) The engine's loss curve, averaged over
seeds, is that curve: a check of the trial's SGD, batching, learning rate and evaluation with nothing fitted.
(2) Steps to result are a first passage of one run, the best over configurations: at batch sizes where the step
is noise-dominated (below B_crit) one run dips under the goal before its expectation does and the best of N picks
the luckiest, so the measurement lies below the exact curve; above B_crit, where runs barely differ, it is the exact
curve. The trials run without Ray (study.engine.steps_trial.run_steps_trial), as Tune runs them.
"""

import math

import numpy as np
import pytest
import torch

from study.engine.config import TrainConfig
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL, REACHED, config_seed
from study.engine.steps_trial import run_steps_trial
from study.workload import resolve
from study.workloads import least_squares as ls

OPTIONS = dict(dim=100, noise=0.5, train_size=16_384, val_size=8192, data_seed=0)  # one epoch covers every trial


@pytest.fixture(scope="module")
def problem():
    workload = resolve("least-squares")
    h, w_star = ls.problem(OPTIONS)
    return workload, workload.load(OPTIONS), h, w_star


def curve(problem, batch: int, lr: float, budget: int, seed: int, goal: float = 0.0) -> list[dict]:
    workload, splits, _, _ = problem
    cfg = TrainConfig(workload="least-squares", batch_size=batch, optimizer="sgd", lr=lr, momentum=0.0, seed=seed,
                      noise_scale=False, options=OPTIONS)
    extra = {GOAL: {"metric": "val_loss", "value": goal, "higher_is_better": False}, BUDGET: budget, CHANCE: None,
             CONFIG: 0}
    rows = []
    run_steps_trial(cfg, extra, workload, splits, torch.device("cpu"), lambda row, state: rows.append(row))
    return rows


@pytest.mark.parametrize("batch, lr, budget", [(4, 0.3, 240), (16, 0.5, 120), (256, 1.5, 50)])
def test_the_mean_loss_curve_over_seeds_is_the_exact_expected_loss(problem, batch, lr, budget):
    torch.set_num_threads(1)
    runs = [curve(problem, batch, lr, budget, seed) for seed in range(8)]
    steps = [r["step"] for r in runs[0]]
    losses = np.array([[r["val_loss"] for r in rows] for rows in runs])
    exact = ls.expected_losses(problem[3] ** 2, problem[2], OPTIONS["noise"] ** 2, batch, lr, budget)[steps]
    # The validation sample's own error (the same 8,192 examples in every run) is what step 0 shows: ~0.5 %.
    assert losses[0, 0] == pytest.approx(exact[0], rel=0.02)
    mean, se = losses.mean(0)[1:], losses.std(0, ddof=1)[1:] / math.sqrt(len(runs))
    assert np.all(np.abs(mean - exact[1:]) <= 4 * se + 0.02 * exact[1:]), np.round(mean / exact[1:] - 1, 3)
    assert exact[-1] < 0.6 * exact[0]  # the check covers the fall, not a plateau


def best_steps(problem, batch: int, goal: float, lrs) -> float:
    """Steps to result at a batch size: the fewest over configurations, each its own seed as in a steps study."""
    best = math.inf
    for index, lr in enumerate(lrs):
        rows = curve(problem, batch, float(lr), 400, config_seed(0, index), goal)
        if rows[-1]["status"] == REACHED:
            best = min(best, rows[-1]["step"])
    return best


def test_steps_to_result_is_the_exact_curve_above_b_crit_and_below_it_under_noise(problem):
    """Goal 0.2 (the floor is 0.125, the start ~2.7): the exact curve's B_crit is ~30 over batch sizes 8-512."""
    torch.set_num_threads(1)
    _, _, h, w_star = problem
    lrs = np.geomspace(0.3, 1.95, 12)  # the exact best rates lie in 0.65-1.85 over these batch sizes
    for batch in (16, 256):
        exact, _ = ls.best_steps_to_goal(w_star**2, h, OPTIONS["noise"] ** 2, batch, 0.2, 2000)
        measured = best_steps(problem, batch, 0.2, lrs)
        if batch > 30:
            assert measured == pytest.approx(exact, rel=0.15)
        else:  # the luckiest of 12 runs (docs/steps-to-result.md: 10-17 % below at batch 8-32 through Tune)
            assert 0.6 * exact < measured < exact
