"""The Kaggle "Histopathologic Cancer Detection" release of PCam, converted once into the official HDF5 layout.

Kaggle ships `train/<id>.tif` (96x96 RGB), `train_labels.csv` (`id,label`) and an unlabelled `test/<id>.tif`.
`prepare_kaggle(src, out)` writes `out` in the layout `study.pcam.data` reads: a stratified, seeded train/valid
split, a test split without a y file, and `ids_<split>.csv` giving each h5 row's Kaggle id (the submission needs
them). Run once from the driver, e.g. `python -c "from study.pcam.kaggle import prepare_kaggle;
prepare_kaggle('kaggle', 'pcam-kaggle')"`; a second call with the same arguments returns at once.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from study.data.locks import step_lock
from study.pcam.data import SHAPE, SPLITS, file_name
from study.pcam.writer import write_split
from study.errors import StudyError
from study.data.progress import Progress

MANIFEST = "kaggle_manifest.json"
BLOCK = 1024  # tifs decoded per block written (1024 * 27 KiB = 28 MiB)


def _ids_of(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise StudyError(f"Kaggle folder {folder} does not exist; expected the unpacked competition data")
    ids = sorted(p.stem for p in folder.glob("*.tif"))
    if not ids:
        raise StudyError(f"{folder} holds no .tif images")
    return ids


def _few(items) -> str:
    items = sorted(items)
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _read_labels(csv: Path, image_ids: list[str]) -> pd.Series:
    """Labels indexed by id, in CSV order, after checking they match the images one to one."""
    if not csv.is_file():
        raise StudyError(f"{csv} not found; expected the competition's train_labels.csv (columns id,label)")
    try:
        table = pd.read_csv(csv, dtype={"id": str})
    except (ValueError, pd.errors.ParserError) as err:
        raise StudyError(f"cannot parse {csv}: {err}")
    if list(table.columns[:2]) != ["id", "label"]:
        raise StudyError(f"{csv} has columns {list(table.columns)}; expected id,label")
    if table.empty:
        raise StudyError(f"{csv} lists no images")
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise StudyError(f"{csv} lists these ids more than once: {_few(set(duplicated))}")
    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = table["id"][~labels.isin([0, 1])]
    if len(bad):
        raise StudyError(f"{csv}: labels must be 0 or 1; ids with other labels: {_few(bad)}")
    without_image = set(table["id"]) - set(image_ids)
    if without_image:
        raise StudyError(f"{csv} lists ids with no image in {csv.parent / 'train'}: {_few(without_image)}")
    without_label = set(image_ids) - set(table["id"])
    if without_label:
        raise StudyError(f"images in {csv.parent / 'train'} have no label in {csv}: {_few(without_label)}")
    return pd.Series(labels.to_numpy(np.uint8), index=table["id"])


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and valid: each class split in the same proportion, rows kept in CSV order."""
    rng = np.random.default_rng(seed)
    valid = []
    for cls in (0, 1):
        rows = np.flatnonzero(labels == cls)
        valid.append(rng.permutation(rows)[: round(val_fraction * len(rows))])
    valid = np.sort(np.concatenate(valid))
    train = np.setdiff1d(np.arange(len(labels)), valid)
    if len(valid) == 0 or len(train) == 0:
        raise StudyError(f"val_fraction {val_fraction} of {len(labels)} images leaves an empty train or valid split")
    return train, valid


