"""The official-layout PCam reader on small generated HDF5 files: layouts, .h5.gz, memory maps and every error."""

import gzip
import importlib.util
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from study.pcam import data as pcam, writer as pcam_writer
from study.errors import StudyError

SIZES = {"train": 6, "valid": 4, "test": 5}


def write_set(folder: Path, seed: int = 0, test_labels: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        y = rng.integers(0, 2, n).astype(np.uint8)
        pcam_writer.write_split(folder, split, x, y if split != "test" or test_labels else None)
        arrays[split] = (x, y)
    return arrays


def write_h5(path: Path, name: str, data, **kwargs) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, **kwargs)


@pytest.fixture
def official(tmp_path):
    return tmp_path, write_set(tmp_path)


def test_flat_layout_round_trip_as_memmap(official):
    folder, arrays = official
    files = pcam.locate(folder)
    assert pcam.verify(files) == SIZES
    for split, (x_path, y_path) in files.items():
        assert x_path.parent == folder
        x, y = pcam.load_split(x_path, y_path)
        assert isinstance(x, np.memmap) and not x.flags.writeable
        np.testing.assert_array_equal(x, arrays[split][0])
        assert y.dtype == np.uint8 and y.shape == (SIZES[split],)
        np.testing.assert_array_equal(y, arrays[split][1])


def test_torchvision_layout(tmp_path):
    arrays = write_set(tmp_path / "pcam")
    files = pcam.locate(tmp_path)
    assert all(x.parent == tmp_path / "pcam" for x, _ in files.values())
    x, y = pcam.load_split(*files["valid"])
    np.testing.assert_array_equal(x, arrays["valid"][0])


def gzip_all(folder: Path) -> None:
    for path in folder.glob("*.h5"):
        with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()


def test_gz_is_decompressed_once_into_the_cache(official, capsys):
    folder, arrays = official
    gzip_all(folder)
    files = pcam.locate(folder)
    said = capsys.readouterr().err  # not a terminal: one line per file when done (and every 30 s before)
    for name in ("camelyonpatch_level_2_split_train_x.h5.gz", "camelyonpatch_level_2_split_test_y.h5.gz"):
        size = (folder / name).stat().st_size
        assert f"decompressing {name}: {size:,} compressed bytes in 0 s" in said
    x_path, y_path = files["train"]
    assert x_path.parent == folder / ".pcam-cache" and x_path.suffix == ".h5"
    np.testing.assert_array_equal(pcam.load_split(x_path, y_path)[0], arrays["train"][0])
    stamp = x_path.stat().st_mtime_ns
    assert pcam.locate(folder)["train"][0].stat().st_mtime_ns == stamp
    assert not list((folder / ".pcam-cache").glob("*.tmp"))


def test_gz_in_read_only_folder_goes_to_user_cache(official, tmp_path_factory, monkeypatch):
    folder, _ = official
    gzip_all(folder)
    home_cache = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    monkeypatch.setattr(pcam.os, "access", lambda path, mode: False)  # tests run as root: fake a read-only folder
    x_path, _ = pcam.locate(folder)["valid"]
    assert home_cache / "batchsize-study" in x_path.parents
    assert not (folder / ".pcam-cache").exists()


def test_concurrent_locate_decompresses_consistently(official):
    folder, arrays = official
    gzip_all(folder)
    results, errors = [], []

    def run():
        try:
            results.append(pcam.locate(folder))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len({str(r["train"][0]) for r in results}) == 1
    assert pcam.verify(results[0]) == SIZES


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gzip_names_the_file(official, damage):
    folder, _ = official
    gzip_all(folder)
    bad = folder / (pcam.file_name("valid", "x") + ".gz")
    raw = bad.read_bytes()
    bad.write_bytes(b"\x1f\x8bnot really gzip" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(StudyError, match=bad.name):
        pcam.locate(folder)
    leftovers = [p.name for p in (folder / ".pcam-cache").iterdir() if "valid_x" in p.name]
    assert leftovers == []  # no half-written file under any name, and no lock file


def test_missing_files_are_listed(official):
    folder, _ = official
    (folder / pcam.file_name("valid", "y")).unlink()
    (folder / pcam.file_name("train", "x")).unlink()
    with pytest.raises(StudyError, match="--download") as err:
        pcam.locate(folder)
    assert pcam.file_name("valid", "y") in str(err.value) and pcam.file_name("train", "x") in str(err.value)
    with pytest.raises(StudyError, match="does not exist"):
        pcam.locate(folder / "nowhere")


def test_unlabelled_test_split(tmp_path):
    write_set(tmp_path, test_labels=False)
    files = pcam.locate(tmp_path)
    assert files["test"][1] is None and files["valid"][1] is not None
    assert pcam.verify(files)["test"] == SIZES["test"]
    x, y = pcam.load_split(*files["test"])
    assert y is None and len(x) == SIZES["test"]


def test_truncated_h5_names_the_file(official):
    folder, _ = official
    files = pcam.locate(folder)
    x_path = files["train"][0]
    raw = x_path.read_bytes()
    x_path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(StudyError, match=x_path.name):
        pcam.verify(files)
    with pytest.raises(StudyError, match=x_path.name):
        pcam.load_split(*files["train"])


def test_garbage_label_file_names_the_file(official):
    folder, _ = official
    files = pcam.locate(folder)
    files["valid"][1].write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(300))
    with pytest.raises(StudyError, match=files["valid"][1].name):
        pcam.verify(files)


