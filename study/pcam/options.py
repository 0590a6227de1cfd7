"""The pcam workload's own options (study.pcam.workload): declared, each a flag of `python -m study run pcam` and
`python -m study.pcam`, and their ranges checked by flag before any data is read. Imports no torch."""

from pathlib import Path

from study.errors import StudyError
from study.workload import Option

OPTIONS = (
    Option("data_dir", str, "", "official PCam HDF5 files, or the Kaggle layout (train/, train_labels.csv)"),
    Option("download", bool, False, "fetch PCam through torchvision into --data-dir"),
    Option("prepared_dir", str, "", "where Kaggle data is converted to HDF5 (default DATA_DIR/prepared-h5)"),
    Option("val_fraction", float, 0.2, "Kaggle data: validation share"),
    Option("split_seed", int, 0, "Kaggle data: seed of the stratified split"),
    Option("train_limit", int, 0, "use only the first N training patches (0: all)"),
    Option("synthetic", bool, False, "a generated PCam-like set (what --smoke uses)"),
    Option("weights", str, "imagenet", "imagenet (torchvision's cache), none (random init) or a state_dict"),
    Option("freeze_blocks", int, 2, "VGG16 conv blocks kept frozen"),
    Option("no_flip", bool, False, "no random horizontal and vertical flips"),
    Option("no_rot90", bool, False, "no random 90-degree rotations"),
    Option("zoom", float, 0.1, "random zoom up to this fraction (0 disables)"),
    Option("brightness", float, 0.1, "random brightness up to this fraction"),
)


def check_options(o: dict) -> None:
    """The options' ranges (their types: Workload.option_values), refused by flag before any data is read: the
    workload's load() calls it, and python -m study.pcam before it prepares the data."""
    for name, ok, must in (("zoom", 0 <= o["zoom"] < 1, "a finite number in [0, 1)"),  # NaN fails every bound
                           ("brightness", 0 <= o["brightness"] < 1, "a finite number in [0, 1)"),
                           ("val_fraction", 0 < o["val_fraction"] < 1, "a finite number in (0, 1)"),
                           ("train_limit", o["train_limit"] >= 0, ">= 0"), ("split_seed", o["split_seed"] >= 0, ">= 0"),
                           ("freeze_blocks", 0 <= o["freeze_blocks"] <= 5, "in 0..5 (VGG16 has five conv blocks)")):
        if not ok:
            raise StudyError(f"--{name.replace('_', '-')} must be {must}, got {o[name]}")
    if o["weights"] not in ("imagenet", "none") and not Path(o["weights"]).expanduser().is_file():
        raise StudyError(f"--weights {o['weights']} is not a file; pass imagenet, none, or a saved VGG16 state_dict")
