"""The steps-to-result study's grid and stopping rules (Shallue et al. 2019; McCandlish et al. 2018).

Library code, no entry point: `python -m study steps WORKLOAD` builds its grid from `sobol_configs`,
`default_batch_sizes` and `eval_steps`, ends each trial with `TrialLimits` and ends trials across a batch size with
`ResultRule` (wrapped for Tune by `tune_stopper`). Nothing here imports a workload; Ray only inside `tune_stopper`.

A goal is a study.workload.Goal (in a trial's config and study.json, its to_dict()).
"""

import math
from dataclasses import dataclass, field

import numpy as np

from study import metrics as M
from study.metrics import STEP  # training steps taken when the row was evaluated (0: before any step)
from study.workload import Goal

STAGE = "steps"  # the study's one stage: its Tune experiment's folder
# Keys of a steps trial's config besides TrainConfig's: the budget, the stopping limits, the Sobol point's index.
BUDGET, GOAL, CHANCE, CONFIG = "budget_steps", "goal", "chance", "config"

REACHED = "reached"  # the strictest goal was met at this evaluation
CENSORED = "censored"  # the step budget ran out first: the trial's steps to result are unknown, above the budget
STOPPED_BY_RULE = "stopped_by_rule"  # ResultRule: already slower than enough configurations of its batch size
DIVERGED = "diverged"  # training loss NaN or inf
INFEASIBLE = "infeasible"  # still at chance level late in the budget (TrialLimits.infeasible_from)
STATUSES = (REACHED, CENSORED, STOPPED_BY_RULE, DIVERGED, INFEASIBLE)


def sobol_configs(n: int, ranges: dict, seed: int, momentum: bool) -> list[dict]:
    """n metaparameter configurations, scrambled Sobol points (scipy.stats.qmc) over log10 of each range.

    ranges: {"lr": (low, high)} and, when `momentum`, {"one_minus_momentum": (low, high)}, all > 0 (momentum 0.9 is
    one_minus_momentum 0.1). The points depend only on (n, ranges, seed, momentum): every batch size gets the same
    ones, and so does every run with the same seed. Returns [{"config": i, "lr": ..., "momentum": ..., "seed": ...}]
    (momentum None without a momentum optimizer; seed: the configuration's own, from config_seed).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of configurations must be a positive integer, got {n!r}")
    names = ["lr"] + (["one_minus_momentum"] if momentum else [])
    bounds = []
    for name in names:
        if name not in ranges:
            raise ValueError(f"sobol_configs needs a range for {name}, got ranges for {sorted(ranges)}")
        low, high = (float(v) for v in ranges[name])
        if not 0 < low <= high:
            raise ValueError(f"the {name} range must satisfy 0 < low <= high, got ({low:g}, {high:g})")
        if name == "one_minus_momentum" and high >= 1:
            raise ValueError(f"one_minus_momentum must stay below 1 (momentum > 0), got high {high:g}")
        bounds.append((math.log10(low), math.log10(high)))
    from scipy.stats import qmc

    # Draw the next power of two and keep the first n: the same first n points as random(n), without scipy's
    # warning that only powers of two keep the sequence's balance (the study's configs come in any number).
    unit = qmc.Sobol(len(names), scramble=True, rng=np.random.default_rng(seed)).random_base2(
        max(0, math.ceil(math.log2(n))))[:n]
    configs = []
    for i, point in enumerate(unit):
        values = [float(10 ** (lo + u * (hi - lo))) for u, (lo, hi) in zip(point, bounds)]
        configs.append({"config": i, "lr": values[0], "momentum": 1 - values[1] if momentum else None,
                        "seed": config_seed(seed, i)})
    return configs


def config_seed(seed: int, index: int) -> int:
    """Configuration `index`'s seed (its initialisation and data order), drawn from the study's seed.

    Each configuration its own, so the N configurations of a batch size are N draws of the initialisation and the
    data order, not N learning rates on one draw; the same at every batch size, so batch sizes stay paired (the
    analysis resamples configurations across batch sizes together). numpy's SeedSequence with the index as its
    spawn key: independent streams, and a configuration's seed does not depend on how many there are. Below 2**31,
    so every consumer of an int seed takes it."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0]) >> 1