@pytest.mark.parametrize("kind, name, data, message", [
    ("x", "x", np.zeros((6, 64, 64, 3), np.uint8), "shape"),
    ("x", "x", np.zeros((6, 96, 96, 3), np.float32), "float32"),
    ("x", "images", np.zeros((6, 96, 96, 3), np.uint8), "no dataset 'x'"),
    ("x", "x", np.zeros((0, 96, 96, 3), np.uint8), "no patches"),
    ("y", "y", np.full((6, 1, 1, 1), 2, np.uint8), "label 2"),
    ("y", "y", np.zeros((5, 1, 1, 1), np.uint8), "5 labels"),
    ("y", "y", np.zeros((6, 2), np.uint8), "shape"),
    ("y", "y", np.zeros((6, 1, 1, 1), np.int64), "int64"),
])
def test_bad_contents_are_rejected(official, kind, name, data, message):
    folder, _ = official
    path = folder / pcam.file_name("train", kind)
    write_h5(path, name, data)
    files = pcam.locate(folder)
    with pytest.raises(StudyError, match=message) as err:
        pcam.verify(files)
    assert path.name in str(err.value)


def test_labels_are_checked_in_chunks(official, monkeypatch):
    folder, _ = official
    monkeypatch.setattr(pcam, "LABEL_ROWS", 2)
    y = np.zeros((6, 1, 1, 1), np.uint8)
    y[5] = 7  # only in the last chunk
    write_h5(folder / pcam.file_name("train", "y"), "y", y)
    with pytest.raises(StudyError, match="label 7"):
        pcam.verify(pcam.locate(folder))


def test_chunked_dataset_is_converted_once_to_npy(official, monkeypatch):
    folder, arrays = official
    x = arrays["train"][0]
    x_path = folder / pcam.file_name("train", "x")
    write_h5(x_path, "x", x, chunks=(2, 96, 96, 3), compression="gzip")
    monkeypatch.setattr(pcam, "READ_ROWS", 4)  # convert in several reads
    loaded, _ = pcam.load_split(x_path, None)
    npy = folder / ".pcam-cache" / (x_path.stem + ".npy")
    assert isinstance(loaded, np.memmap) and Path(loaded.filename) == npy
    np.testing.assert_array_equal(loaded, x)
    stamp = npy.stat().st_mtime_ns
    np.testing.assert_array_equal(pcam.load_split(x_path, None)[0], x)
    assert npy.stat().st_mtime_ns == stamp


def test_write_split_streams_blocks(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (7, 96, 96, 3), dtype=np.uint8)
    x_path, y_path = pcam_writer.write_split(tmp_path, "valid", [x[:3], x[3:]], np.ones(7), n=7)
    np.testing.assert_array_equal(pcam.load_split(x_path, y_path)[0], x)
    with pytest.raises(StudyError, match="expected 8"):
        pcam_writer.write_split(tmp_path, "valid", [x], None, n=8)
    with pytest.raises(StudyError, match="unknown PCam split"):
        pcam_writer.write_split(tmp_path, "val", x, None)


def test_synthetic_set_is_deterministic_balanced_and_learnable(tmp_path):
    a = pcam_writer.make_synthetic(tmp_path / "a", seed=3)
    b = pcam_writer.make_synthetic(tmp_path / "b", seed=3)
    c = pcam_writer.make_synthetic(tmp_path / "c", seed=4)
    files = pcam.locate(a)
    assert pcam.verify(files) == {"train": 64, "valid": 24, "test": 24}
    xa, ya = pcam.load_split(*files["train"])
    xb, yb = pcam.load_split(*pcam.locate(b)["train"])
    xc, _ = pcam.load_split(*pcam.locate(c)["train"])
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(xa, xc)
    assert ya.sum() == 32
    # The signal a CNN finds first: tumour patches hold more dark nuclei, so are darker on average.
    darkness = -xa.reshape(64, -1).mean(axis=1)
    threshold = np.median(darkness)
    assert ((darkness > threshold) == ya.astype(bool)).mean() >= 0.85


def with_gdown(monkeypatch, present: bool) -> None:
    """gdown (the pcam extra) as installed or not, whatever this environment has."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if present else None) if name == "gdown" else real(name, *a))


def test_download_without_gdown_names_the_extra_before_fetching(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "PCAM", lambda *a, **k: pytest.fail("fetched without gdown"))
    with_gdown(monkeypatch, False)
    with pytest.raises(StudyError, match=r"needs the gdown package: pip install 'batchsize-study\[pcam\]'"):
        pcam.download(tmp_path)


def test_download_failure_is_a_study_error(tmp_path, monkeypatch):
    import torchvision.datasets

    with_gdown(monkeypatch, True)
    calls = []

    def offline(root, split, download):
        calls.append(split)
        raise RuntimeError("no internet")

    monkeypatch.setattr(torchvision.datasets, "PCAM", offline)
    with pytest.raises(StudyError, match="failed: no internet"):
        pcam.download(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "PCAM", lambda root, split, download: calls.append(split))
    assert pcam.download(tmp_path) == tmp_path / "pcam"
    assert calls == ["train", "train", "val", "test"]


def test_empty_h5_names_the_file(official):
    folder, _ = official
    empty = folder / pcam.file_name("test", "y")
    empty.write_bytes(b"")
    with pytest.raises(StudyError, match=empty.name):
        pcam.verify(pcam.locate(folder))
