"""What the configurations of one batch size say beyond their minimum: whether the best lies at the edge of the
search, and how the best depends on the tuning budget (best of k). Pure functions, used by analysis/steps.py."""

import math

import numpy as np

from study.engine.steps import DIVERGED, INFEASIBLE


def _on_edge(value, sampled: list, bounds, n: int) -> bool:
    """Whether a sampled value lies in the outer 1/n of its log range, or is the largest or smallest sampled."""
    if value is None:
        return False
    if value in (min(sampled), max(sampled)):
        return True
    if bounds is None:
        return False
    lo, hi = (math.log10(b) for b in bounds)
    u = (math.log10(value) - lo) / (hi - lo) if hi > lo else 0.5
    return u < 1 / n or u > 1 - 1 / n


def _effective_lr(trial: dict) -> float:
    """lr / (1 - momentum): the step size heavy-ball momentum amounts to over many steps (lr without momentum)."""
    return trial["lr"] / (1 - trial["momentum"]) if trial.get("momentum") is not None else trial["lr"]


def edges(best: dict, group: list[dict], ranges: dict | None) -> list[str]:
    """Why the best configuration may lie at the edge of what was searched: its lr, 1 - momentum or lr / (1 -
    momentum) at the edge of the sampled values or range (_on_edge), or a neighbour in lr / (1 - momentum) order
    that diverged or was infeasible (the best rate may then be cut off by instability, not found)."""
    ranges, n, out = ranges or {}, len(group), []
    if _on_edge(best["lr"], [t["lr"] for t in group], ranges.get("lr"), n):
        out.append("lr")
    if best.get("momentum") is not None:
        if _on_edge(1 - best["momentum"], [1 - t["momentum"] for t in group], ranges.get("one_minus_momentum"), n):
            out.append("1 - momentum")
        lr, om = ranges.get("lr"), ranges.get("one_minus_momentum")
        bounds = (lr[0] / om[1], lr[1] / om[0]) if lr and om else None
        if _on_edge(_effective_lr(best), [_effective_lr(t) for t in group], bounds, n):
            out.append("lr / (1 - momentum)")
    ordered = sorted(group, key=_effective_lr)
    k = ordered.index(best)
    failed = [t for t in ordered[max(k - 1, 0): k + 2] if t.get("status") in (DIVERGED, INFEASIBLE)]
    if failed:
        out.append("next to " + " and ".join(sorted({t["status"] for t in failed})))
    return out


def best_of_k(steps) -> dict:
    """Shallue et al.'s tuning-budget curve at one batch size: for k = 1..N, the expected fewest steps to result
    over k of the N configurations drawn at random without replacement, exactly from order statistics (the i-th
    smallest of N is the best of a k-subset with probability C(N - i, k - 1) / C(N, k)). Not reached counts as
    infinite, so the expectation is infinite while a k-subset can miss every configuration that reached;
    `p_reached[k-1]` is the probability that the best of k reaches the goal at all."""
    s = np.sort(np.asarray(steps, dtype=float))
    n, reached_n = len(s), int(np.isfinite(s).sum())
    expected, p = [], []
    for k in range(1, n + 1):
        w = np.array([math.comb(n - i, k - 1) / math.comb(n, k) for i in range(1, n + 1)])
        p.append(1 - math.comb(n - reached_n, k) / math.comb(n, k))  # 1 - P(all k among those not reached)
        expected.append(float((w[:reached_n] * s[:reached_n]).sum()) if k > n - reached_n else math.inf)
    return {"k": list(range(1, n + 1)), "expected": expected, "p_reached": p}
