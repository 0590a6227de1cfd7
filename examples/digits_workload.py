"""A complete custom workload: scikit-learn's 8x8 digits with a small CNN. Copy this file, change what is yours.

    python -m study run examples/digits_workload.py --smoke
    python -m study run examples/digits_workload.py --batch-sizes 8 32 128 --lrs 0.05 0.1 --runs 3
"""

import numpy as np
from torch import nn

from study.workload import Goal, Metric, Option, Workload


def load(options):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # 1797 images of 8x8 pixels, 0..16
    order = np.random.default_rng(0).permutation(len(x))  # a fixed split, the same for every trial
    x, y = (x[order] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8), y[order].astype(np.int64)
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500]), "test": (x[1500:], y[1500:])}


def model(options):
    width = options["width"]
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * 4, 10))


def prepare(x):  # on the device: (B, 8, 8) uint8 -> (B, 1, 8, 8) float in 0..1
    return x.unsqueeze(1).float() / 255


def evaluate(outputs, y):
    return {"error": (outputs.argmax(1) != y).float().mean().item(),
            "loss": nn.functional.cross_entropy(outputs, y).item()}


workload = Workload(
    name="digits-cnn", unit="images",
    summary="scikit-learn's 8x8 digits, a two-layer CNN (an example to copy)",
    load=load, model=model, loss=nn.functional.cross_entropy, prepare=prepare, evaluate=evaluate,
    metrics=(Metric("error", False), Metric("loss", False)), primary="val_error",
    goals=(Goal("val_error", 0.05),), chance={"val_error": 0.9},
    defaults=dict(batch_sizes=[8, 16, 32, 64, 128], optimizers=["sgd"], lrs=[0.05, 0.1], epochs=10, seeds=[0, 1]),
    smoke=dict(batch_sizes=[16, 64], lrs=[0.1], epochs=3, seeds=[0]),
    options=(Option("width", int, 16, "filters of the first convolution"),),
)