def _read_tif(path: Path) -> np.ndarray:
    """The patch's pixels, decoded only after its header says 96x96 RGB: a TIF that declares a huge image (a
    decompression bomb) is refused before a byte of it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big, not huge: refused just below
            with Image.open(path) as img:  # the header only; PIL raises DecompressionBombError for huge sizes
                bands = len(img.getbands())
                declared = (img.height, img.width, *([bands] if bands > 1 else []))  # the shape decoding gives
                if declared != SHAPE:
                    raise StudyError(f"{path} is {declared} {img.mode}; PCam patches are 96x96x3 uint8 RGB")
                pixels = np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise StudyError(f"cannot read {path}: {err}")
    if pixels.shape != SHAPE or pixels.dtype != np.uint8:
        raise StudyError(f"{path} is {pixels.shape} {pixels.dtype}; PCam patches are 96x96x3 uint8 RGB")
    return pixels


def _blocks(folder: Path, ids: list[str], progress: Progress):
    for start in range(0, len(ids), BLOCK):
        yield np.stack([_read_tif(folder / f"{i}.tif") for i in ids[start:start + BLOCK]])
        progress.update(len(ids[start:start + BLOCK]))


def _manifest(src: Path, val_fraction: float, seed: int, test_ids: list[str]) -> dict:
    """What identifies a prepared set: the source folder, its label file and test images, and the arguments."""
    return {"source": str(src), "val_fraction": val_fraction, "seed": seed,
            "train_labels_sha256": hashlib.sha256((src / "train_labels.csv").read_bytes()).hexdigest(),
            "test_ids_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest()}


def _complete(out: Path) -> bool:
    names = [file_name(s, k) for s in SPLITS for k in ("x", "y") if (s, k) != ("test", "y")]
    names += [f"ids_{s}.csv" for s in SPLITS] + [MANIFEST]
    return all((out / n).is_file() for n in names)


def prepare_kaggle(src, out, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Convert the Kaggle folder src into the official HDF5 layout in out (once); return out."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not 0 < val_fraction < 1:
        raise StudyError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if out.exists() and not out.is_dir():
        raise StudyError(f"--prepared-dir {out} is a file; pass a new or empty folder for the converted data")
    train_ids, test_ids = _ids_of(src / "train"), _ids_of(src / "test")
    wanted = _manifest(src, val_fraction, seed, test_ids)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudyError(f"cannot create {out.parent} for the converted data ({err.strerror}); pass a writable "
                         f"--prepared-dir")
    with step_lock(out.parent / f".{out.name}.lock"):  # no lock file outlives a conversion, failed or not
        return _convert(src, out, val_fraction, seed, train_ids, test_ids, wanted)


def _convert(src: Path, out: Path, val_fraction: float, seed: int, train_ids: list, test_ids: list,
             wanted: dict) -> Path:
    """prepare_kaggle's work under its lock: reuse a matching prepared set, else write one atomically."""
    if out.exists() and any(out.iterdir()):
        if _complete(out) and json.loads((out / MANIFEST).read_text()) == wanted:
            return out
        raise StudyError(f"{out} already holds other files (a set prepared from another source or with other "
                         f"arguments?); pass an empty or new folder, or delete it")
    labels = _read_labels(src / "train_labels.csv", train_ids)
    train, valid = _split(labels.to_numpy(), val_fraction, seed)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        progress = Progress(f"converting the Kaggle patches into {out}", len(train_ids) + len(test_ids), "patches")
        with progress:
            for split, rows in (("train", train), ("valid", valid)):
                ids = list(labels.index[rows])
                write_split(tmp, split, _blocks(src / "train", ids, progress), labels.to_numpy()[rows], n=len(ids))
                pd.DataFrame({"id": ids}).to_csv(tmp / f"ids_{split}.csv", index=False)
            write_split(tmp, "test", _blocks(src / "test", test_ids, progress), None, n=len(test_ids))
        pd.DataFrame({"id": test_ids}).to_csv(tmp / "ids_test.csv", index=False)
        (tmp / MANIFEST).write_text(json.dumps(wanted, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_ids(data_dir, split: str) -> list[str] | None:
    """The Kaggle ids of a prepared split in h5 row order, or None when data_dir was not made by prepare_kaggle."""
    path = Path(data_dir).expanduser() / f"ids_{split}.csv"
    file_name(split, "x")  # rejects an unknown split
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"id": str})["id"].tolist()
