"""When a steps-to-result trial evaluates, and the rule that defines its steps to result (torch- and Ray-free).

Steps to result are resolved by the fine grid, study.engine.steps.eval_steps (every step to 10, then <= 10 % apart).
Evaluating the whole validation split at every fine step costs several times the training at small batch sizes
(on 2 CPU cores one evaluation of 2,000 MNIST images costs about as much as 25 training steps at batch 16,
benchmarks/RESULTS.md), so a trial evaluates only the coarse steps, a subset of the fine grid about `factor` apart,
and keeps the weights of the fine steps in between (study.engine.loop.fit, `keep`). When a coarse evaluation
reaches the goal, the kept fine steps since the previous coarse one are evaluated in order, and the first of them
at the goal is the trial's result:

    steps to result = the first fine step at the goal among those after the last coarse step not at the goal

It equals the full fine grid's answer (the first fine step at the goal) except when the metric reaches the goal
at a fine step and is back above it at the next coarse step: the full grid stops at that fine step, this rule
goes on to a later one, or to none before the budget (the goal was met for a moment, and lost).
tests/test_eval_schedule.py replays stored full-grid curves of real trials and counts those cases.

The screen. Where the goal's metric declares bounds (study.workload.Metric: a mean of per-example terms in
[lo, hi]), an evaluation runs through the validation split in SCREEN_PARTS chunks, in order, and after each chunk
knows the least and the most the whole split's mean can be: with the terms' sum S over the first n of N examples,

    (S + lo (N - n)) / N  <=  the split's mean  <=  (S + hi (N - n)) / N

It stops there when the trial's stop rule (study.engine.steps.TrialLimits: reached, infeasible, censored) would
let the trial go on for every value in that range, and no goal of the study (a laxer one too) would be reached:
the row is *screened*, at no goal for certain (no probability), and stores no metric value (NaN, with
study.metrics.SCREENED and EVAL_EXAMPLES). A row is reported once the next is known: when that next one reaches
the goal, the screened row is evaluated whole first (from its kept weights), so the row before the first at the
goal always has its value and the analysis interpolates between the same two values as on the full grid. So the
screen changes no steps to result: every evaluated step is still either certainly not at the goal or evaluated
whole, and the rule above holds as it stands. A metric without bounds is never screened; one without an upper
bound (a loss) is evaluated whole where its value could make the trial infeasible. (One exception: a trial
restarted from the checkpoint of a screened row cannot evaluate that row again, so if its next row is at the goal
the analysis takes that row's step without interpolating.)

Refining. The coarse grid trains past the goal up to the next coarse step, up to twice the steps. Once a screen
needs more than NEAR_SHARE of the split (the goal is near: for an error rate, below twice the goal), or an
evaluation is whole without reaching it, every kept fine step from then on is evaluated (screened) instead: the
steps a rewind would evaluate, without the training past the goal. Evaluating more steps only narrows the rule's
exception: replayed on the stored curves, all 5 goals met and lost between coarse steps then get the full grid's
answer, and the steps trained past the result fall from 4,881 to 41 (tests/test_eval_schedule.py).
"""

import math
from typing import Callable, Sequence

SCREEN_PARTS = 16  # the chunks a screened evaluation runs through (each a forward pass)
NEAR_SHARE = 0.5  # a screen that needs more of the split than this: evaluate every fine step from there on


def coarse_steps(fine: Sequence[int], factor: float = 2.0) -> list[int]:
    """The coarse subset of a fine grid: its first step, then each first fine step at least `factor` times the
    previous coarse one, and always the last (the budget)."""
    if not factor > 1:
        raise ValueError(f"the coarse grid's factor must be above 1, got {factor}")
    fine = list(fine)
    if not fine:
        return []
    coarse = [fine[0]]
    for step in fine[1:]:
        if step >= coarse[-1] * factor:
            coarse.append(step)
    if coarse[-1] != fine[-1]:
        coarse.append(fine[-1])
    return coarse


def first_reached(steps: Sequence[int], values: Sequence[float], reached: Callable[[float], bool]) -> int | None:
    """The full grid's rule: the first evaluated step whose value reaches the goal (None: none did)."""
    return next((s for s, v in zip(steps, values) if reached(v)), None)


def first_reached_coarse(steps: Sequence[int], values: Sequence[float], reached: Callable[[float], bool],
                         coarse: Sequence[int], near: Callable[[float], bool] | None = None
                         ) -> tuple[int | None, int, int]:
    """The coarse rule replayed on a full-grid curve (steps: the fine grid, values at each): (its steps to result,
    or None; the evaluations it took, the backtracked ones included; the last step it trained to). near(value): on
    a value not at the goal, True evaluates every fine step from there on (refining)."""
    value = dict(zip(steps, values))
    evaluations, previous, refined = 0, 0, False
    for c in steps if near is not None else coarse:
        if c not in value:
            break  # the curve ended (its trial stopped) before this coarse step
        if c not in coarse and not refined:
            continue
        evaluations += 1
        if reached(value[c]):
            between = [s for s in steps if previous < s < c]
            for s in between:
                evaluations += 1
                if reached(value[s]):
                    return s, evaluations, c
            return c, evaluations, c
        previous, refined = c, refined or (near is not None and near(value[c]))
    return None, evaluations, previous


def bounds(sums: dict, n: int, total: int, declared: dict) -> tuple[dict, dict]:
    """(lows, highs): each metric's least and most possible mean over `total` examples, from the sum of its
    per-example terms over the first n (sums) and its declared (lo, hi) (declared[name]; None: -inf, inf)."""
    lows, highs, rest = {}, {}, total - n
    for name, terms in sums.items():
        lo, hi = declared.get(name) or (-math.inf, math.inf)
        lows[name] = (terms + lo * rest) / total if rest else terms / total
        highs[name] = (terms + hi * rest) / total if rest else terms / total
    return lows, highs


def settled(stop: Callable[[dict], str | None], row: dict, lows: dict, highs: dict, stops_on=None) -> bool:
    """Whether `row` goes on (stop gives None, or a status outside stops_on) for its metrics at their lows and at
    their highs, hence for every value in between: stop's statuses on a value are at the goal on one side,
    infeasible on the other, going on between (study.engine.steps.TrialLimits.status). NaN bounds never settle."""
    if any(math.isnan(v) for v in (*lows.values(), *highs.values())):
        return False
    for values in (lows, highs):
        status = stop({**row, **values})
        if status is not None and (stops_on is None or status in stops_on):
            return False
    return True


def near(examples: int, total: int) -> bool:
    """Whether an evaluation not at the goal that scored `examples` of `total` says the goal is near."""
    return examples > NEAR_SHARE * total
