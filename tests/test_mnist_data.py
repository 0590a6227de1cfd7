import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from study.data import mnist
from study.mnist import targets as regression_targets
from study.errors import StudyError


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_mnist(folder, n_train=20, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), 2049)
    return folder


def test_real_files_match_published_facts(mnist_dir):
    data = mnist.load(mnist_dir)
    assert data.train_x.shape == (60000, 28, 28) and data.test_x.shape == (10000, 28, 28)
    assert data.train_x.mean() == pytest.approx(33.3184, abs=1e-4)
    assert data.test_x.mean() == pytest.approx(33.7912, abs=1e-4)
    assert np.bincount(data.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize("gz", [False, True])
def test_plain_gz_and_torchvision_layouts(tmp_path, gz):
    flat = fake_mnist(tmp_path / "flat", gz=gz)
    nested = tmp_path / "tv"
    shutil.copytree(flat, nested / "MNIST" / "raw")
    for root in (flat, nested):
        data = mnist.load(root)
        assert data.train_x.shape == (20, 28, 28) and data.test_y.shape == (10,)
    assert np.array_equal(mnist.load(flat).train_x, mnist.load(nested).train_x)


def test_limit_cuts_both_splits(tmp_path):
    data = mnist.load(fake_mnist(tmp_path)).limit(5, 3)
    assert len(data.train_x) == len(data.train_y) == 5 and len(data.test_x) == 3


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(StudyError, match="does not exist.*--download"):
        mnist.load(tmp_path / "nowhere")
    folder = fake_mnist(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(StudyError, match="t10k-labels-idx1-ubyte"):
        mnist.load(folder)


def test_wrong_magic_truncated_and_corrupt(tmp_path):
    folder = fake_mnist(tmp_path / "magic")
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros((20, 28, 28)), 2051)  # images where labels belong
    with pytest.raises(StudyError, match="magic number 2051, expected 2049"):
        mnist.load(folder)

    folder = fake_mnist(tmp_path / "cut")
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StudyError, match="truncated"):
        mnist.load(folder)

    folder = fake_mnist(tmp_path / "gz", gz=True)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(StudyError, match="cannot read.*t10k-images"):
        mnist.load(folder)


def test_images_and_labels_disagree(tmp_path):
    folder = fake_mnist(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(19), 2049)
    with pytest.raises(StudyError, match="20 images but 19 labels"):
        mnist.load(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.full(20, 12), 2049)
    with pytest.raises(StudyError, match="label 12"):
        mnist.load(folder)


def test_targets_on_known_images():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, :14] = 255  # half the pixels at 255: mean 127.5, median 127.5, std 127.5, var 16256.25
    img[1, 0, :4] = [10, 20, 30, 40]  # four inked pixels among 784
    assert regression_targets.targets(img, "mean").tolist() == pytest.approx([127.5, 100 / 784])
    assert regression_targets.targets(img, "median").tolist() == [127.5, 0.0]
    assert regression_targets.targets(img, "std")[0] == pytest.approx(127.5)
    assert regression_targets.targets(img, "var")[0] == pytest.approx(127.5**2)
    second = np.array([10, 20, 30, 40] + [0] * 780, float)
    assert regression_targets.targets(img, "var")[1] == pytest.approx(second.var(), rel=1e-6)
    with pytest.raises(StudyError):
        regression_targets.targets(img, "mode")


def test_synthetic_digits_are_deterministic_and_digit_like():
    a, b = mnist.synthetic(200, 20, seed=1), mnist.synthetic(200, 20, seed=1)
    assert np.array_equal(a.train_x, b.train_x) and a.train_x.dtype == np.uint8
    ink = (a.train_x > 0).mean(axis=(1, 2))
    assert 0.05 < ink.mean() < 0.4  # mostly background, as MNIST
    eights, ones = a.train_x[a.train_y == 8], a.train_x[a.train_y == 1]
    assert eights.mean() > ones.mean()  # an 8 has more strokes than a 1
    assert not np.array_equal(a.train_x, mnist.synthetic(200, 20, seed=2).train_x)


def test_smoke_digits_go_through_the_idx_reader(tmp_path, monkeypatch):
    """load_synthetic writes the four idx files (the same bytes as MNIST's format, checked against this file's own
    writer) and reads them back with load(); the temporary folder is gone after."""
    images = mnist.synthetic(30, 10).train_x
    mnist.write_idx(tmp_path / "ours", images)
    write_idx(tmp_path / "theirs", images, 2051)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    read, folders = mnist.load, []
    monkeypatch.setattr(mnist, "load", lambda folder: folders.append(folder) or read(folder))
    data, expected = mnist.load_synthetic(40, 12, seed=5), mnist.synthetic(40, 12, seed=5)
    assert len(folders) == 1 and not Path(folders[0]).exists()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(data, key), getattr(expected, key)), key


def test_target_stats_are_box_plot_statistics():
    images = mnist.synthetic(300, 10).train_x
    stats = regression_targets.target_stats(images)
    means = regression_targets.targets(images, "mean")
    assert stats["mean"]["med"] == pytest.approx(float(np.median(means)), rel=1e-6)
    for s in stats.values():
        assert s["whislo"] <= s["q1"] <= s["med"] <= s["q3"] <= s["whishi"] and s["n"] == 300


def test_empty_file_and_wrong_image_shape(tmp_path):
    folder = fake_mnist(tmp_path / "empty")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(StudyError, match="t10k-labels-idx1-ubyte"):
        mnist.load(folder)
    folder = fake_mnist(tmp_path / "shape")
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((20, 32, 32)), 2051)
    with pytest.raises(StudyError, match="28x28"):
        mnist.load(folder)


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(StudyError, match="downloading MNIST .* failed: no network.*--data-dir"):
        mnist.download(tmp_path)
