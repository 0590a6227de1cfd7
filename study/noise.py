"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2, measured during training.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A. With gradient
norms measured at two batch sizes B_small < B_big, unbiased estimates of the true squared gradient norm and of the
per-example gradient variance tr(Sigma) are

    |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and B_simple is the ratio of their exponential moving averages (each averaged separately, as the paper does,
because the ratio of noisy single estimates is badly biased). On one device the small batch is the training batch
and the big batch is `accumulate` consecutive training batches, so measuring costs no extra forward or backward
pass: one fused norm per step and one running gradient sum.

Usage, inside the training loop:

    noise = NoiseScale(model.parameters(), batch_size=128)
    ...
    loss.backward()
    noise.step()
    optimizer.step()
    ...
    report({NOISE_SCALE: noise.value()})   # the only host sync
"""

import math
from collections.abc import Iterable

import torch

_NO_GRADIENTS = "no parameter has a gradient; call NoiseScale.step() after loss.backward() and before zero_grad()"


def _grads(params: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """Indices and gradients of the parameters that have one (frozen layers have grad None)."""
    pairs = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
    if not pairs:
        raise ValueError(_NO_GRADIENTS)
    indices, grads = zip(*pairs)
    return list(indices), list(grads)


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Norms accumulate in fp32 so half-precision gradients cannot overflow when squared.
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def gradient_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of all gradients of `params` together, as a 0-dim fp32 tensor on their device.

    Parameters whose grad is None are skipped; raises ValueError if none has a gradient.
    """
    return _sq_norm(_grads(list(params))[1])


class NoiseScale:
    """Running estimate of B_simple from the gradients of consecutive training batches.

    `params`: the trainable parameters. `batch_size`: the number of examples whose mean loss produced each
    gradient (B_small). `accumulate`: how many consecutive batches form one big batch (B_big = accumulate *
    batch_size). `ema`: decay of the moving averages of |G|^2 and tr(Sigma), updated once per big batch.

    The averages start at zero and would need Adam's bias correction 1 / (1 - ema^n) to be read on their own;
    both would be divided by the same factor, so B_simple, their ratio, is exact without it.

    A parameter whose grad is None on a step contributes a zero gradient on that step. All statistics stay on
    the parameters' device; only `value()` and `state_dict()` copy to the host.
    """

    def __init__(self, params: Iterable[torch.Tensor], batch_size: int, accumulate: int = 8, ema: float = 0.95):
        self.params = list(params)
        if not self.params:
            raise ValueError("NoiseScale got no parameters; pass model.parameters()")
        if batch_size < 1:
            raise ValueError(f"NoiseScale batch_size must be a positive number of examples, got {batch_size}")
        if accumulate < 2:
            raise ValueError(f"NoiseScale accumulate must be at least 2 so that B_big > B_small, got {accumulate}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"NoiseScale ema must be in [0, 1), got {ema}")
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.ema = ema
        device = self.params[0].device
        self._small_sq_sum = torch.zeros((), device=device)  # sum of |g_small|^2 over the current group
        self._grad_sq = torch.zeros((), device=device)  # EMA of the |G|^2 estimates
        self._trace = torch.zeros((), device=device)  # EMA of the tr(Sigma) estimates
        self._sums: dict[int, torch.Tensor] = {}  # parameter index -> sum of its grads over the current group
        self._steps_in_group = 0
        self._big_batches = 0

    def step(self) -> None:
        """Record the current gradients; every `accumulate` calls, update the estimate."""
        indices, grads = _grads(self.params)
        self._small_sq_sum += _sq_norm(grads)
        for i, g in zip(indices, grads):
            if i not in self._sums:
                self._sums[i] = torch.zeros_like(g, dtype=torch.float32)
        torch._foreach_add_([self._sums[i] for i in indices], grads)
        self._steps_in_group += 1
        if self._steps_in_group == self.accumulate:
            self._update()

    def _update(self) -> None:
        k = self.accumulate
        b_small, b_big = self.batch_size, k * self.batch_size
        sums = list(self._sums.values())
        small_sq = self._small_sq_sum / k  # mean over the k small batches: same expectation, less variance
        big_sq = _sq_norm(sums) / k**2  # |sum / k|^2
        grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        self._grad_sq.lerp_(grad_sq, 1.0 - self.ema)
        self._trace.lerp_(trace, 1.0 - self.ema)
        self._big_batches += 1
        self._reset_group()

    def end_epoch(self) -> None:
        """Drop an unfinished big batch at the end of an epoch, so that every epoch checkpoint falls on a group
        boundary and a resumed trial continues the estimate exactly (costs < accumulate batches per epoch)."""
        self._reset_group()

    def _reset_group(self) -> None:
        if self._sums:  # empty before the first step
            torch._foreach_zero_(list(self._sums.values()))
        self._small_sq_sum.zero_()
        self._steps_in_group = 0

    def value(self) -> float:
        """Current B_simple in examples; NaN before the first big batch or while the |G|^2 average is <= 0."""
        if self._big_batches == 0:
            return math.nan
        trace, grad_sq = torch.stack((self._trace, self._grad_sq)).tolist()
        if not grad_sq > 0.0:
            return math.nan
        return trace / grad_sq

    def state_dict(self) -> dict:
        """The moving averages and settings, small enough for every checkpoint.

        The running gradient sum of an unfinished big batch is left out (it is as large as the model); a resumed
        run starts a fresh big batch, which drops at most `accumulate - 1` batches from the estimate.
        """
        return {
            "batch_size": self.batch_size,
            "accumulate": self.accumulate,
            "ema": self.ema,
            "big_batches": self._big_batches,
            "grad_sq": self._grad_sq.item(),
            "trace": self._trace.item(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the estimate saved by `state_dict()`; the settings must match this instance's."""
        for key in ("batch_size", "accumulate", "ema"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"NoiseScale checkpoint was made with {key}={state[key]}, this run uses "
                    f"{getattr(self, key)}; resume with the same settings or start the trial afresh"
                )
        self._big_batches = int(state["big_batches"])
        self._grad_sq.fill_(state["grad_sq"])
        self._trace.fill_(state["trace"])
        self._reset_group()
