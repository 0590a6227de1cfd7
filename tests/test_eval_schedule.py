"""The coarse evaluation schedule's rule (study.engine.eval_schedule) replayed on stored full-grid curves of real trials:
it gives the full grid's steps to result except where the rule says it cannot, and those cases are counted.

tests/data/steps-curves/mnist-cnn.json: 12 mnist-cnn steps trials on real MNIST (batch 16, 64, 256 x nesterov lr
0.003-0.1, momentum 0.9, 2,000 validation images), each evaluated at every step of the fine grid to its budget
(an unreachable goal); its README says how they were made. Each curve is replayed at goals from 20 % to 1.5 %
validation error.
"""

import json
import math
from pathlib import Path

import pytest

from study import metrics as M
from study.engine.eval_schedule import (NEAR_SHARE, bounds, coarse_steps, first_reached, first_reached_coarse,
                                        settled)
from study.engine.steps import STEP, TrialLimits, eval_steps
from study.workload import Goal

CURVES = Path(__file__).parent / "data" / "steps-curves" / "mnist-cnn.json"
GOALS = (0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015)


def test_the_coarse_grid_is_a_subset_of_the_fine_one_about_a_factor_apart():
    fine = eval_steps(1000)
    coarse = coarse_steps(fine, 2.0)
    assert set(coarse) <= set(fine) and coarse[0] == 1 and coarse[-1] == 1000
    assert all(b >= 2 * a for a, b in zip(coarse, coarse[1:-1]))
    assert len(coarse) < len(fine) / 4
    with pytest.raises(ValueError):
        coarse_steps(fine, 1.0)


def test_a_goal_met_for_a_moment_and_lost_is_the_one_difference():
    steps = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    coarse = [0, 1, 2, 4, 8]
    reached = lambda v: v <= 0.1  # noqa: E731
    dips = [0.9, 0.5, 0.4, 0.09, 0.3, 0.2, 0.08, 0.07, 0.05]  # reached at 3, back above at 4
    assert first_reached(steps, dips, reached) == 3
    assert first_reached_coarse(steps, dips, reached, coarse) == (6, 4 + 3, 8)  # 5 coarse at 0-8, then 5, 6
    steady = [0.9, 0.5, 0.4, 0.3, 0.2, 0.09, 0.08, 0.07, 0.05]
    assert first_reached(steps, steady, reached) == first_reached_coarse(steps, steady, reached, coarse)[0] == 5


def test_replayed_on_real_curves_the_rule_gives_the_full_grids_answer_but_where_it_says():
    curves = json.loads(CURVES.read_text())
    same = differ = reached = 0
    evaluations = {"fine": 0, "coarse": 0}
    for curve in curves:
        steps = curve["steps"]
        assert steps == [0, *eval_steps(curve["budget"])], "stored on the fine grid"
        coarse = [0, *coarse_steps(steps[1:], 2.0)]
        for goal in GOALS:
            values = curve["val_error"]
            full = first_reached(steps, values, lambda v: v <= goal)
            got, n, _ = first_reached_coarse(steps, values, lambda v: v <= goal, coarse)
            evaluations["fine"] += steps.index(full) + 1 if full is not None else len(steps)
            evaluations["coarse"] += n
            reached += full is not None
            if got == full:
                same += 1
                continue
            differ += 1
            # The rule's one exception: reached at a fine step, back above the goal at a later coarse step.
            # (A later fine step, or none before the budget: the trial then ends censored.)
            assert full is not None and (got is None or full < got)
            later = got if got is not None else float("inf")
            assert any(full < c < later and values[steps.index(c)] > goal for c in coarse), (curve["lr"], goal)
    print(f"replayed {same + differ} (curve, goal) pairs, {reached} reached: {differ} differ (goal met and lost "
          f"between coarse evaluations); evaluations {evaluations['coarse']} against {evaluations['fine']}")
    assert reached >= 60 and differ <= 0.1 * reached  # what docs/steps-to-result.md reports, measured here
    assert evaluations["coarse"] < 0.5 * evaluations["fine"]


