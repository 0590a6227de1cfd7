"""PatchCamelyon with VGG16 (ImageNet weights, the first two conv blocks frozen; study.pcam.model), as in "The
influence of batch size on CNN performance ... for histopathology image categorisation": 96x96 patches, tumour
or not, flips, 90-degree rotations, zoom and brightness on the device (study.pcam.augment); the best-on-validation
weights (by validation accuracy) are tested once at the end.

`python -m study run pcam --data-dir DIR` (the official HDF5 files, .h5 or .h5.gz, or the Kaggle "Histopathologic
Cancer Detection" folder, converted once); `--smoke` trains on a generated PCam-like set. The splits are memory
maps of the files: each trial opens them itself, and batches are read from them unless the split fits the trial's
GPU memory (study.engine.memory.plan_uploads). `python -m study.pcam` is the same study with the original's flags.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score

from study import metrics as M
from study.pcam.augment import to_input
from study.pcam import kaggle
from study.pcam import data as pcam_data, writer as pcam_writer
from study.errors import StudyError
from study.pcam.model import VGG16Patches, vgg16_features_state
from study.pcam.options import OPTIONS, check_options
from study.workload import Goal, Metric, Workload

BATCH_SIZES = (32, 64, 128, 256, 512)  # the original's grid
LRS = {"sgd": (0.002, 0.0002), "adam": (0.001, 0.0001)}  # the original's learning rates per optimizer (its tables)
SMOKE_SIZES = dict(n_train=48, n_valid=16, n_test=24)
SMOKE_FOLDER = "batchsize-study-pcam-smoke"  # under the system's temporary folder


def data_folder(options: dict) -> Path:
    """The folder of the official HDF5 layout: the generated smoke set, Kaggle data converted once, or --data-dir
    (downloaded there with --download when the files are missing, once per node, under a file lock)."""
    if options["synthetic"]:
        folder = Path(tempfile.gettempdir()) / SMOKE_FOLDER
        if not (folder / pcam_data.file_name("test", "y")).is_file():
            pcam_writer.make_synthetic(folder, **SMOKE_SIZES)
        return folder
    if not options["data_dir"]:
        raise StudyError("no data: pass --data-dir DIR (add --download to fetch PCam there), or --smoke")
    root = Path(options["data_dir"]).expanduser().resolve()
    if (root / "train_labels.csv").is_file():
        return kaggle.prepare_kaggle(root, Path(options["prepared_dir"] or root / "prepared-h5"),
                                     options["val_fraction"], options["split_seed"])
    if options["download"]:
        pcam_data.locate_or_fetch(root)
    return root


def load(options: dict) -> dict:
    """Memory maps of the three splits (x uint8 (N, 96, 96, 3), y uint8; the Kaggle test split has no labels).
    The driver calls it first, before Ray starts (python -m study.pcam checks the options earlier still)."""
    check_options(options)
    files = pcam_data.locate(data_folder(options))
    pcam_data.verify(files)
    splits = {name: pcam_data.load_split(*files[split])
              for name, split in (("train", "train"), ("val", "valid"), ("test", "test"))}
    if options["train_limit"]:
        x, y = splits["train"]
        splits["train"] = x[:options["train_limit"]], y[:options["train_limit"]]
    return splits


def model(options: dict) -> torch.nn.Module:
    return VGG16Patches(vgg16_features_state(options["weights"]), options["freeze_blocks"])


def prepare(x: torch.Tensor) -> torch.Tensor:
    return to_input(x, train=False)


def prepare_train(x: torch.Tensor, generator: torch.Generator, options: dict) -> torch.Tensor:
    return to_input(x, generator=generator, flip=not options["no_flip"], rot90=not options["no_rot90"],
                    zoom=options["zoom"], brightness=options["brightness"])


def probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)


def evaluate(outputs: torch.Tensor, y: torch.Tensor) -> dict:
    p, labels = probabilities(outputs), y.cpu().numpy()
    return {"auc": auc(labels, p), "acc": float(np.mean((p >= 0.5) == labels)), "loss": bce(labels, p)}


def files(outputs: torch.Tensor, y: torch.Tensor | None, options: dict) -> dict:
    """The test split's predictions (index, label, probability) and, for Kaggle data, its submission.csv."""
    p, out = probabilities(outputs), {}
    if y is not None:
        table = pd.DataFrame({"index": np.arange(len(p)), "label": y.cpu().numpy().astype(int), "probability": p})
        out[M.PREDICTIONS_FILE] = lambda path: table.to_csv(path, index=False)
    ids = kaggle.read_ids(data_folder(options), "test")
    if ids is not None:
        out[M.SUBMISSION_FILE] = lambda path: pd.DataFrame({"id": ids, "label": p}).to_csv(path, index=False)
    return out


def bce(labels: np.ndarray, p: np.ndarray) -> float:
    """Binary cross-entropy (scikit-learn's log_loss, p clipped to its dtype's epsilon); NaN for a NaN model."""
    if not np.all(np.isfinite(p)):
        return math.nan
    return float(log_loss(labels, p, labels=[0, 1]))


def auc(labels: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when a split holds one class only or the model produced NaN."""
    if len(np.unique(labels)) < 2 or not np.all(np.isfinite(p)):
        return math.nan
    return float(roc_auc_score(labels, p))


workload = Workload(
    name="pcam", unit="images",
    summary="PatchCamelyon 96x96 patches, VGG16 fine-tuned (ImageNet weights), best-on-validation model tested",
    load=load, model=model, loss=torch.nn.functional.binary_cross_entropy_with_logits, prepare=prepare,
    prepare_train=prepare_train, evaluate=evaluate, files=files, memory_mapped=True, channels_last=True,
    metrics=(Metric("auc", True), Metric("acc", True), Metric("loss", False)), primary="val_auc",
    select="val_acc", chance={"val_auc": 0.5, "test_auc": 0.5},
    goals=(Goal("val_auc", 0.90),),  # the steps-to-result goal: our choice, not a paper's (--goal val_auc=VALUE)
    # The grid is a product: the original's SGD half (its Adam rates with --optimizers adam --lrs 0.001 0.0001;
    # python -m study.pcam runs both halves as the original's (optimizer, lr) pairs).
    defaults=dict(batch_sizes=list(BATCH_SIZES), optimizers=["sgd"], lrs=list(LRS["sgd"]), epochs=55,
                  seeds=[0], momentum=0.9, eval_batch_size=512, amp="on"),
    smoke=dict(batch_sizes=[8], optimizers=["sgd"], lrs=[0.01], epochs=2, seeds=[0], eval_batch_size=32,
               noise_every=1, options={"synthetic": True, "weights": "none"}),
    options=OPTIONS,
)
