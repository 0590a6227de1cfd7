"""The least-squares workload's exact answers, and the engine's B_simple checked against them.

The exact formulas (study/workloads/least_squares.py) are first checked against brute force (a Monte Carlo run of
SGD, the sample covariance of per-example gradients), then the engine's NoiseScale probe is checked against them at
fixed weights: the first of the known-answer checks a B_simple or B_crit measurement must pass before it is trusted.
"""

import numpy as np
import pytest
import torch

from study.engine.noise import NoiseScale
from study.workload import resolve
from study.workloads import least_squares as ls

OPTIONS = dict(dim=40, noise=0.5, train_size=16_384, val_size=1024, data_seed=3)


def per_example_grads(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x @ w - y)[:, None] * x  # d/dw of (x.w - y)^2 / 2


def test_the_exact_noise_scales_match_the_sample_covariance_of_per_example_gradients():
    rng = np.random.default_rng(0)
    h = ls.curvature(10)
    w_star, w = rng.standard_normal(10), rng.standard_normal(10) * 0.3
    x = rng.standard_normal((400_000, 10)) * np.sqrt(h)
    y = x @ w_star + 0.7 * rng.standard_normal(len(x))
    g = per_example_grads(x, y, w)
    mean, cov = g.mean(0), np.cov(g, rowvar=False)
    e = w - w_star
    assert mean == pytest.approx(h * e, abs=0.01)
    assert np.trace(cov) / (mean @ mean) == pytest.approx(ls.b_simple(e, h, 0.49), rel=0.03)
    assert np.trace(np.diag(h) @ cov) / (mean @ (h * mean)) == pytest.approx(ls.b_noise(e, h, 0.49), rel=0.03)
    assert ((x @ w - y) ** 2).mean() / 2 == pytest.approx(ls.population_loss(e, h, 0.49), rel=0.01)


@pytest.mark.parametrize("batch, lr", [(4, 0.5), (64, 1.5)])
def test_the_exact_sgd_recursion_matches_simulated_sgd(batch, lr):
    """400 runs of SGD on fresh Gaussian examples: their mean loss follows the recursion step by step."""
    rng = np.random.default_rng(1)
    h, s, runs, steps = ls.curvature(8), 0.5, 400, 60
    w_star = rng.standard_normal(8)
    w = np.zeros((runs, 8))
    simulated = []
    for _ in range(steps + 1):
        e = w - w_star
        simulated.append(((e**2) @ h / 2 + s**2 / 2).mean())
        x = rng.standard_normal((runs, batch, 8)) * np.sqrt(h)
        y = x @ w_star + s * rng.standard_normal((runs, batch))
        residual = np.einsum("rbd,rd->rb", x, w) - y
        w = w - lr * np.einsum("rb,rbd->rd", residual, x) / batch
    exact = ls.expected_losses(w_star**2, h, s**2, batch, lr, steps)
    assert np.asarray(simulated) == pytest.approx(exact, rel=0.08)  # 400 runs: a few % of sampling noise
    assert exact[-1] < exact[0] / 2  # the runs did learn: the check compares curves, not two flat lines


def test_steps_to_result_is_the_first_step_at_the_goal_and_larger_batches_need_fewer():
    h, s2 = ls.curvature(50), 0.25
    p0 = np.random.default_rng(0).standard_normal(50) ** 2
    goal = ls.population_loss(np.sqrt(p0), h, s2) / 4
    curve = {b: ls.best_steps_to_goal(p0, h, s2, b, goal, 5000)[0] for b in (4, 16, 64, 256, 1024)}
    assert all(np.isfinite(list(curve.values())))
    assert [curve[b] for b in sorted(curve)] == sorted(curve.values(), reverse=True)  # more examples, fewer steps
    losses = ls.expected_losses(p0, h, s2, 64, 0.5, 5000)
    t = ls.steps_to_goal(p0, h, s2, 64, 0.5, goal, 5000)
    assert losses[int(t)] <= goal < losses[int(t) - 1]
    assert ls.steps_to_goal(p0, h, s2, 64, 5.0, goal, 200) == float("inf")  # lr > 2 / h_max diverges


def probe_b_simple(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, probes: int) -> float:
    """The engine's B_simple at the model's (fixed) weights from `probes` random batches of the training set."""
    noise = NoiseScale(model, every=1)
    gen = torch.Generator().manual_seed(0)
    for step in range(probes):
        idx = torch.randint(len(y), (batch,), generator=gen)
        model.zero_grad(set_to_none=True)
        noise.probe(lambda xb, yb: ls.loss(model(xb), yb), x[idx], y[idx], step=step)
    return noise.value()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_engines_b_simple_matches_the_exact_value_at_fixed_weights(dtype):
    workload = resolve("least-squares")
    options = workload.option_values(OPTIONS)
    x, y = (torch.from_numpy(a).to(dtype) for a in workload.load(options)["train"])
    h, w_star = ls.problem(options)
    model = workload.model(options).to(dtype)
    for scale in (0.0, 0.8):  # at the start (e = -w*) and part way to w*
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(scale * w_star)[None])
        exact = ls.b_simple((scale - 1) * w_star, h, options["noise"] ** 2)
        # 200 probes: within 1 % here (the training set is a finite sample of the population the formula knows)
        assert probe_b_simple(model, x, y, batch=256, probes=200) == pytest.approx(exact, rel=0.05), scale


def test_the_workload_loads_what_it_declares():
    workload = resolve("least-squares")
    options = workload.option_values(dict(OPTIONS, train_size=5000))
    data = workload.load(options)
    (x, y), (xv, yv) = data["train"], data["val"]
    assert x.dtype == y.dtype == np.float32 and x.shape == (5000, 40) and y.shape == (5000,) and len(xv) == 1024
    h, w_star = ls.problem(options)
    assert x.var(0) == pytest.approx(h, rel=0.1)  # x ~ N(0, H)
    residual = y - x @ w_star
    assert residual.std() == pytest.approx(options["noise"], rel=0.05)
    out = workload.model(options)(torch.from_numpy(xv))
    assert workload.evaluate(out, torch.from_numpy(yv))["loss"] == pytest.approx(
        ls.population_loss(-w_star, h, options["noise"] ** 2), rel=0.1)  # zero weights: e = -w*
