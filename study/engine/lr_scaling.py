"""Learning-rate scaling with batch size, and gradual warmup.

The lr actually used on optimizer step t is

    scaled_lr(base_lr, batch_size, reference_batch, rule) * warmup_factor(t, warmup_steps)

where base_lr is the lr tuned at `reference_batch`. Rules: "none" keeps base_lr; "linear" multiplies it by
batch_size / reference_batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD"); "sqrt" by the square root of
that ratio (Krizhevsky 2014; Hoffer et al. 2017), which keeps the variance of the update fixed.
"""

import math

import torch

from study.engine.config import LR_SCALING_RULES as RULES


def _require_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be positive, got {value}")


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int, rule: str) -> float:
    """The learning rate for `batch_size`, given `base_lr` tuned at `reference_batch`."""
    if rule not in RULES:
        raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {', '.join(RULES)}")
    _require_positive("base_lr", base_lr)
    _require_positive("batch_size", batch_size)
    _require_positive("reference_batch", reference_batch)
    ratio = batch_size / reference_batch
    if rule == "linear":
        return float(base_lr * ratio)
    if rule == "sqrt":
        return float(base_lr * math.sqrt(ratio))
    return float(base_lr)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the lr on optimizer step `step` (0-based: the first step is 0).

    Linear ramp (step + 1) / warmup_steps: 1/warmup_steps on step 0, reaching 1.0 on step warmup_steps - 1 and
    staying there. 1.0 throughout when warmup_steps == 0. Goyal et al. 2017 ramp linearly in the same way but
    from the reference-batch lr; starting at 1/warmup_steps of the target avoids tying warmup to the scaling rule.
    """
    if step < 0:
        raise ValueError(f"warmup step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def schedule_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, final: float) -> float:
    """Multiplier of the lr on optimizer step `step` (0-based) from the decay schedule alone: 1.0 during warmup,
    then constant, linear or cosine (half a period) from 1.0 down to `final` on the trial's last step."""
    if schedule == "constant" or step < warmup_steps:
        return 1.0
    span = total_steps - 1 - warmup_steps  # the steps after warmup, the first at 1.0 and the last at `final`
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - (1.0 - final) * progress
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of constant, linear, cosine")


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
          final: float = 0.0) -> float:
    """The lr of optimizer step `step`: warmup ramp times decay schedule times the (already scaled) base lr."""
    return base_lr * warmup_factor(step, warmup_steps) * schedule_factor(step, warmup_steps, total_steps, schedule,
                                                                         final)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every parameter group of `optimizer` (as a Python float)."""
    if not lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


def scaling_rules(value) -> list[str]:
    """--lr-scaling as a list of distinct rules in the order given (a study stored before the flag took several
    values holds one string)."""
    return [value] if isinstance(value, str) else list(dict.fromkeys(value))
