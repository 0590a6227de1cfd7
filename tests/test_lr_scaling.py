"""Tests of the learning-rate scaling rules, warmup and set_lr.

Run: python -m pytest tests/test_lr_scaling.py -q
"""

import math

import numpy as np
import pytest
import torch

from study.engine.config import LR_SCALING_RULES as RULES
from study.engine.lr_scaling import scaled_lr, set_lr, warmup_factor


@pytest.mark.parametrize(
    "batch, reference, rule, factor",
    [
        (256, 64, "none", 1.0),
        (256, 64, "linear", 4.0),
        (256, 64, "sqrt", 2.0),
        (16, 64, "linear", 0.25),
        (16, 64, "sqrt", 0.5),
        (64, 64, "sqrt", 1.0),
        (96, 32, "sqrt", math.sqrt(3.0)),
    ],
)
def test_scaled_lr(batch, reference, rule, factor):
    lr = scaled_lr(0.05, batch, reference, rule)
    assert isinstance(lr, float)
    assert lr == pytest.approx(0.05 * factor, rel=1e-12)


def test_every_rule_is_the_identity_at_the_reference_batch():
    assert all(scaled_lr(0.1, 128, 128, rule) == pytest.approx(0.1) for rule in RULES)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.1, 64, 64, "cubic"), "none, linear, sqrt"),
        ((0.0, 64, 64, "linear"), "base_lr"),
        ((-0.1, 64, 64, "linear"), "base_lr"),
        ((float("nan"), 64, 64, "linear"), "base_lr"),
        ((0.1, 0, 64, "linear"), "batch_size"),
        ((0.1, 64, -1, "sqrt"), "reference_batch"),
    ],
)
def test_scaled_lr_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        scaled_lr(*args)


def test_warmup_ramps_linearly_to_one():
    assert [warmup_factor(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 1) == 1.0
    assert warmup_factor(10_000, 5) == 1.0


def test_no_warmup_is_constant_one():
    assert [warmup_factor(step, 0) for step in (0, 1, 100)] == [1.0, 1.0, 1.0]


def test_warmup_rejects_negative_input():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_factor(0, -1)
    with pytest.raises(ValueError, match="step"):
        warmup_factor(-1, 4)


def test_set_lr_reaches_every_group_and_the_update():
    w1, w2 = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [w1]}, {"params": [w2], "lr": 0.5}], lr=1.0)
    set_lr(optimizer, 0.125)
    assert [group["lr"] for group in optimizer.param_groups] == [0.125, 0.125]
    (w1.sum() + w2.sum()).backward()
    optimizer.step()
    assert torch.equal(w1.detach(), torch.full((2,), 0.875))
    assert torch.equal(w2.detach(), torch.full((3,), 0.875))


def test_set_lr_stores_a_python_float():
    """A numpy or tensor lr (from a schedule's arithmetic) is stored as a float, so the optimizer's state_dict in a
    checkpoint holds no array and no tensor shared with the caller."""
    optimizer = torch.optim.Adam([torch.ones(2, requires_grad=True)], lr=0.1)
    for lr in (np.float32(0.25), torch.tensor(0.5)):
        set_lr(optimizer, lr)
        assert type(optimizer.param_groups[0]["lr"]) is float and optimizer.param_groups[0]["lr"] == float(lr)


def test_set_lr_rejects_negative():
    optimizer = torch.optim.SGD([torch.ones(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        set_lr(optimizer, -0.1)
