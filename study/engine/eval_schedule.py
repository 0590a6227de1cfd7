"""When a steps-to-result trial evaluates, and the rule that defines its steps to result (torch- and Ray-free).

Steps to result are resolved by the fine grid, study.engine.steps.eval_steps (every step to 10, then <= 10 % apart).
Evaluating the whole validation split at every fine step costs several times the training at small batch sizes
(at batch 16 one evaluation of 2,000 MNIST images costs about as much as 40 training steps), so a trial evaluates
only the coarse steps, a subset of the fine grid about `factor` apart, and keeps the weights of the fine steps in
between (study.engine.loop.fit, `keep`). When a coarse evaluation reaches the goal, the kept fine steps since the previous
coarse one are evaluated in order, and the first of them at the goal is the trial's result:

    steps to result = the first fine step at the goal among those after the last coarse step not at the goal

It equals the full fine grid's answer (the first fine step at the goal) except when the metric reaches the goal
at a fine step and is back above it at the next coarse step: the full grid stops at that fine step, this rule
goes on to a later one, or to none before the budget (the goal was met for a moment, and lost). tests/test_eval_schedule.py replays stored
full-grid curves of real trials and counts those cases.
"""

from typing import Callable, Sequence


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
                         coarse: Sequence[int]) -> tuple[int | None, int]:
    """The coarse rule replayed on a full-grid curve (steps: the fine grid, values at each): (its steps to result,
    or None; the evaluations it took, the backtracked ones included)."""
    value = dict(zip(steps, values))
    evaluations, previous = 0, 0
    for c in coarse:
        if c not in value:
            break  # the curve ended (its trial stopped) before this coarse step
        evaluations += 1
        if reached(value[c]):
            between = [s for s in steps if previous < s < c]
            for s in between:
                evaluations += 1
                if reached(value[s]):
                    return s, evaluations
            return c, evaluations
        previous = c
    return None, evaluations
