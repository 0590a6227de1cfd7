"""The trial of a steps-to-result study (`python -m study steps`): `train_steps(config, data)` as Tune runs it, and
`run_steps`, the same trial without Ray (the tests call it directly).

A sibling of study.run_workload's epoch loop with the evaluations placed on training steps: at step 0 and at every
step of study.steps.eval_steps(budget), counted across epochs. Each evaluation row carries the step, the examples
seen, the training seconds (evaluations left out), the mean training loss and the gradient noise scale over the
steps since the previous evaluation, and the workload's metrics with their split prefix. The trial ends on its own
rows (study.steps.TrialLimits: the strictest goal, the budget, divergence, chance level); its last row's status
says which. The data order is drawn from (seed, epoch) as in study.train.fit, so a trial restarted from a
checkpoint at step s skips the epoch's first batches and goes on as an uninterrupted one would.
"""

import math
import tempfile
import time
from pathlib import Path

import torch

from study import metrics as M
from study import steps as S
from study.config import TrainConfig
from study.lr_scaling import lr_at, scaled_lr, set_lr
from study.memory import configure_cuda
from study.noise import NoiseScale
from study.run_workload import to_device
from study.steps import BUDGET, CHANCE, CONFIG, GOAL
from study.trainables import load_start, trial_device, trial_entry
from study.train import (DeviceBatches, ProbeClock, epoch_generator, make_optimizer, predict, rng_state,
                         seed_everything, set_rng_state, sync)
from study.workload import Goal, Workload, resolve

STEP_KEYS = (BUDGET, GOAL, CHANCE, CONFIG)
AUG_STATE = "aug_state"  # in the checkpoint: the augmentation generator's state at the checkpoint's step
CHECKPOINT_SECONDS = 60.0  # a checkpoint at most this often (and at the end): the state is written, not free


def split_config(config: dict) -> tuple[TrainConfig, dict]:
    extra = {k: config[k] for k in STEP_KEYS}
    return TrainConfig.from_dict({k: v for k, v in config.items() if k not in STEP_KEYS}), extra


def limits_of(extra: dict) -> S.TrialLimits:
    return S.TrialLimits(goal=Goal.from_dict(extra[GOAL]), budget_steps=extra[BUDGET], chance=extra[CHANCE])


@trial_entry
def train_steps(config: dict, data: dict) -> None:
    """One trial of a steps-to-result study, as Tune runs it."""
    from ray import tune

    cfg, extra = split_config(config)
    device, placement = trial_device()
    configure_cuda(device, tf32=cfg.tf32, benchmark=False)
    last_saved = [time.monotonic()]

    def report(row, state):
        final = row[M.STATUS] != M.STATUS_RUNNING
        if not final and time.monotonic() - last_saved[0] < CHECKPOINT_SECONDS:
            tune.report({**row, **placement})
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state(), Path(folder) / M.STATE_FILE)
            tune.report({**row, **placement}, checkpoint=tune.Checkpoint.from_directory(folder))
        last_saved[0] = time.monotonic()

    run_steps(cfg, extra, resolve(cfg.workload), data, device, report, load_start())