def test_refining_near_the_goal_gives_the_same_steps_and_trains_less_past_them():
    """Refining (every fine step evaluated once a screen says the goal is near) replayed on the same curves: the
    same steps to result as the coarse rule, or the full grid's where the coarse rule missed a goal met and lost;
    less training past the result. The screen's share of an evaluation is modelled from the curve: for an error
    rate (terms in [0, 1]) at value v > goal, the lower bound passes the goal after about goal / v of the split."""
    curves = json.loads(CURVES.read_text())
    near = {goal: (lambda v, goal=goal: goal / v > NEAR_SHARE) for goal in GOALS}
    past = {"coarse": 0, "refined": 0}
    cost = {"coarse": 0.0, "refined": 0.0, "fine": 0.0}  # evaluations, in whole splits, screened ones by share
    agree = closer = 0
    for curve in curves:
        steps, values = curve["steps"], curve["val_error"]
        coarse = [0, *coarse_steps(steps[1:], 2.0)]
        for goal in GOALS:
            reached = lambda v, goal=goal: v <= goal  # noqa: E731
            full = first_reached(steps, values, reached)
            got, _, trained = first_reached_coarse(steps, values, reached, coarse)
            fine_got, _, fine_trained = first_reached_coarse(steps, values, reached, coarse, near[goal])
            if full is None:
                continue
            if fine_got == got:
                agree += 1
            else:  # refining evaluated a step the coarse rule skipped: a goal met and lost, seen in time
                assert fine_got == full and (got is None or got > full), (curve["lr"], goal)
                closer += 1
            past["coarse"] += trained - full
            past["refined"] += fine_trained - full
            for name, rule in (("coarse", None), ("refined", near[goal])):
                cost[name] += sum(min(1.0, goal / values[steps.index(s)]) for s in evaluated(steps, values, reached,
                                                                                           coarse, rule))
            cost["fine"] += steps.index(full) + 1
    print(f"refined: {agree} same as coarse, {closer} nearer the full grid; steps trained past the result "
          f"{past['refined']} against {past['coarse']}; screened evaluations {cost['refined']:.0f} / "
          f"{cost['coarse']:.0f} splits (every fine step whole: {cost['fine']})")
    assert agree + closer >= 60 and past["refined"] < 0.5 * past["coarse"]
    assert cost["refined"] < 0.5 * cost["fine"]


def evaluated(steps, values, reached, coarse, near) -> list[int]:
    """The steps first_reached_coarse evaluates (screened or whole), in order."""
    out, refined, previous = [], False, 0
    for s in steps:
        if s not in coarse and not refined:
            continue
        out.append(s)
        if reached(values[steps.index(s)]):
            back = [t for t in steps if previous < t < s]
            hit = next((t for t in back if reached(values[steps.index(t)])), None)
            return out + (back[:back.index(hit) + 1] if hit is not None else back)
        previous, refined = s, refined or (near is not None and near(values[steps.index(s)]))
    return out


def test_the_screen_stops_only_where_no_value_in_its_bounds_could_end_the_trial():
    goal = Goal("val_error", 0.05, False)
    limits = TrialLimits(goal=goal, budget_steps=1000)
    row = {STEP: 100, M.TRAIN_LOSS: 0.3, M.DIVERGED: False}
    declared = {"val_error": (0, 1)}
    # 2,000 examples: 150 errors in the first 500 put the whole split's error at 0.075 or more: out of reach.
    lows, highs = bounds({"val_error": 150.0}, 500, 2000, declared)
    assert lows["val_error"] == 0.075 and highs["val_error"] == (150 + 1500) / 2000
    assert settled(limits.status, row, lows, highs)
    # 90 errors in the first 500: the rest could be right, 0.045 <= 0.05: the evaluation must go on.
    assert not settled(limits.status, row, *bounds({"val_error": 90.0}, 500, 2000, declared))
    # A metric without bounds: any value is possible until the last example, so it is never screened.
    assert not settled(limits.status, row, *bounds({"val_error": 1999.0}, 1999, 2000, {}))
    # At the budget every value ends the trial (censored or reached): never screened.
    assert not settled(limits.status, {**row, STEP: 1000}, lows, highs)
    # Past the chance rule's start a value near chance would end it as infeasible: screened only when the upper
    # bound keeps it clear of chance, which a loss (no upper bound) never does.
    late = TrialLimits(goal=goal, budget_steps=1000, chance=0.9)
    assert late.infeasible_from() <= 500
    row = {**row, STEP: 500}
    assert settled(late.status, row, *bounds({"val_error": 150.0}, 1900, 2000, declared))
    assert not settled(late.status, row, lows, highs)  # the upper bound 0.825 is at chance level
    loss = TrialLimits(goal=Goal("val_loss", 0.1, False), budget_steps=1000, chance=2.3)
    assert not settled(loss.status, row, *bounds({"val_loss": 900.0}, 1000, 2000, {"val_loss": (0, math.inf)}))
