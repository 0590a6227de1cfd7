"""The two papers' plain function trainables (`python -m study.mnist`, `python -m study.pcam`): `train_x(config,
data)` builds the run from its config and calls the one loop (study.loop.fit, for PCam through the pcam workload's
study.run_workload), inside the trial bridge (study.bridge: device, checkpoints, report, out of memory). Tune
restarts a failed trial from its latest checkpoint.

Data arrives through `tune.with_parameters`, i.e. Ray's object store: prepared once by the driver, one copy per
node, shared by every trial there.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from study.bridge import load_start, reporter, trial_device, trial_entry
from study.config import MnistConfig, PcamConfig, TrainConfig
from study.data import pcam as pcam_data
from study.loop import fit
from study.models import VGG16Patches
from study.run_workload import run_workload
from study.train import DeviceBatches, make_optimizer, predict, seed_everything
from study.workload import resolve
from study.workloads import mnist_regression as regression
from study.workloads.pcam import auc, bce  # noqa: F401 (where the tests find them)


@trial_entry
def train_mnist(config: dict, data: dict) -> None:
    """One trial of the MNIST regression study (study.mnist), as Tune runs it."""
    cfg = MnistConfig.from_dict(config)
    trial = trial_device(tf32=cfg.tf32, benchmark=False)  # benchmark off: the last batch of an epoch is smaller
    run_mnist(cfg, data, trial.device, reporter(trial.placement), load_start())


def run_mnist(cfg: MnistConfig, data: dict, device: torch.device, report, start: dict | None = None) -> dict:
    """The trial without Ray (the tests call it directly), built from the mnist-regression workload. data:
    train_x/test_x (N,28,28) uint8 and targets[target] -> (train values, test values) on the 0..255 scale.
    Unlike a workload study's trial (study.run_workload), the test split is scored every epoch (the report's curves)
    and a val_size of 0 trains on every image (val_mse NaN), as the study did before the workload redesign."""
    seed_everything(cfg.seed)
    workload = regression.workload
    options = {"target": cfg.target, "input_scale": cfg.input_scale, "target_scale": cfg.target_scale,
               "val_size": cfg.val_size}
    splits = regression.splits(data["train_x"], data["test_x"], data["targets"][cfg.target], options)
    # Onto the device and prepared (uint8 -> float) once per trial: MNIST is small, and nothing is augmented.
    (train_x, train_y), *scored = (
        (workload.prepare(torch.from_numpy(np.array(x)).to(device)), torch.from_numpy(np.array(y)).to(device))
        for x, y in (splits[s] for s in ("train", "val", "test")))

    def evaluate(model):
        out = {}
        for split, (x, y) in zip(("val", "test"), scored):
            if not len(x):  # val_size 0: no validation split
                values = {m.name: math.nan for m in workload.metrics}
            else:
                values = workload.evaluate(predict(model, x, cfg.eval_batch_size), y)
            out.update({f"{split}_{name}": value for name, value in values.items()})
        return out

    model = workload.model(options).to(device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions: a 1.3x faster training step at batch 16 (measured)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device)
    return fit(model, optimizer, DeviceBatches(train_x, train_y, cfg.batch_size), workload.loss,
               evaluate, report, cfg=cfg, device=device, start=start)


@trial_entry
def train_pcam(config: dict, data: dict) -> None:
    """One trial of `python -m study.pcam`, as Tune runs it (its config is PcamConfig: the stored layout of the
    study before workloads). data: {"features": VGG16 conv state_dict or None}, loaded once by the driver."""
    cfg = PcamConfig.from_dict(config)
    trial = trial_device(tf32=cfg.tf32, benchmark=True)  # fixed shapes: cuDNN's autotuning pays once
    run_pcam(cfg, data["features"], trial.device, reporter(trial.placement, every=cfg.checkpoint_every),
             load_start(), memory_budget=trial.memory_budget, packed=trial.packed)


def run_pcam(cfg: PcamConfig, features: dict | None, device: torch.device, report, start: dict | None = None, *,
             memory_budget: int | None = None, packed: bool = False):
    """The PCam trial without Ray: the "pcam" workload (study.workloads.pcam) run by the workload engine with
    the settings of a PcamConfig. report(metrics, state, files) gets every epoch; the last one carries the test
    metrics of the best-on-validation weights and the prediction files. features: the VGG16 conv weights (None:
    random init)."""
    workload = resolve("pcam")
    options = dict(data_dir=cfg.data_dir, download=cfg.download, train_limit=cfg.train_limit,
                   weights=cfg.weights, freeze_blocks=cfg.freeze_blocks, no_flip=not cfg.flip,
                   no_rot90=not cfg.rot90, zoom=cfg.zoom, brightness=cfg.brightness)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(cfg.to_dict())
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in shared}, workload="pcam", options=options, stage="grid")
    return run_workload(train_cfg, workload, None, device, lambda m, s, files=None: report(m, s, files or {}), start,
                        memory_budget=memory_budget, packed=packed,
                        model_factory=lambda options: VGG16Patches(features, options["freeze_blocks"]))


def locate_or_fetch(cfg: PcamConfig) -> dict:
    """The PCam files on this node; with cfg.download a node that lacks them fetches them once (under a lock)."""
    if cfg.download:
        return pcam_data.locate_or_fetch(Path(cfg.data_dir))
    return pcam_data.locate(cfg.data_dir)
