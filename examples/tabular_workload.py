"""A tabular workload: scikit-learn's breast-cancer table (569 rows, 30 numeric features, benign or malignant) with
a small MLP. Copy this file for data that is a table of numbers: no `prepare`, the features go to the model as
`load` returns them (float32), and the metrics include the ROC AUC, computed on a whole split at once.

    python -m study run examples/tabular_workload.py --smoke
    python -m study run examples/tabular_workload.py --batch-sizes 8 32 128 --lrs 0.001 0.003 --width 128
"""

import numpy as np
from torch import nn

from study.workload import Goal, Metric, Option, Workload


def load(options):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)  # float64 features on very different scales, labels 0/1
    order = np.random.default_rng(0).permutation(len(x))  # a fixed split, the same for every trial
    x, y = x[order], y[order].astype(np.int64)  # int64 class labels: what cross_entropy takes
    mean, std = x[:369].mean(0), x[:369].std(0)  # the training rows' statistics only: val and test stay unseen
    x = ((x - mean) / std).astype(np.float32)  # float32: the model's weights are float32
    return {"train": (x[:369], y[:369]), "val": (x[369:469], y[369:469]), "test": (x[469:], y[469:])}


def model(options):
    width = options["width"]
    return nn.Sequential(nn.Linear(30, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


def evaluate(outputs, y):  # a whole split: an AUC ranks every example against every other, so no batch means
    from sklearn.metrics import roc_auc_score

    malignant = outputs.softmax(1)[:, 0].cpu().numpy()  # class 0 is malignant in this table
    return {"error": (outputs.argmax(1) != y).float().mean().item(),
            "auc": roc_auc_score(y.cpu().numpy() == 0, malignant),
            "loss": nn.functional.cross_entropy(outputs, y).item()}


workload = Workload(
    name="breast-cancer-mlp",
    summary="scikit-learn's breast-cancer table, a two-layer MLP (a tabular example to copy)",
    load=load, model=model, loss=nn.functional.cross_entropy, evaluate=evaluate,
    metrics=(Metric("error", False), Metric("auc", True), Metric("loss", False)), primary="val_error",
    goals=(Goal("val_error", 0.05),), chance={"val_error": 0.37, "val_auc": 0.5},  # 37 % of the rows are malignant
    defaults=dict(batch_sizes=[8, 16, 32, 64, 128], optimizers=["adam"], lrs=[0.001, 0.003], epochs=20,
                  seeds=[0, 1, 2]),
    smoke=dict(batch_sizes=[16, 64], lrs=[0.003], epochs=3, seeds=[0, 1]),
    options=(Option("width", int, 64, "hidden units of each of the two hidden layers"),),
)
