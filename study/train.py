"""The training loop and its helpers, shared by both studies and free of Ray.

`fit` is the loop: evaluate at epoch 0, then per epoch draw the data order from (seed, epoch), train, evaluate,
and hand metrics plus a resumable state to `report` (the trainables turn that into `tune.report` + checkpoint).
Because the order and the augmentation are drawn from (seed, epoch) alone, a trial resumed from the checkpoint
of epoch e continues exactly as an uninterrupted one would (bit for bit on CPU).
"""

import math
import random
import time
from typing import Callable, Iterator

import numpy as np
import torch

from study import metrics as M
from study.lr_scaling import lr_at, scaled_lr, set_lr, warmup_factor
from study.noise import NoiseScale


def pick_device(gpus_requested: float = 0.0) -> torch.device:
    """CUDA when Tune gave this trial a GPU share (Ray sets CUDA_VISIBLE_DEVICES to it, so it is the process's
    current device, index 0), CPU otherwise. With its index: the allocator's calls refuse a bare "cuda"."""
    if gpus_requested > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one epoch: data order and augmentation depend on (seed, epoch) only."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def make_optimizer(name: str, params, lr: float, momentum: float, device: torch.device, weight_decay: float = 0.0):
    """SGD (with momentum, or Nesterov's), Adam or AdamW (decoupled weight decay) on the fused path on CUDA (one
    kernel per step), the foreach path on CPU."""
    params = [p for p in params if p.requires_grad]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fast)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)
    if name not in ("sgd", "nesterov"):
        raise ValueError(f"unknown optimizer {name!r}; choose one of sgd, nesterov, adam, adamw")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay,
                           **fast)


class DeviceBatches:
    """A dataset held on the device as tensors, batched by indexing a shuffled permutation there."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=generator).to(self.x.device)
        for idx in order.split(self.batch_size):
            yield self.x[idx], self.y[idx]


def rng_state(device: torch.device) -> dict:
    """The random streams a resumed trial must continue: the CPU one, and on CUDA the device's (dropout there)."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProbeClock:
    """Seconds an epoch spends inside noise probes, with no host sync per probe: on CUDA a pair of events per
    probe, read once after the epoch's closing sync; on CPU, where kernels run as they are called, perf_counter."""

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
        """The epoch's probe seconds; on CUDA only after the device was synchronised."""
        return self._seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0


