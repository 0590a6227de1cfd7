"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2, measured during training at fixed weights.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A.1: gradient norms
taken at two batch sizes *at the same parameters* give unbiased estimates of |G|^2 and of tr(Sigma) (the trace of
the per-example gradient covariance); B_simple is the ratio of their averages (numerator and denominator averaged
separately, because the ratio of single noisy estimates is badly biased).

How: a probe step splits its training batch of n examples into k micro-batches of sizes b_i (random subsets of the
batch: see `split_order`) and takes each one's gradient g_i on the same weights; g = sum(b_i g_i) / n is then
exactly the step's gradient (the loss is a mean), so the optimizer steps as it would have. From E[b_i |g_i|^2] = b_i
|G|^2 + tr(Sigma) and E[n |g|^2] = n |G|^2 + tr(Sigma):

    tr(Sigma) ~ S = (sum_i b_i |g_i|^2 - n |g|^2) / (k - 1)         |G|^2 ~ |g|^2 - S / n

both unbiased at the probe's weights whatever the optimizer did before (for equal b_i this is the paper's pair of
formulas with B_small = n/k, B_big = n). Each epoch reports the ratio of its probes' mean S and mean |G|^2; the
sums restart every epoch, so an epoch's value describes that epoch and a checkpoint needs none of them.

BatchNorm breaks "g is the step's gradient": in training mode each micro-batch is normalised with its own
statistics, so sum(b_i g_i) / n differs from the whole batch's gradient, and each micro-batch forward would update
the running statistics again. So on a model with a BatchNorm layer in training mode (given as `NoiseScale(model,
...)`) a probe first takes the plain step's forward and backward of the whole batch, whose gradient goes to .grad
and whose n |g|^2 is the big-batch term, then backpropagates the micro-batches for the sum_i b_i |g_i|^2 term with
the running statistics (and num_batches_tracked) restored afterwards and the random stream forked (dropout draws).
Training is then exactly a plain step's; the price is one more forward and backward of the batch per probe (about
twice a BN model's probe cost, so twice the extra training time below on BN models).

Why this design (measured, one CPU thread; figures in benchmarks/RESULTS.md):
- The estimator this replaces treated 8 consecutive training batches as one big batch. They were taken at 8
  different weights; with Adam at lr 0.0015 on MNIST the weights swing along one sharp direction (at fixed
  weights the per-example gradients have an effective rank of ~1.2 and B_simple is ~1-60 images), so its |G|^2
  estimate went negative in 120 of 120 epochs. At fixed weights the same quantity is easy to estimate.
- Per-example gradients (torch.func.vmap) cost 1.9x (batch 16) to 3.4x (batch 1024) a training step of the small
  CNN, and would hold batch x 15M floats for VGG16's trained layers: not cheap.
- Micro-batches add no FLOPs, only per-call overhead: a probe step took 2.3x a plain step at batch 16, 1.6x at
  32-64, 1.3x at 128, and 0.8x at 256-1024 (smaller operands stay in cache); VGG16 1.2-1.5x at 8-16 patches.
  Probing the first of every `every` steps of an epoch (--noise-every, default 32) keeps the extra training time
  at (probe / plain - 1) / every: 4 % at batch 16, under 2 % elsewhere, and every epoch gets at least one probe
  however short it is.
"""

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from study.metrics import trial_value  # noqa: F401 (defined with the stored names: analysis/ loads no torch)

SPLITS = 4  # micro-batches per probe: 3 degrees of freedom for tr(Sigma) per probe at one extra step or less


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a gradient of `dtype` accumulates in: fp32 at least, so half-precision gradients cannot overflow when
    squared; float64 gradients (a float64 model) stay float64."""
    return torch.promote_types(dtype, torch.float32)


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms = torch._foreach_norm(tensors, 2, dtype=_acc_dtype(tensors[0].dtype))
    return torch.stack(norms).square().sum()