def eval_steps(budget_steps: int, resolution: float = 0.1, first: int = 1) -> list[int]:
    """Training steps at which a trial evaluates: geometric, so steps to result are resolved to `resolution`.

    From `first` (default step 1) each next step is max(s + 1, floor(s * (1 + resolution))): every step up to
    1 / resolution (1, 2, ..., 10 at 10 %), then consecutive evaluations at most `resolution` apart relative to
    the earlier one; no grid of whole steps is finer below that. The budget is always the last step. About
    1 / resolution + ln(budget * resolution) / ln(1 + resolution) evaluations, a few more for the rounding down:
    88 up to 10,000 steps at 10 %.
    """
    if isinstance(budget_steps, bool) or not isinstance(budget_steps, int) or budget_steps < 1:
        raise ValueError(f"the step budget must be a positive integer, got {budget_steps!r}")
    if not 0 < resolution < 1:
        raise ValueError(f"resolution must lie strictly between 0 and 1 (0.1 = 10 %), got {resolution}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"the first evaluation step must be a positive integer, got {first!r}")
    steps, s = [], min(first, budget_steps)
    while s < budget_steps:
        steps.append(s)
        s = max(s + 1, int(s * (1 + resolution)))
    return steps + [budget_steps]


SQRT, EPOCHS = "sqrt", "epochs"  # how a budget given in epochs carries over to larger batch sizes (step_budgets)
BUDGET_SCALINGS = (SQRT, EPOCHS)
BUDGET_FLOOR = 100  # steps at least, under the sqrt rule: ten times the first-evaluation floor of 10 steps


def step_budgets(batch_sizes: list[int], n_train: int, epochs: float, scaling: str = SQRT) -> dict[int, int]:
    """Each batch size's step budget from `epochs` at the smallest batch size B0 (S0 = epochs x its steps per
    epoch).

    EPOCHS: `epochs` at every batch size, S0 B0 / B steps. That budget falls exactly as fast as the steps of a run
    that scales perfectly, so past the critical batch size, where steps to result stop falling (S(B) -> S_min),
    it starves the large batches (2 epochs of 8,192 examples is 16 steps at batch 1024).
    SQRT (the default): S0 sqrt(B0 / B) steps, at least min(BUDGET_FLOOR, S0). It falls more slowly than the steps
    of perfect scaling (examples grow as sqrt(B)), so wherever the curve scales perfectly the budget grows
    relative to the steps needed, and past it the ratio of budget to steps falls only as sqrt(B0 / B) of its
    value at B0, at worst (when S(B) stops falling at once: tuned, a larger batch never needs more steps);
    under EPOCHS it falls as B0 / B. The floor keeps room past the first evaluations wherever S0 allows.
    """
    if scaling not in BUDGET_SCALINGS:
        raise ValueError(f"the budget scaling must be one of {', '.join(BUDGET_SCALINGS)}, got {scaling!r}")
    if not epochs > 0 or not batch_sizes:
        raise ValueError(f"a budget needs epochs > 0 and batch sizes, got {epochs!r} and {batch_sizes!r}")
    low = min(batch_sizes)
    first = max(1, round(epochs * math.ceil(n_train / low)))
    out = {}
    for b in batch_sizes:
        if scaling == EPOCHS:
            out[b] = max(1, round(epochs * math.ceil(n_train / b)))
        else:
            out[b] = max(min(BUDGET_FLOOR, first), math.ceil(first * math.sqrt(low / b)))
    return out


def default_batch_sizes(n_train: int, low: int = 16) -> list[int]:
    """Powers of two from `low` up to the largest that fits in the training set (full-batch at most)."""
    if low < 1 or low & (low - 1):
        raise ValueError(f"the smallest batch size must be a power of two, got {low}")
    if n_train < low:
        raise ValueError(f"the training set holds {n_train} examples, fewer than the smallest batch size {low}")
    return [low << k for k in range(int(math.log2(n_train // low)) + 1)]


def strictest(goals: list[Goal]) -> Goal:
    """The hardest goal to reach: the lowest value of a lower-is-better metric, the highest of a higher-is-better
    one. All goals must be on the same metric (a study stops on one metric)."""
    if not goals:
        raise ValueError("a steps-to-result study needs at least one goal, e.g. --goal val_error=0.01")
    if len({(g.metric, g.higher_is_better) for g in goals}) != 1:
        raise ValueError(f"all goals must be on one metric with one direction, got {', '.join(map(str, goals))}")
    return (max if goals[0].higher_is_better else min)(goals, key=lambda g: g.value)


@dataclass(frozen=True)
class TrialLimits:
    """When one trial ends on its own rows, independent of any other trial (the trainable checks each evaluation).

    goal: the strictest goal. chance: the goal metric's value for a model that learned nothing (None: no check).
    A row is at chance level when its metric covered less than `chance_margin` of the way from chance to the goal;
    such a row ends the trial as infeasible once the trial is past `infeasible_from()`: its warmup (a learning rate
    still ramping up has not yet been tried), then at least `chance_min_steps` steps and `chance_after` of the
    steps left after the warmup. This is the one rule here that assumes something: that a configuration still at
    chance that late would not reach the goal. A budget below infeasible_from() never calls a trial infeasible.
    """

    goal: Goal
    budget_steps: int
    chance: float | None = None
    chance_after: float = 0.25
    chance_margin: float = 0.1
    warmup_steps: int = 0
    chance_min_steps: int = 50  # five times the first-evaluation floor (analysis.steps.FLOOR_EVALUATIONS)

    def __post_init__(self):
        if self.budget_steps < 1 or not 0 <= self.chance_after <= 1 or not 0 < self.chance_margin < 1:
            raise ValueError(f"bad trial limits: budget {self.budget_steps} (>= 1), chance_after "
                             f"{self.chance_after} (0..1), chance_margin {self.chance_margin} (between 0 and 1)")
        if self.warmup_steps < 0 or self.chance_min_steps < 0:
            raise ValueError(f"bad trial limits: warmup_steps {self.warmup_steps} and chance_min_steps "
                             f"{self.chance_min_steps} must be >= 0")
        if self.chance is not None and self.chance == self.goal.value:
            raise ValueError(f"the goal {self.goal.metric} = {self.chance:g} equals the chance level; a model "
                             "that learned nothing would reach it")

    def infeasible_from(self) -> float:
        """The first step at which a row at chance level ends the trial."""
        rest = max(0, self.budget_steps - self.warmup_steps)
        return self.warmup_steps + max(self.chance_min_steps, self.chance_after * rest)

    def status(self, row: dict) -> str | None:
        """The status the trial ends with at this evaluation row, or None to go on."""
        step, value = row[STEP], float(row[self.goal.metric])
        loss = float(row.get(M.TRAIN_LOSS, math.nan))
        if row.get(M.DIVERGED) or (step > 0 and not math.isfinite(loss)):
            return DIVERGED
        if self.goal.reached(value):
            return REACHED
        if step >= self.budget_steps:
            return CENSORED
        if self.chance is not None and step >= self.infeasible_from():
            covered = (value - self.chance) / (self.goal.value - self.chance)
            if not covered >= self.chance_margin:  # NaN metric counts as chance
                return INFEASIBLE
        return None


def configs_to_wait_for(n: int, level: float = 0.95, safety: float = 10.0) -> int:
    """m for ResultRule: the smallest m with (1 - m/n)^n <= (1 - level) / 2 / safety.

    n counts every configuration of the batch size, the infeasible and diverged ones too.

    Derivation. The study's result at one batch size is the minimum steps to result over its n configurations, with
    a paired bootstrap over configurations (each replicate draws n configuration indices with replacement;
    analysis.steps). Once m configurations reached the goal, at S_(1) <= ... <= S_(m), a trial the rule stops is
    past S_(m) without the goal, so its steps exceed S_(m). (i) A resample holding one of the m fastest has its
    minimum among them, whatever its other draws did (reached later, stopped, censored, infeasible or diverged):
    the same with the rule and without. (ii) A resample holding none of them is counted at S_(m) by the analysis,
    with the rule and without (a lower bound on its minimum). So the rule changes no replicate; the cap in (ii)
    moves the interval's upper end (the 1 - (1-level)/2 quantile) only if such resamples exceed that tail, and
    their expected share is (1 - m/n)^n (each of n draws misses the m with probability 1 - m/n), kept `safety`
    times below it. (The report's per-batch bound is one-sided at `level`: twice the tail, so safer still.)
    Why failed configurations count in n: the bootstrap draws them like any other (a search of n points includes
    its failures), and drawing one is another way to miss the m fastest, never a way to hold one, so the share in
    (ii) is (1 - m/n)^n whatever f of the n failed. Taking m from the n - f others instead would need
    (1 - m/(n-f))^(n-f) <= limit, a smaller m than the bound allows: n = 8 with 3 failed gives m = 4, and
    (1 - 4/8)^8 = 0.39 % is above the limit 0.25 % (tests/test_steps.py simulates both).
    Examples at level 0.95, safety 10: n=8 -> m=5, n=16 -> m=5, n=32 -> m=6,
    n=100 -> m=6 ((1 - m/n)^n tends to exp(-m), so m stays near ln(2 safety / (1 - level)) as n grows).
    """
    if n < 1 or not 0 < level < 1 or safety < 1:
        raise ValueError(f"configs_to_wait_for needs n >= 1, 0 < level < 1, safety >= 1; got {n}, {level}, {safety}")
    limit = (1 - level) / 2 / safety
    return next(m for m in range(1, n + 1) if (1 - m / n) ** n <= limit)


@dataclass
class ResultRule:
    """Stop a trial once it is past the steps at which m configurations of its batch size already reached the goal.

    reached(batch, trial, step) records a trial's first evaluation step at the strictest goal (an upper bound on its
    interpolated steps to result, so the threshold is never too low); should_stop(batch, step) is then true for any
    trial of that batch size evaluated at a step beyond the m-th smallest of them without having reached the goal.
    Such a trial's steps to result exceed that step, so it is none of the m fastest and, with analysis.steps
    counting any resample without one of the m fastest at S_(m), the minimum, its bootstrap interval and the fit
    are the same as if it had run to its budget (configs_to_wait_for proves it; on simulated trials:
    tests/test_steps_analysis.py::test_the_early_stop_rule_changes_no_result). `configs` is every configuration
    of a batch size: infeasible and diverged trials count in it and never in the m (configs_to_wait_for says why).
    """

    configs: int
    level: float = 0.95
    safety: float = 10.0
    m: int = field(init=False)
    steps: dict = field(init=False, default_factory=dict)  # batch size -> {trial id: first reaching step}

    def __post_init__(self):
        self.m = configs_to_wait_for(self.configs, self.level, self.safety)

    def reached(self, batch_size: int, trial_id: str, step: int) -> None:
        """Record a trial's first reaching step; repeats are ignored (Tune hands a finished trial's last result
        to the stopper a second time)."""
        self.steps.setdefault(batch_size, {}).setdefault(trial_id, step)

    def threshold(self, batch_size: int) -> float:
        done = sorted(self.steps.get(batch_size, {}).values())
        return done[self.m - 1] if len(done) >= self.m else math.inf

    def should_stop(self, batch_size: int, step: int) -> bool:
        return step > self.threshold(batch_size)


def tune_stopper(rule: ResultRule, limits: TrialLimits):
    """A ray.tune.Stopper over `rule`. It reads each result's config["batch_size"], STEP and the goal metric, and
    records the trials it stops in `.stopped` (trial id -> step) so the driver can store them as stopped_by_rule.
    The per-trial limits are the trainable's (it returns at them); here they only tell a reaching row apart."""
    from ray import tune

    class StepsStopper(tune.Stopper):
        def __init__(self):
            self.rule, self.limits, self.stopped = rule, limits, {}

        def __call__(self, trial_id: str, result: dict) -> bool:
            if STEP not in result or self.limits.goal.metric not in result:
                return False
            batch, step = result["config"]["batch_size"], result[STEP]
            if self.limits.status(result) == REACHED:
                self.rule.reached(batch, trial_id, step)
                return False
            if self.rule.should_stop(batch, step):
                self.stopped[trial_id] = step
                return True
            return False

        def stop_all(self) -> bool:
            return False

    return StepsStopper()
