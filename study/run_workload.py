"""The trainable of every workload study: `train_workload(config, data)` as Tune runs it, and `run_workload`, the
same trial without Ray (the tests call it directly).

The workload is resolved again by name inside the trial's process (only its name travels in the config); its
splits arrive through tune.with_parameters as numpy arrays, go onto the device once, and are batched there by
indexing. Each epoch's row carries the workload's metrics with their split prefix: the validation split's every
epoch (val_error, ...), the test split's after the last epoch (test_error, ...; NaN before).
"""

import math

import numpy as np
import torch

from study import metrics as M
from study.config import TrainConfig
from study.memory import configure_cuda
from study.train import DeviceBatches, fit, make_optimizer, predict, seed_everything
from study.trainables import load_start, report, trial_device, trial_entry
from study.workload import Workload, resolve


@trial_entry
def train_workload(config: dict, data: dict) -> None:
    """One trial of a workload study. data: the workload's splits, {"train": (x, y), "val": (x, y), ...}."""
    cfg = TrainConfig.from_dict(config)
    workload = resolve(cfg.workload)
    device, placement = trial_device()
    configure_cuda(device, tf32=cfg.tf32, benchmark=False)  # benchmark off: an epoch's last batch is smaller
    run_workload(cfg, workload, data, device, lambda metrics, state: report({**metrics, **placement}, state),
                 load_start())


def to_device(split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (x, y) as tensors on the device, once per trial (np.array copies: the object store's arrays are
    read-only)."""
    x, y = split
    return torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device)


def run_workload(cfg: TrainConfig, workload: Workload, splits: dict, device: torch.device, report,
                 start: dict | None = None) -> dict:
    """Train the workload's model with cfg; report(metrics, state) after every epoch (epoch 0 included)."""
    seed_everything(cfg.seed)
    options = workload.option_values(cfg.options)
    on_device = {name: to_device(splits[name], device) for name in ("train", "val", "test") if name in splits}
    train_x, train_y = on_device.pop("train")
    batches = DeviceBatches(train_x, train_y, cfg.batch_size)
    model = workload.model(options).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device, cfg.weight_decay)

    def prepare_train(x, generator):
        if workload.prepare is not None:
            x = workload.prepare(x)
        return x if workload.augment is None else workload.augment(x, generator)

    evaluated = [start["epoch"] if start is not None else -1]  # the epoch of the last evaluation

    @torch.no_grad()
    def evaluate(model):
        # fit evaluates once per epoch, 0 included; the test split (often the largest) only after the last one.
        evaluated[0] += 1
        out = {}
        for split, (x, y) in on_device.items():
            if split == "test" and evaluated[0] != cfg.epochs:
                out.update({f"test_{m.name}": math.nan for m in workload.metrics})
                continue
            outputs = predict(model, x, cfg.eval_batch_size, workload.prepare)
            if not torch.isfinite(outputs).all():  # a diverged model has no score, only NaN
                out.update({f"{split}_{m.name}": math.nan for m in workload.metrics})
                continue
            out.update({f"{split}_{name}": float(value) for name, value in workload.evaluate(outputs, y).items()})
        return out

    steps_per_epoch, n_train = len(batches), len(train_x)

    def report_epoch(metrics, state):
        # Every epoch has the same batches, so steps and examples follow from the epoch.
        epoch = metrics[M.EPOCH]
        report({**metrics, M.STEP: epoch * steps_per_epoch, M.EXAMPLES: epoch * n_train}, state)

    return fit(model, optimizer, batches, workload.loss, evaluate, report_epoch, cfg=cfg, device=device,
               prepare=prepare_train if workload.prepare or workload.augment else None, start=start)