def _set_grads(params: list[torch.Tensor], grads) -> None:
    """The gradients into .grad as backward() leaves them after zero_grad (the training loop's, study.engine.loop, is
    the one backward() of a step: a probe takes its gradients with autograd.grad)."""
    for p, g in zip(params, grads):
        if g is not None:  # an unused parameter keeps grad None, so the optimizer skips it as after backward()
            p.grad = g


class NoiseScale:
    """Per-epoch estimate of B_simple from probe steps, each split into `splits` micro-batches at fixed weights.

    `params`: the model, or its parameters (frozen ones, requires_grad False, are left out); pass the model if it
    may hold BatchNorm layers, whose running statistics a probe must update once, as a plain step does (see the
    module docstring). `every`: probe the steps 0, every, 2 every, ... of each epoch. All statistics stay on the
    parameters' device; only `value()` syncs.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor], every: int, splits: int = SPLITS, seed: int = 0):
        modules = params.modules() if isinstance(params, nn.Module) else ()
        self.batch_norms = [m for m in modules if isinstance(m, _BatchNorm)]
        if isinstance(params, nn.Module):
            params = params.parameters()
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("NoiseScale got no trainable parameters; pass model.parameters()")
        if every < 1:
            raise ValueError(f"NoiseScale every must be a positive number of steps, got {every}")
        if splits < 2:
            raise ValueError(f"NoiseScale splits must be at least 2 micro-batches, got {splits}")
        self.every, self.splits, self.seed = every, splits, seed
        self._gen: torch.Generator | None = None  # on the batch's device, re-seeded at every probe
        device = self.params[0].device
        self._trace = torch.zeros((), device=device, dtype=torch.float64)  # sum of the probes' tr(Sigma) estimates
        self._grad_sq = torch.zeros((), device=device, dtype=torch.float64)  # sum of their |G|^2 estimates
        self.probes = 0  # probes in the current epoch

    def due(self, step_in_epoch: int) -> bool:
        return step_in_epoch % self.every == 0

    def split_order(self, n: int, step: int, device: torch.device) -> torch.Tensor:
        """The order in which a probe at `step` deals its batch of n rows into micro-batches: a permutation on
        `device` drawn from (seed, step) alone, so a resumed trial draws the same one, with no host sync on CUDA.
        Why random: a batch's rows may arrive grouped (PatchBatches sorts each batch's indices so host reads walk
        the file forwards, and a file may be sorted by slide or label); contiguous micro-batches would then hold
        neighbours, and their spread would measure the grouping, not the per-example noise."""
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(n, generator=self._gen, device=device)

    def probe(self, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Backward of the batch (x, y) in micro-batches: leaves the batch's gradient in .grad as loss.backward()
        would, records one estimate, and returns the batch's mean loss (detached). loss_of(x, y) must be a mean
        over the examples. `step` (the training step) picks the micro-batches' random split. A batch too small to
        split is backpropagated whole and not counted."""
        n = len(y)
        k = min(self.splits, n)
        if k < 2:
            loss = loss_of(x, y)
            _set_grads(self.params, torch.autograd.grad(loss, self.params, allow_unused=True))
            return loss.detach()
        order = self.split_order(n, step, y.device)
        batch_norms = [m for m in self.batch_norms if m.training]
        if batch_norms:
            return self._probe_batch_norm(loss_of, x, y, order, k, batch_norms)
        x, y = x[order], y[order]
        total = [torch.zeros_like(p, dtype=_acc_dtype(p.dtype)) for p in self.params]
        weighted_sq = torch.zeros((), device=total[0].device, dtype=total[0].dtype)  # sum_i b_i |g_i|^2
        loss_sum = torch.zeros((), device=total[0].device, dtype=total[0].dtype)
        for xc, yc in zip(x.tensor_split(k), y.tensor_split(k)):
            b = len(yc)
            loss = loss_of(xc, yc)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
            weighted_sq += b * _sq_norm(list(grads))
            torch._foreach_add_(total, grads, alpha=b / n)
            loss_sum += loss.detach().float() * (b / n)
        for p, g in zip(self.params, total):
            p.grad = g.to(p.dtype)
        self._record(weighted_sq, _sq_norm(total), n, k)
        return loss_sum

    def _record(self, weighted_sq: torch.Tensor, batch_sq: torch.Tensor, n: int, k: int) -> None:
        """Adds one probe's estimates from sum_i b_i |g_i|^2 and |g|^2 (formulas in the module docstring)."""
        trace = (weighted_sq - n * batch_sq) / (k - 1)
        self._trace += trace
        self._grad_sq += batch_sq - trace / n
        self.probes += 1

    def _probe_batch_norm(self, loss_of, x, y, order: torch.Tensor, k: int, batch_norms: list) -> torch.Tensor:
        """A probe on a model with BatchNorm layers in training mode: the plain step, then the micro-batches."""
        n = len(y)
        loss = loss_of(x, y)  # rows in the batch's order, as the plain step: bit-identical statistics and dropout
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        _set_grads(self.params, grads)
        used = [g for g in grads if g is not None]
        batch_sq = _sq_norm(used) if used else torch.zeros_like(self._trace, dtype=torch.float32)
        # The micro-batch gradients below are normalised with each micro-batch's own statistics, so they estimate
        # the gradient noise of a BN model at batch n/k, while |g|^2 is at batch n: the two terms stay unbiased
        # for the |G|^2 and tr(Sigma) of per-example gradients only as far as BN's batch dependence allows. Their
        # forwards must not touch the training: the running statistics are copied back (exact, unlike momentum 0,
        # which would turn an infinite micro-batch statistic into NaN), and the random stream is forked.
        live = [b for m in batch_norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        saved = [b.clone() for b in live]
        weighted_sq = torch.zeros_like(self._trace, dtype=torch.float32)
        with torch.random.fork_rng(devices=[y.device] if y.device.type == "cuda" else []):
            for xc, yc in zip(x[order].tensor_split(k), y[order].tensor_split(k)):
                micro = torch.autograd.grad(loss_of(xc, yc), self.params, allow_unused=True, materialize_grads=True)
                weighted_sq += len(yc) * _sq_norm(list(micro))
        if live:  # none where every BN layer has track_running_stats=False
            torch._foreach_copy_(live, saved)
        self._record(weighted_sq, batch_sq, n, k)
        return loss.detach()

    def means(self) -> tuple[float, float]:
        """The epoch's mean tr(Sigma) and |G|^2 estimates over its probes (one host sync); NaN without a probe.
        B_simple is their ratio; a steps-to-result row stores both, so probes can be pooled across rows."""
        if self.probes == 0:
            return math.nan, math.nan
        trace, grad_sq = torch.stack((self._trace, self._grad_sq)).tolist()
        return trace / self.probes, grad_sq / self.probes

    def value(self) -> float:
        """The epoch's B_simple in examples; NaN without a probe, or while the |G|^2 estimate is <= 0 (the
        gradient is too small against its noise to be told apart at this batch size)."""
        trace, grad_sq = self.means()
        if not grad_sq > 0.0:
            return math.nan
        return trace / grad_sq

    def start_epoch(self) -> None:
        self._trace.zero_()
        self._grad_sq.zero_()
        self.probes = 0


class ProbeClock:
    """Seconds an evaluation interval spends inside noise probes, with no host sync per probe: on CUDA a pair of
    events per probe, read once after the interval's closing sync; on CPU, where kernels run as they are called,
    perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start_epoch()

    def start_epoch(self) -> None:
        self._events, self._seconds = [], 0.0

    def start(self) -> None:
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._started

    def seconds(self) -> float:
        """The interval's probe seconds; on CUDA only after the device was synchronised."""
        return self._seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
