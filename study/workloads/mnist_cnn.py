"""MNIST classification with the simple CNN of Shallue et al. 2019 ("Measuring the effects of data parallelism on
neural network training"): conv 5x5 32 + max-pool, conv 5x5 64 + max-pool, fc 1024, fc 10.

`python -m study run mnist-cnn --data-dir DIR` (the four idx files; --download fetches them), or `--smoke` on
built-in synthetic digits. The validation split is --val-size training images drawn at random, stratified by digit
and seeded by --split-seed (study.data.validation: MNIST's last training images are easier than the rest, so the
last N, --val-split tail, make every goal easier; studies stored before 2026-12-07 used them and resume with them);
the test split is MNIST's own 10,000.
"""

import math

import torch
from torch import nn

from study.data import mnist as mnist_data
from study.data import validation
from study.errors import StudyError
from study.workload import Goal, Metric, Option, Workload

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and standard deviation on the 0..1 scale


def load(options: dict) -> dict:
    if options["synthetic"]:
        data = mnist_data.load_synthetic(1024 + options["val_size"], 256)
    elif not options["data_dir"]:
        raise StudyError("no data: pass --data-dir DIR (add --download to fetch MNIST there), or --smoke")
    else:
        try:
            data = mnist_data.load(options["data_dir"])
        except StudyError:
            if not options["download"]:
                raise
            mnist_data.download(options["data_dir"])
            data = mnist_data.load(options["data_dir"])
    (train_x, train_y), (val_x, val_y) = validation.carve(data.train_x, data.train_y, options, classes=True)
    if options["train_limit"]:
        train_x, train_y = train_x[:options["train_limit"]], train_y[:options["train_limit"]]
    labels = lambda y: y.astype("int64")  # noqa: E731 (cross_entropy wants int64 class indices)
    return {"train": (train_x, labels(train_y)), "val": (val_x, labels(val_y)),
            "test": (data.test_x, labels(data.test_y))}


def model(options: dict) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 1024), nn.ReLU(), nn.Linear(1024, 10))


def prepare(x: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float, normalised."""
    return (x.unsqueeze(1).float() / 255 - MEAN) / STD


def evaluate(outputs: torch.Tensor, y: torch.Tensor) -> dict:
    return {"error": (outputs.argmax(1) != y).float().mean().item(),
            "loss": nn.functional.cross_entropy(outputs, y).item()}


workload = Workload(
    name="mnist-cnn", unit="images",
    summary="MNIST digits, the simple CNN of Shallue et al. 2019 (2 conv + 2 fc); goal 1 % validation error",
    load=load, model=model, loss=nn.functional.cross_entropy, prepare=prepare, evaluate=evaluate,
    metrics=(Metric("error", False, bounds=(0, 1)), Metric("loss", False, bounds=(0, math.inf))), primary="val_error",
    goals=(Goal("val_error", 0.01),), chance={"val_error": 0.9, "test_error": 0.9},
    defaults=dict(batch_sizes=[16, 32, 64, 128, 256, 512, 1024], optimizers=["nesterov"], lrs=[0.01, 0.03, 0.1],
                  epochs=10, seeds=[0, 1, 2], momentum=0.9),
    smoke=dict(batch_sizes=[32, 128], optimizers=["nesterov"], lrs=[0.05], epochs=2, seeds=[0],
               options={"synthetic": True, "val_size": 256}),
    options=(Option("data_dir", str, "", "folder with the four MNIST idx files (.gz or not)"),
             Option("download", bool, False, "fetch MNIST through torchvision into --data-dir"),
             Option("synthetic", bool, False, "built-in synthetic digits instead of MNIST (what --smoke uses)"),
             Option("val_size", int, 10_000, "training images held out as the validation split (--val-split)"),
             *validation.options(before="tail", classes=True),
             Option("train_limit", int, 0, "train on the first N of the remaining training images (0: all)")),
)
