"""Simulated steps-to-result trials for the analysis tests: known S(B) = S_min + E_min / B, a metric linear in
log step (so interpolation in log space is exact), and a driver that replays them with or without ResultRule."""

import math

import numpy as np

from study.engine import steps as S
from study.workload import Goal

GOAL = Goal("val_error", 0.05, higher_is_better=False)
LOOSE = Goal("val_error", 0.1, higher_is_better=False)
CHANCE = 0.9
SLOPE = 0.1  # val_error falls by this per unit of ln(step)


def curve_rows(true_steps: float, batch: int, budget: int, diverge_at: float = math.inf) -> list[dict]:
    """Rows on the study's grid, val_error = goal + SLOPE * ln(true_steps / step), capped at chance; noise_scale
    grows with progress as B_simple does in training."""
    rows = [{"step": 0, "examples": 0, "train_seconds": 0.0, "val_error": CHANCE, "train_loss": math.nan,
             "noise_scale": math.nan}]
    for step in S.eval_steps(budget):
        error = min(CHANCE, GOAL.value + SLOPE * math.log(true_steps / step))
        rows.append({"step": step, "examples": step * batch, "train_seconds": step * batch * 1e-4,
                     "val_error": error, "train_loss": math.nan if step >= diverge_at else 1.0,
                     "noise_scale": 10.0 * step / true_steps if math.isfinite(true_steps) else 5.0})
    return rows


def simulate(s_min: float, e_min: float, batch_sizes, configs: int, budget: int, noise: float, seed: int,
             penalty: float = 3.0):
    """Trials with all their rows up to the budget (before any stop). Configuration c's steps are S(B) times
    a penalty that grows with its distance from the best learning rate (which scales with sqrt(B)); configurations
    far off never reach (beyond the budget) and the largest rates diverge. Returns (trials, sobol configs)."""
    rng = np.random.default_rng(seed)
    sobol = S.sobol_configs(configs, {"lr": (1e-3, 1.0)}, seed=seed, momentum=False)
    trials = []
    for batch in batch_sizes:
        base = (s_min + e_min / batch) * math.exp(rng.normal(0, noise))
        best_lr = 0.01 * math.sqrt(batch / 16)
        for c in sobol:
            distance = abs(math.log10(c["lr"] / best_lr))
            true = base * (1 + penalty * distance ** 2) * math.exp(rng.normal(0, noise / 2))
            diverge = 50.0 if c["lr"] > 0.6 else math.inf
            trials.append({"trial_id": f"{batch}_{c['config']}", "batch_size": batch, "config": c["config"],
                           "lr": c["lr"], "momentum": None, "budget": budget,
                           "rows": curve_rows(true, batch, budget, diverge)})
    return trials, sobol


def replay(trials: list[dict], budget: int, rule: S.ResultRule | None, parallel: int = 2) -> list[dict]:
    """Run the trials through TrialLimits (and the rule, if given) as a driver would: per batch size, `parallel`
    trials at a time in config order, rows arriving in order of simulated wall time. Returns truncated trials
    with their status."""
    limits = S.TrialLimits(GOAL, budget, chance=CHANCE)
    out = []
    for batch in sorted({t["batch_size"] for t in trials}):
        group = sorted((t for t in trials if t["batch_size"] == batch), key=lambda t: t["config"])
        kept = {t["trial_id"]: [] for t in group}
        status = {}
        free_at = [0.0] * parallel  # when each slot frees up
        events = []
        for t in group:
            slot = int(np.argmin(free_at))
            start = free_at[slot]
            for r in t["rows"]:
                events.append((start + r["step"], t["trial_id"], r))
            end_row = next((r for r in t["rows"] if limits.status(r)), t["rows"][-1])
            free_at[slot] = start + end_row["step"]  # a slot frees when its trial ends on its own
        for _, tid, r in sorted(events, key=lambda e: (e[0], e[1])):
            if tid in status:
                continue
            kept[tid].append(r)
            own = limits.status(r)
            if own:
                status[tid] = own
                if own == S.REACHED and rule:
                    rule.reached(batch, tid, r["step"])
            elif rule and rule.should_stop(batch, r["step"]):
                status[tid] = S.STOPPED_BY_RULE
        out += [dict(t, rows=kept[t["trial_id"]], status=status.get(t["trial_id"], S.CENSORED)) for t in group]
    return out