def fit(model, optimizer, batches, loss_fn: Callable, evaluate: Callable[[torch.nn.Module], dict], report: Callable,
        *, cfg, device: torch.device, prepare: Callable | None = None, start: dict | None = None,
        select: str | None = None, maximise: bool = True, autocast_dtype: torch.dtype | None = None) -> dict:
    """Train `model` for cfg.epochs epochs; returns the final state (see `state` below).

    batches: has `epoch(generator)` yielding (x, y) on the device and `len()`.
    prepare(x, generator): turns a raw batch into model input on the device (augmentation); None for identity.
    evaluate(model) -> metrics dict; report(metrics, state) is called after every epoch, epoch 0 included.
    select: a metric to maximise (minimise with maximise=False); the state then carries the best epoch's weights
    ("best_model").
    start: a state from an earlier `report` to resume from (as loaded from a checkpoint).
    """
    steps_per_epoch = len(batches)
    base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    # A decay schedule (TrainConfig) sets the lr on every step; without one only warmup changes it.
    schedule, final = getattr(cfg, "schedule", "constant"), getattr(cfg, "final_lr_factor", 1.0)
    total_steps = cfg.epochs * steps_per_epoch
    noise = NoiseScale(model, cfg.noise_every, seed=cfg.seed) if cfg.noise_scale else None  # the model: its BN layers
    probe_clock = ProbeClock(device)
    state = {"epoch": 0, "train_seconds": 0.0, "best": {"value": -math.inf, "epoch": -1}, "best_model": None}
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        set_rng_state(start, device)
        state.update({k: start[k] for k in ("epoch", "train_seconds", "best", "best_model")})

    def snapshot():
        return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                **rng_state(device)}

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return loss_fn(model(x), y)

    def evaluate_and_track(metrics):
        metrics = {**metrics, **evaluate(model)}
        # Epoch 0 is the untrained network: reported, never the "best" model that gets tested.
        # A diverged epoch is never the best: NaN outputs can still score, e.g. an accuracy of the negatives' share.
        sign = 1 if maximise else -1
        best = sign * state["best"]["value"] if state["best"]["epoch"] > 0 else -math.inf
        if (select is not None and state["epoch"] > 0 and not metrics.get(M.DIVERGED)
                and sign * metrics[select] > best):
            state["best"] = {"value": metrics[select], "epoch": state["epoch"]}
            state["best_model"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if select is not None:  # e.g. best_val_acc (M.BEST_VAL_ACC) and its epoch
            metrics[M.BEST_EPOCH] = state["best"]["epoch"]
            metrics["best_" + select] = state["best"]["value"] if state["best"]["epoch"] > 0 else math.nan
        return metrics

    if start is None:  # a start's epoch 0 was reported with the checkpoint it came from: once per trial
        set_lr(optimizer, base_lr * warmup_factor(0, warmup_steps))
        metrics = {M.EPOCH: 0, M.TRAIN_LOSS: math.nan, M.EPOCH_SECONDS: 0.0, M.PROBE_SECONDS: 0.0, M.TRAIN_SECONDS: 0.0,
                   M.IMAGES_PER_SECOND: math.nan, M.NOISE_SCALE: math.nan, M.NOISE_PROBES: 0, M.DIVERGED: False,
                   M.LR: optimizer.param_groups[0]["lr"], M.STATUS: M.STATUS_RUNNING}
        report(evaluate_and_track(metrics), snapshot())

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        model.train()
        gen = epoch_generator(cfg.seed, epoch)
        aug_gen = epoch_generator(cfg.seed, epoch, device) if prepare is not None else None
        loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
        seen = 0
        if noise is not None:
            noise.start_epoch()
        probe_clock.start_epoch()
        sync(device)
        started = time.perf_counter()
        for step, (x, y) in enumerate(batches.epoch(gen), start=(epoch - 1) * steps_per_epoch):
            if schedule != "constant":
                set_lr(optimizer, lr_at(step, base_lr, warmup_steps, total_steps, schedule, final))
            elif step < warmup_steps:
                set_lr(optimizer, base_lr * warmup_factor(step, warmup_steps))
            elif step == warmup_steps:
                set_lr(optimizer, base_lr)
            if prepare is not None:
                x = prepare(x, aug_gen)
            optimizer.zero_grad(set_to_none=True)
            if noise is not None and noise.due(step % steps_per_epoch):
                probe_clock.start()
                loss = noise.probe(loss_of, x, y, step)  # the plain step's gradient and BN statistics, at these weights
                probe_clock.stop()
            else:
                loss = loss_of(x, y)
                loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
        sync(device)
        probe_seconds = probe_clock.seconds()
        # Timing comparisons across batch sizes leave the probes out: their share of an epoch depends on the batch
        # size. What is left out is the probe steps' forward and backward passes (their optimizer steps stay in).
        seconds = time.perf_counter() - started - probe_seconds
        train_loss = (loss_sum / max(seen, 1)).item()
        diverged = not math.isfinite(train_loss)
        state["epoch"] = epoch
        state["train_seconds"] += seconds
        metrics = {M.EPOCH: epoch, M.TRAIN_LOSS: train_loss, M.EPOCH_SECONDS: seconds, M.PROBE_SECONDS: probe_seconds,
                   M.TRAIN_SECONDS: state["train_seconds"], M.IMAGES_PER_SECOND: seen / seconds,
                   M.NOISE_SCALE: noise.value() if noise else math.nan,
                   M.NOISE_PROBES: noise.probes if noise else 0, M.DIVERGED: diverged,
                   M.LR: optimizer.param_groups[0]["lr"],
                   M.STATUS: M.STATUS_DIVERGED if diverged else
                   (M.STATUS_DONE if epoch == cfg.epochs else M.STATUS_RUNNING)}
        report(evaluate_and_track(metrics), snapshot())
        if diverged:  # a NaN/inf model has nothing left to learn: the trial ends here, marked diverged
            return state
    return state


def eval_logits(model, x: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,) logits of a model with `features` and a one-logit `head` (VGG16Patches): the features under autocast,
    the head in fp32.
    Under bf16 the logits would keep 8 bits of mantissa: a few thousand distinct probabilities over tens of
    thousands of images, whose ties bias AUC, its bootstrap intervals and DeLong's test."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        features = model.features(x)
    with torch.autocast(x.device.type, enabled=False):
        return model.head(features.float()).float().squeeze(1)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int, prepare: Callable | None = None,
            autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Model outputs for all of x (on the device), in batches, as float32."""
    model.eval()
    outs = []
    for chunk in x.split(batch_size):
        if prepare is not None:
            chunk = prepare(chunk)
        with torch.autocast(chunk.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outs.append(model(chunk).float())
    model.train()
    return torch.cat(outs)
