"""Tests of the gradient noise scale estimator against a problem whose B_simple is known in closed form.

Linear least squares, y = x.w* + eps with x ~ N(0, I_d), eps ~ N(0, s^2), per-example loss (x.w - y)^2 / 2 at a
fixed w. With delta = w - w* the residual is r = x.delta - eps and the per-example gradient g = r x:

    G = E[g] = E[x x^T] delta - E[eps x] = delta
    E[|g|^2] = E[(x.delta)^2 |x|^2] + s^2 E[|x|^2]
             = sum_j sum_ab delta_a delta_b E[x_a x_b x_j x_j] + s^2 d
             = sum_j (|delta|^2 + 2 delta_j^2) + s^2 d          (Isserlis: E[x_a x_b x_j x_j] = d_ab + 2 d_aj d_bj)
             = (d + 2) |delta|^2 + s^2 d
    tr(Sigma) = E[|g|^2] - |G|^2 = (d + 1) |delta|^2 + s^2 d
    B_simple  = tr(Sigma) / |G|^2 = d + 1 + s^2 d / |delta|^2

Run: python -m pytest tests/test_noise.py -q
"""

import io
import math

import pytest
import torch
from torch import nn

from study.noise import NoiseScale, gradient_sq_norm

DIM = 10
NOISE_STD = 1.0
BATCH = 16


