"""Kaggle-layout conversion: on the real sample patches (skipped without ../shared) and on generated folders."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from study.pcam import kaggle

from study.pcam import data as pcam
from study.errors import StudyError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam-kaggle-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Kaggle sample not present at {SAMPLE}")


def read_tif(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def valid_ids(out: Path) -> list[str]:
    return kaggle.read_ids(out, "valid")


@needs_sample
def test_real_sample_is_preserved(tmp_path):
    out = kaggle.prepare_kaggle(SAMPLE, tmp_path / "prepared")
    files = pcam.locate(out)
    counts = pcam.verify(files)
    table = pd.read_csv(SAMPLE / "train_labels.csv", dtype={"id": str}).set_index("id")["label"]
    test_tifs = sorted(p.stem for p in (SAMPLE / "test").glob("*.tif"))
    assert counts["train"] + counts["valid"] == len(table) and counts["test"] == len(test_tifs)
    seen = []
    for split in ("train", "valid"):
        ids = kaggle.read_ids(out, split)
        x, y = pcam.load_split(*files[split])
        np.testing.assert_array_equal(y, table[ids].to_numpy())
        np.testing.assert_array_equal(x, np.stack([read_tif(SAMPLE / "train" / f"{i}.tif") for i in ids]))
        seen += ids
    assert sorted(seen) == sorted(table.index)
    x, y = pcam.load_split(*files["test"])
    assert y is None and files["test"][1] is None
    assert kaggle.read_ids(out, "test") == test_tifs
    np.testing.assert_array_equal(x, np.stack([read_tif(SAMPLE / "test" / f"{i}.tif") for i in test_tifs]))


@needs_sample
def test_real_sample_split_is_stratified_and_seeded(tmp_path):
    labels = pd.read_csv(SAMPLE / "train_labels.csv", dtype={"id": str}).set_index("id")["label"]
    runs = {name: kaggle.prepare_kaggle(SAMPLE, tmp_path / name, val_fraction=0.2, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    ids = {name: valid_ids(out) for name, out in runs.items()}
    for cls in (0, 1):
        assert (labels[ids["a"]] == cls).sum() == round(0.2 * (labels == cls).sum())
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["c"]


@needs_sample
def test_prepared_set_is_reused_not_redone(tmp_path):
    out = kaggle.prepare_kaggle(SAMPLE, tmp_path / "prepared")
    x_path = out / pcam.file_name("train", "x")
    stamp = x_path.stat().st_mtime_ns
    assert kaggle.prepare_kaggle(SAMPLE, out) == out
    assert x_path.stat().st_mtime_ns == stamp
    with pytest.raises(StudyError, match="already holds"):
        kaggle.prepare_kaggle(SAMPLE, out, seed=5)


def make_folder(root: Path, n_train: int = 8, n_test: int = 3, labels=None) -> Path:
    """A Kaggle-layout folder of random 96x96 RGB tifs with alternating labels."""
    rng = np.random.default_rng(0)
    for sub, n in (("train", n_train), ("test", n_test)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / sub / f"{sub}{i:03d}.tif")
    ids = [f"train{i:03d}" for i in range(n_train)]
    labels = [i % 2 for i in range(n_train)] if labels is None else labels
    pd.DataFrame({"id": ids, "label": labels}).to_csv(root / "train_labels.csv", index=False)
    return root


def test_generated_folder_round_trip(tmp_path):
    src = make_folder(tmp_path / "src")
    out = kaggle.prepare_kaggle(src, tmp_path / "out", val_fraction=0.25)
    assert pcam.verify(pcam.locate(out)) == {"train": 6, "valid": 2, "test": 3}
    assert kaggle.read_ids(tmp_path, "train") is None
    with pytest.raises(StudyError, match="unknown PCam split"):
        kaggle.read_ids(out, "val")


def append_row(src: Path, row: str) -> None:
    with open(src / "train_labels.csv", "a") as f:
        f.write(row + "\n")


def break_missing_image(src):
    append_row(src, "ghost,1")


def break_unlabelled_image(src):
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(src / "train" / "stray.tif")


def break_duplicate(src):
    append_row(src, "train001,1")


def break_label(src):
    table = pd.read_csv(src / "train_labels.csv")
    table.loc[2, "label"] = 2
    table.to_csv(src / "train_labels.csv", index=False)


def break_size(src):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src / "train" / "train003.tif")


def break_channels(src):
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(src / "test" / "test001.tif")


def break_empty_train(src):
    for path in (src / "train").glob("*.tif"):
        path.unlink()


def break_empty_test(src):
    for path in (src / "test").glob("*.tif"):
        path.unlink()


def break_header(src):
    (src / "train_labels.csv").write_text("name,cls\ntrain000,0\n")


@pytest.mark.parametrize("damage, message", [
    (break_missing_image, "no image.*ghost"),
    (break_unlabelled_image, "no label.*stray"),
    (break_duplicate, "more than once: train001"),
    (break_label, "0 or 1.*train002"),
    (break_size, "train003.tif is \\(64, 64, 3\\)"),
    (break_channels, "test001.tif is \\(96, 96\\)"),
    (break_empty_train, "train holds no .tif"),
    (break_empty_test, "test holds no .tif"),
    (break_header, "expected id,label"),
])
def test_bad_folders_leave_nothing_behind(tmp_path, damage, message):
    src = make_folder(tmp_path / "src")
    damage(src)
    out = tmp_path / "work" / "out"
    with pytest.raises(StudyError, match=message):
        kaggle.prepare_kaggle(src, out)
    assert not out.exists()
    left = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    assert left in ([], [".out.lock"])


def test_bad_val_fraction_and_occupied_out(tmp_path):
    src = make_folder(tmp_path / "src", n_train=4)
    with pytest.raises(StudyError, match="val_fraction"):
        kaggle.prepare_kaggle(src, tmp_path / "out", val_fraction=1.0)
    with pytest.raises(StudyError, match="empty train or valid"):
        kaggle.prepare_kaggle(src, tmp_path / "out", val_fraction=0.05)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="already holds"):
        kaggle.prepare_kaggle(src, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