def run_steps(cfg: TrainConfig, extra: dict, workload: Workload, splits: dict, device: torch.device, report,
              start: dict | None = None) -> dict:
    """Train until the trial's limits end it; report(row, state_fn) at every evaluation (state_fn() builds the
    resumable state only when the caller saves it). Returns the last row."""
    limits = limits_of(extra)
    seed_everything(cfg.seed)
    options = workload.option_values(cfg.options)
    on_device = {name: to_device(splits[name], device) for name in ("train", "val") if name in splits}
    train_x, train_y = on_device.pop("train")
    batches = DeviceBatches(train_x, train_y, cfg.batch_size)
    model = workload.model(options).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device, cfg.weight_decay)
    steps_per_epoch, budget = len(batches), limits.budget_steps
    at = S.eval_steps(budget)
    base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    noise = NoiseScale(model, cfg.noise_every, seed=cfg.seed) if cfg.noise_scale else None
    clock = ProbeClock(device)
    state = {"step": 0, "train_seconds": 0.0}
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        set_rng_state(start, device)
        state.update(step=start["step"], train_seconds=start["train_seconds"])

    aug = None  # this epoch's augmentation generator (workloads with augment only)

    def snapshot():
        # The augmentation generator's state too: a restart mid-epoch skips the batches before its step without
        # drawing their augmentation, so it takes the generator up where the checkpoint left it.
        return {**state, "epoch": state["step"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                **rng_state(device), **({AUG_STATE: aug.get_state()} if aug is not None else {})}

    def loss_of(x, y):
        return workload.loss(model(x), y)

    @torch.no_grad()
    def evaluate(row):
        x, y = on_device["val"]
        outputs = predict(model, x, cfg.eval_batch_size, workload.prepare)
        if torch.isfinite(outputs).all():
            row.update({f"val_{k}": float(v) for k, v in workload.evaluate(outputs, y).items()})
        else:  # a diverged model has no score
            row.update({f"val_{m.name}": math.nan for m in workload.metrics})
        status = limits.status(row)
        row[M.STATUS] = status or M.STATUS_RUNNING
        row[M.STEPS_TO_RESULT] = float(row[S.STEP]) if status == S.REACHED else math.nan
        return row

    def new_row(loss):
        step = state["step"]
        row = {M.EPOCH: step / steps_per_epoch, S.STEP: step, M.EXAMPLES: examples_at(step),
               M.TRAIN_SECONDS: state["train_seconds"],
               M.TRAIN_LOSS: loss, M.DIVERGED: not math.isfinite(loss) if step else False,
               M.LR: optimizer.param_groups[0]["lr"], M.NOISE_SCALE: math.nan, M.NOISE_PROBES: 0,
               M.EPOCH_SECONDS: 0.0, M.PROBE_SECONDS: 0.0, M.IMAGES_PER_SECOND: math.nan}
        if noise is not None and noise.probes:
            trace, grad_sq = noise.means()
            row.update({M.NOISE_SCALE: trace / grad_sq if grad_sq > 0.0 else math.nan, M.NOISE_PROBES: noise.probes,
                        M.NOISE_TRACE: trace, M.NOISE_GRAD_SQ: grad_sq})
        return row

    def examples_at(step):  # only an epoch's last batch can be smaller than batch_size
        full, rest = divmod(step, steps_per_epoch)
        return full * len(train_x) + rest * cfg.batch_size

    if start is None:
        set_lr(optimizer, lr_at(0, base_lr, warmup, budget, cfg.schedule, cfg.final_lr_factor))
        row = evaluate(new_row(math.nan))
        report(row, snapshot)
        if row[M.STATUS] != M.STATUS_RUNNING:
            return row
    def start_interval():
        """An evaluation interval starts: its loss sum, example count, noise sums and clocks at zero."""
        if noise is not None:
            noise.start_epoch()
        clock.start_epoch()
        model.train()
        sync(device)
        return torch.zeros((), device=device), 0, time.perf_counter()

    pending = [s for s in at if s > state["step"]]
    loss_sum, seen, started = start_interval()
    epoch, skip = divmod(state["step"], steps_per_epoch)
    while True:
        epoch += 1
        gen = epoch_generator(cfg.seed, epoch)
        aug = epoch_generator(cfg.seed, epoch, device) if workload.augment is not None else None
        if aug is not None and skip and start is not None and AUG_STATE in start:
            aug.set_state(start[AUG_STATE])
        for k, (x, y) in enumerate(batches.epoch(gen)):
            if k < skip:  # a restart mid-epoch: the batches before its checkpoint's step were trained already
                continue
            step = state["step"]
            set_lr(optimizer, lr_at(step, base_lr, warmup, budget, cfg.schedule, cfg.final_lr_factor))
            if workload.prepare is not None:
                x = workload.prepare(x)
            if aug is not None:
                x = workload.augment(x, aug)
            optimizer.zero_grad(set_to_none=True)
            if noise is not None and noise.due(step % steps_per_epoch):
                clock.start()
                loss = noise.probe(loss_of, x, y, step)
                clock.stop()
            else:
                loss = loss_of(x, y)
                loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
            state["step"] = step + 1
            if state["step"] != pending[0]:
                continue
            pending.pop(0)
            sync(device)
            probe_seconds = clock.seconds()
            seconds = time.perf_counter() - started - probe_seconds
            state["train_seconds"] += seconds
            row = evaluate(new_row((loss_sum / max(seen, 1)).item()))
            # Per evaluation interval, as the epoch rows of other studies give them per epoch.
            row.update({M.EPOCH_SECONDS: seconds, M.PROBE_SECONDS: probe_seconds,
                        M.IMAGES_PER_SECOND: seen / seconds if seconds > 0 else math.nan})
            report(row, snapshot)
            if row[M.STATUS] != M.STATUS_RUNNING:
                return row
            loss_sum, seen, started = start_interval()
        skip = 0
