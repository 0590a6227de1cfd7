"""The MNIST regression paper's plain function trainable (`python -m study.mnist`): `train_mnist(config, data)`
builds the run from its config and calls the one loop (study.engine.loop.fit) inside the trial bridge
(study.engine.bridge: device, checkpoints, report, out of memory). Tune restarts a failed trial from its latest
checkpoint.

Data arrives through `tune.with_parameters`, i.e. Ray's object store: prepared once by the driver, one copy per
node, shared by every trial there.
"""

import math

import numpy as np
import torch

from study.engine.bridge import load_start, reporter, trial_device, trial_entry
from study.engine.config import TrainConfig
from study.engine.loop import fit
from study.engine.train import DeviceBatches, make_optimizer, predict, seed_everything
from study.mnist import stored
from study.mnist import workload as regression


@trial_entry
def train_mnist(config: dict, data: dict) -> None:
    """One trial of the MNIST regression study (study.mnist), as Tune runs it: config is the study's stored layout
    (study.mnist.stored), of today or of an earlier version."""
    cfg = stored.train_config(config)
    trial = trial_device(tf32=cfg.tf32, benchmark=False)  # benchmark off: the last batch of an epoch is smaller
    run_mnist(cfg, data, trial.device, reporter(trial.placement), load_start())


def run_mnist(cfg: TrainConfig, data: dict, device: torch.device, report, start: dict | None = None) -> dict:
    """The trial without Ray (the tests call it directly): cfg of the mnist-regression workload. data:
    train_x/test_x (N,28,28) uint8 and targets[target] -> (train values, test values) on the 0..255 scale.
    Unlike a workload study's trial (study.engine.run_workload), the test split is scored every epoch (the report's
    curves) and a val_size of 0 trains on every image (val_mse NaN), as the study did before the workload redesign."""
    seed_everything(cfg.seed)
    workload = regression.workload
    options = workload.option_values(cfg.options)
    splits = regression.splits(data["train_x"], data["test_x"], data["targets"][options["target"]], options)
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