def _least_squares(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Generator, float]:
    """A model fixed at w = w* + delta with |delta| = 1, the true w*, a generator for data, and B_simple."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(DIM, generator=gen)
    delta = torch.randn(DIM, generator=gen)
    delta /= delta.norm()
    model = nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    b_simple = DIM + 1 + NOISE_STD**2 * DIM / delta.square().sum().item()
    return model, w_star, gen, b_simple


def _feed(model: nn.Linear, w_star: torch.Tensor, gen: torch.Generator, steps: int, estimators: list) -> None:
    """Backward `steps` fresh batches through `model` (never updated) and show each gradient to every estimator."""
    x = torch.randn(steps, BATCH, DIM, generator=gen)
    y = x @ w_star + NOISE_STD * torch.randn(steps, BATCH, generator=gen)
    for xb, yb in zip(x, y):
        model.zero_grad()
        loss = 0.5 * (model(xb).squeeze(-1) - yb).square().mean()
        loss.backward()
        for estimator in estimators:
            estimator.step()


def test_matches_closed_form_noise_scale():
    model, w_star, gen, true_b = _least_squares(seed=0)
    # ema close to 1: ~500 big batches in the average, so the test measures bias, not the EMA's noise.
    noise = NoiseScale(model.parameters(), BATCH, accumulate=8, ema=0.998)
    _feed(model, w_star, gen, steps=3200, estimators=[noise])
    assert noise.value() == pytest.approx(true_b, rel=0.10)


def test_estimate_does_not_depend_on_accumulate():
    model, w_star, gen, true_b = _least_squares(seed=1)
    estimators = [NoiseScale(model.parameters(), BATCH, accumulate=k, ema=0.999) for k in (2, 4, 8)]
    _feed(model, w_star, gen, steps=3200, estimators=estimators)
    values = [e.value() for e in estimators]
    for value in values:
        assert value == pytest.approx(true_b, rel=0.10)
    assert max(values) / min(values) < 1.10


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def test_one_big_batch_follows_the_paper_formulas():
    gen = torch.Generator().manual_seed(2)
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    k, b = 3, 4
    noise = NoiseScale(params, batch_size=b, accumulate=k, ema=0.0)  # ema 0: the estimate of this big batch alone
    # A common mean plus noise, so that the |G|^2 estimate is positive and B_simple is defined.
    steps = [[1.0 + 0.5 * torch.randn(p.shape, generator=gen) for p in params] for _ in range(k)]
    for grads in steps:
        _set_grads(params, grads)
        noise.step()
    flat = torch.stack([torch.cat([g.flatten() for g in grads]) for grads in steps]).double()
    small_sq = flat.square().sum(1).mean()
    big_sq = flat.mean(0).square().sum()
    b_big = k * b
    grad_sq = (b_big * big_sq - b * small_sq) / (b_big - b)
    trace = (small_sq - big_sq) / (1 / b - 1 / b_big)
    assert grad_sq > 0
    assert noise.value() == pytest.approx((trace / grad_sq).item(), rel=1e-5)


def test_nan_before_first_big_batch_and_when_gradient_estimate_is_not_positive():
    param = torch.zeros(4, requires_grad=True)
    noise = NoiseScale([param], batch_size=8, accumulate=2, ema=0.5)
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0])
    param.grad = direction.clone()
    noise.step()
    assert math.isnan(noise.value())
    # Opposite gradients: G_big = 0, so the |G|^2 estimate -B_small |g|^2 / (B_big - B_small) is negative.
    param.grad = -direction
    noise.step()
    assert math.isnan(noise.value())


def test_frozen_parameters_are_skipped():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    everything = NoiseScale(model.parameters(), batch_size=8, accumulate=2)
    trainable = NoiseScale([p for p in model.parameters() if p.requires_grad], batch_size=8, accumulate=2)
    for _ in range(6):
        model.zero_grad()
        model(torch.randn(8, 5)).square().mean().backward()
        assert model[0].weight.grad is None
        expected_sq = sum(p.grad.square().sum() for p in model[2].parameters())
        assert gradient_sq_norm(model.parameters()).item() == pytest.approx(expected_sq.item(), rel=1e-6)
        everything.step()
        trainable.step()
    assert math.isfinite(everything.value())
    assert everything.value() == trainable.value()


def test_a_parameter_without_gradient_on_some_steps_counts_as_zero():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    with_none = NoiseScale(params, batch_size=4, accumulate=2, ema=0.0)
    with_zero = NoiseScale(params, batch_size=4, accumulate=2, ema=0.0)
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([1.1, 1.9]), torch.tensor([3.0, 1.0])
    _set_grads(params, [a, None])
    with_none.step()
    _set_grads(params, [a, torch.zeros(2)])
    with_zero.step()
    _set_grads(params, [b, c])
    with_none.step()
    with_zero.step()
    assert math.isfinite(with_zero.value())
    assert with_none.value() == pytest.approx(with_zero.value(), rel=1e-6)


def test_state_dict_round_trip_continues_the_same_estimate():
    model, w_star, gen, _ = _least_squares(seed=4)
    original = NoiseScale(model.parameters(), BATCH, accumulate=4, ema=0.9)
    _feed(model, w_star, gen, steps=40, estimators=[original])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = NoiseScale(model.parameters(), BATCH, accumulate=4, ema=0.9)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.value() == original.value()
    for _ in range(5):
        _feed(model, w_star, gen, steps=4, estimators=[original, resumed])
        assert math.isfinite(original.value())
        assert resumed.value() == original.value()


def test_resume_mid_group_starts_a_fresh_big_batch():
    model, w_star, gen, _ = _least_squares(seed=5)
    original = NoiseScale(model.parameters(), BATCH, accumulate=4, ema=0.9)
    _feed(model, w_star, gen, steps=6, estimators=[original])  # one big batch and half of the next
    resumed = NoiseScale(model.parameters(), BATCH, accumulate=4, ema=0.9)
    resumed.load_state_dict(original.state_dict())
    saved = original.value()
    assert resumed.value() == saved
    _feed(model, w_star, gen, steps=2, estimators=[original, resumed])
    assert original.value() != saved  # finished the big batch it was in the middle of
    assert resumed.value() == saved  # has only half of a fresh big batch
    _feed(model, w_star, gen, steps=2, estimators=[resumed])
    assert math.isfinite(resumed.value()) and resumed.value() != saved


def test_load_state_dict_rejects_other_settings():
    param = torch.zeros(2, requires_grad=True)
    state = NoiseScale([param], batch_size=8, accumulate=4).state_dict()
    with pytest.raises(ValueError, match="accumulate=4"):
        NoiseScale([param], batch_size=8, accumulate=2).load_state_dict(state)


def test_works_under_autocast():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    noise = NoiseScale(model.parameters(), batch_size=8, accumulate=2)
    for _ in range(4):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 6)).float().square().mean()
        loss.backward()
        noise.step()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(noise.value())


def test_step_before_backward_and_bad_settings_raise():
    param = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="loss.backward"):
        NoiseScale([param], batch_size=8).step()
    with pytest.raises(ValueError, match="loss.backward"):
        gradient_sq_norm([param])
    with pytest.raises(ValueError, match="accumulate"):
        NoiseScale([param], batch_size=8, accumulate=1)
    with pytest.raises(ValueError, match="batch_size"):
        NoiseScale([param], batch_size=0)
    with pytest.raises(ValueError, match="ema"):
        NoiseScale([param], batch_size=8, ema=1.0)
    with pytest.raises(ValueError, match="no parameters"):
        NoiseScale(iter([]), batch_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_step_does_not_sync_with_the_host():
    model = nn.Linear(32, 1).cuda()
    noise = NoiseScale(model.parameters(), batch_size=8, accumulate=2)
    model(torch.randn(8, 32, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            noise.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(noise.value())
