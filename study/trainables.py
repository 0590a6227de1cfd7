"""Plain function trainables: `train_x(config, data)` builds the run from its config, calls study.train.fit and
turns each epoch into `ray.tune.report` with a checkpoint. Tune restarts a failed trial from that checkpoint.

Data arrives through `tune.with_parameters`, i.e. Ray's object store: prepared once by the driver, one copy per
node, shared by every trial there.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from ray import tune

from study import metrics as M
from study.config import MnistConfig
from study.models import RegressionCNN
from study.train import DeviceBatches, fit, make_optimizer, pick_device, predict, seed_everything

VAL_SPLIT_SEED = 0  # the validation images are the same for every trial of a study


def trial_device() -> tuple[torch.device, dict]:
    """The device Tune gave this trial (CUDA when its resources include a GPU share, else CPU), and the placement
    facts every report carries so the analysis can draw what ran where."""
    import ray

    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))  # do not oversubscribe cores shared by trials
    device = pick_device(resources.get("GPU", 0))
    gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids()) if device.type == "cuda" else ""
    return device, {M.DEVICE: device.type, M.GPU_IDS: gpu_ids, M.GPU_SHARE: float(resources.get("GPU", 0))}


def load_start() -> dict | None:
    """The state of the trial's latest checkpoint, when Tune restarted or resumed it."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / M.STATE_FILE, map_location="cpu", weights_only=True)


def report(metrics: dict, state: dict, files: dict | None = None) -> None:
    """tune.report with a checkpoint holding the resumable state (and any extra files, e.g. predictions)."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / M.STATE_FILE)
        for name, write in (files or {}).items():
            write(Path(folder) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def mnist_split(n_train: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation images: a fixed random hold-out of val_size images."""
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(n_train)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def train_mnist(config: dict, data: dict) -> None:
    """One MNIST regression trial, as Tune runs it."""
    cfg = MnistConfig.from_dict(config)
    device, placement = trial_device()
    run_mnist(cfg, data, device, lambda metrics, state: report({**metrics, **placement}, state), load_start())


def run_mnist(cfg: MnistConfig, data: dict, device: torch.device, report, start: dict | None = None) -> dict:
    """The trial without Ray (the tests call it directly). data: train_x/test_x (N,28,28) uint8 and
    targets[target] -> (train values, test values) on the 0..255 scale."""
    seed_everything(cfg.seed)
    x_scale = 1.0 if cfg.input_scale == "raw" else 1 / 255
    y_scale = 1.0 if cfg.target_scale == "raw" else (1 / 255**2 if cfg.target == "var" else 1 / 255)

    def to_device(images, values):  # (N,28,28) uint8 -> (N,1,28,28) float32 on the device, once per trial
        # np.array copies: arrays from the object store are read-only, and this is one copy per trial.
        x = torch.from_numpy(np.array(images)).to(device).unsqueeze(1).float().mul_(x_scale)
        return x, torch.from_numpy(np.array(values)).to(device).float().mul_(y_scale)

    train_t, test_t = data["targets"][cfg.target]
    train_idx, val_idx = mnist_split(len(data["train_x"]), cfg.val_size)
    train_x, train_y = to_device(data["train_x"][train_idx], train_t[train_idx])
    val_x, val_y = to_device(data["train_x"][val_idx], train_t[val_idx])
    test_x, test_y = to_device(data["test_x"], test_t)

    def mse(x, y):
        if len(x) == 0:
            return math.nan
        return torch.mean((predict(model, x, cfg.eval_batch_size) - y) ** 2).item()

    def evaluate(model):
        return {M.VAL_MSE: mse(val_x, val_y), M.TEST_MSE: mse(test_x, test_y)}

    model = RegressionCNN().to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device)
    return fit(model, optimizer, DeviceBatches(train_x, train_y, cfg.batch_size), torch.nn.functional.mse_loss,
               evaluate, report, cfg=cfg, device=device, start=start)
