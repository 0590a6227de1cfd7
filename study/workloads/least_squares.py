"""Least squares on Gaussian inputs: a workload whose gradient noise and SGD trajectory are known exactly.

Inputs x ~ N(0, H) in --dim dimensions with H = diag(1, 1/2, ..., 1/dim), targets y = x.w* + n with
n ~ N(0, noise^2), w* ~ N(0, I) drawn from --data-seed; the model is one linear layer without bias, started at
zero, and the loss per example is (x.w - y)^2 / 2. With e = w - w*, at any weights (McCandlish et al. 2018,
Appendix A; Gaussian fourth moments):

    population loss   L = e'He / 2 + noise^2 / 2          mean gradient   G = He
    per-example gradient covariance   Sigma = H e e' H + (e'He + noise^2) H
    B_simple = tr(Sigma) / |G|^2 = 1 + (e'He + noise^2) tr(H) / e'H^2 e
    B_noise  = tr(H Sigma) / G'HG = 1 + (e'He + noise^2) tr(H^2) / e'H^3 e

and plain SGD at batch B and learning rate a on fresh examples moves the diagonal of P = E[e e'] exactly by

    p_i <- (1 - a h_i)^2 p_i + (a^2 / B) (h_i^2 p_i + (sum_j h_j p_j + noise^2) h_i)

(the same per-coordinate recursion as the noisy quadratic model of Zhang et al. 2019), so the expected loss at
every step, hence steps to a goal at every (B, a), is a short loop. It holds within the first epoch; the default
training set (--train-size 262,144) keeps 1,000 steps at batch 256 inside one.

`python -m study run least-squares --smoke`; the functions below give the exact answers the engine's
measurements are checked against (tests/test_least_squares.py).
"""

import math

import numpy as np
import torch
from torch import nn

from study.errors import StudyError
from study.workload import Goal, Metric, Option, Workload


def curvature(dim: int) -> np.ndarray:
    """The diagonal of H: 1, 1/2, ..., 1/dim (a condition number of dim, a spectrum like a network's)."""
    return 1.0 / np.arange(1, dim + 1)


def problem(options: dict) -> tuple[np.ndarray, np.ndarray]:
    """(h, w*): the curvature and the true weights, both drawn from --data-seed alone."""
    rng = np.random.default_rng(options["data_seed"])
    return curvature(options["dim"]), rng.standard_normal(options["dim"])


def load(options: dict) -> dict:
    o = options
    if o["dim"] < 1 or o["noise"] < 0 or min(o["train_size"], o["val_size"]) < 1:
        raise StudyError(f"least-squares needs --dim >= 1, --noise >= 0 and positive sizes, got dim {o['dim']}, "
                         f"noise {o['noise']}, train {o['train_size']}, val {o['val_size']}")
    h, w_star = problem(o)
    rng = np.random.default_rng([o["data_seed"], 1])  # the examples: a stream apart from w*'s

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, o["dim"])) * np.sqrt(h)
        y = x @ w_star + o["noise"] * rng.standard_normal(n)
        return x.astype(np.float32), y.astype(np.float32)

    return {"train": split(o["train_size"]), "val": split(o["val_size"])}


def model(options: dict) -> nn.Module:
    layer = nn.Linear(options["dim"], 1, bias=False)
    nn.init.zeros_(layer.weight)  # e = -w* at step 0, the start the exact curves assume
    return layer


def loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(1) - y).square().mean() / 2


def evaluate(outputs: torch.Tensor, y: torch.Tensor) -> dict:
    return {"loss": loss(outputs, y).item()}


# Exact answers, numpy only: e = w - w*, h the diagonal of H, s2 = noise^2.

def population_loss(e: np.ndarray, h: np.ndarray, s2: float) -> float:
    return float(h @ e**2 / 2 + s2 / 2)


def b_simple(e: np.ndarray, h: np.ndarray, s2: float) -> float:
    return float(1 + (h @ e**2 + s2) * h.sum() / (h**2 @ e**2))


def b_noise(e: np.ndarray, h: np.ndarray, s2: float) -> float:
    return float(1 + (h @ e**2 + s2) * (h**2).sum() / (h**3 @ e**2))


def expected_losses(p0: np.ndarray, h: np.ndarray, s2: float, batch: int, lr, steps: int) -> np.ndarray:
    """E[L_t] for t = 0..steps of plain SGD (no momentum) from diag(P_0) = p0: the exact recursion above. `lr` a
    number (returns steps + 1 losses) or an array of rates (returns one row per rate); a diverging rate's losses
    run to inf."""
    rates = np.atleast_1d(np.asarray(lr, dtype=np.float64))[:, None]
    p = np.tile(np.asarray(p0, dtype=np.float64), (len(rates), 1))
    out = np.empty((len(rates), steps + 1))
    with np.errstate(over="ignore", invalid="ignore"):  # diverging rates overflow to inf/nan: that is the answer
        for t in range(steps + 1):
            out[:, t] = p @ h / 2 + s2 / 2
            p = (1 - rates * h) ** 2 * p + (rates**2 / batch) * (h**2 * p + ((p @ h)[:, None] + s2) * h)
    out[~np.isfinite(out)] = np.inf
    return out[0] if np.ndim(lr) == 0 else out


def steps_to_goal(p0, h, s2, batch: int, lr, goal: float, max_steps: int):
    """The first step t with E[L_t] <= goal (inf if none within max_steps, or if SGD diverges); per rate if `lr`
    is an array."""
    losses = np.atleast_2d(expected_losses(p0, h, s2, batch, np.atleast_1d(lr), max_steps))
    reached = losses <= goal
    steps = np.where(reached.any(1), reached.argmax(1), np.inf).astype(float)
    return float(steps[0]) if np.ndim(lr) == 0 else steps


def best_steps_to_goal(p0, h, s2, batch: int, goal: float, max_steps: int, lrs=None) -> tuple[float, float]:
    """(fewest steps, its learning rate) over a fine log grid of rates: the exact steps-to-result curve at batch."""
    lrs = np.geomspace(1e-3, 2.0 / h.max(), 400) if lrs is None else np.asarray(lrs, dtype=np.float64)
    steps = steps_to_goal(p0, h, s2, batch, lrs, goal, max_steps)
    best = int(np.argmin(steps))  # the smallest rate among ties: the first of the fewest steps
    return float(steps[best]), float(lrs[best])


workload = Workload(
    name="least-squares",
    summary="least squares on Gaussian inputs, B_simple and SGD's expected loss known exactly (a check to trust)",
    load=load, model=model, loss=loss, evaluate=evaluate,
    metrics=(Metric("loss", False, bounds=(0, math.inf)),), primary="val_loss",
    goals=(Goal("val_loss", 0.2),),  # noise^2 / 2 = 0.125 is the floor at the defaults; the start is ~2.6
    defaults=dict(batch_sizes=[8, 16, 32, 64, 128, 256, 512], optimizers=["sgd"], lrs=[0.1, 0.3, 1.0], epochs=1,
                  seeds=[0], momentum=0.0),
    smoke=dict(batch_sizes=[16, 64], optimizers=["sgd"], lrs=[0.3], epochs=1, seeds=[0],
               options={"train_size": 4096, "val_size": 1024}),
    options=(Option("dim", int, 100, "input dimensions; H = diag(1, 1/2, ..., 1/dim)"),
             Option("noise", float, 0.5, "standard deviation of the label noise"),
             Option("train_size", int, 262_144, "training examples (the exact curves hold within one epoch)"),
             Option("val_size", int, 8192, "validation examples"),
             Option("data_seed", int, 0, "seed of w* and the examples")),
)
