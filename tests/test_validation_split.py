"""The validation split a workload carves from its training file (study.data.validation): a seeded random sample,
stratified by class where there are classes, or the last rows ("tail") that studies stored before it existed used
and resume with. Fast: no Ray, no training."""

import json

import numpy as np
import pytest

from study.commands import run_command
from study.__main__ import main
from study.data import cifar
from study.data import mnist as mnist_data
from study.data.validation import carve, indices
from study.errors import StudyError
from study.workload import resolve
from study.workloads import cifar10_resnet8, mnist_cnn
from study.mnist import workload as mnist_regression

UNEVEN = np.repeat(np.arange(7), [400, 13, 250, 1, 90, 77, 169])  # 1,000 rows, one class of a single row
np.random.default_rng(5).shuffle(UNEVEN)


def check_stratified(labels: np.ndarray, val: np.ndarray) -> None:
    """Every class's count in the split is its share of the file, rounded down or up."""
    classes, counts = np.unique(labels, return_counts=True)
    got = np.array([(labels[val] == c).sum() for c in classes])
    share = len(val) * counts / len(labels)
    assert np.all((got == np.floor(share)) | (got == np.ceil(share))), (got, share)


@pytest.mark.parametrize("size", [1, 6, 7, 100, 333, 999])
def test_random_split_is_disjoint_complete_sized_and_stratified(size):
    train, val = indices(len(UNEVEN), size, "random", 3, UNEVEN)
    assert len(val) == size and len(train) == len(UNEVEN) - size
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(UNEVEN)))  # disjoint, every row
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # ascending: file order kept
    check_stratified(UNEVEN, val)


def test_random_split_is_the_same_for_a_seed_and_another_for_another_seed():
    first, again, other = (indices(len(UNEVEN), 200, "random", seed, UNEVEN)[1] for seed in (0, 0, 1))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    plain, plain_other = (indices(1000, 200, "random", seed)[1] for seed in (0, 1))
    assert not np.array_equal(plain, plain_other)


def test_a_split_without_classes_is_the_original_regression_hold_out():
    """study.mnist's hold-out since it was first built (seed 0, not stratified): the before/after equality tests
    of the MNIST regression study rely on the same rows."""
    order = np.random.default_rng(0).permutation(1000)
    train, val = indices(1000, 100, "random", 0)
    assert np.array_equal(val, np.sort(order[:100])) and np.array_equal(train, np.sort(order[100:]))
    assert len(indices(1000, 0, "random", 0)[1]) == 0  # its batch sweep holds out nothing


def test_tail_is_the_last_rows_and_bad_sizes_are_refused():
    x, y = np.arange(50) * 10, np.arange(50) % 5
    (train_x, train_y), (val_x, val_y) = carve(x, y, dict(val_size=8, val_split="tail", split_seed=0), classes=True)
    assert np.array_equal(val_x, x[-8:]) and np.array_equal(train_x, x[:-8]) and np.array_equal(val_y, y[-8:])
    for size in (0, -1, 50, 51):
        with pytest.raises(StudyError, match=f"^--val-size must be in 1..49, got {size}$"):
            carve(x, y, dict(val_size=size, val_split="random", split_seed=0), classes=True)


def test_mnist_cnn_validates_on_a_stratified_sample_and_tests_on_mnists_own():
    options = mnist_cnn.workload.option_values({"synthetic": True, "val_size": 300})
    data = mnist_data.load_synthetic(1024 + 300, 256)
    splits = mnist_cnn.load(options)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [1024, 300, 256]
    assert not np.array_equal(splits["val"][1], data.train_y[-300:])
    check_stratified(data.train_y, indices(len(data.train_y), 300, "random", 0, data.train_y)[1])
    assert np.array_equal(splits["test"][0], data.test_x) and np.array_equal(splits["test"][1], data.test_y)
    rows = {x.tobytes() for x in splits["train"][0]}
    assert not any(x.tobytes() in rows for x in splits["val"][0])  # no image both trained on and validated on
    tail = mnist_cnn.load(dict(options, val_split="tail"))  # the old rows, exactly
    assert np.array_equal(tail["val"][0], data.train_x[-300:]) and np.array_equal(tail["train"][0], data.train_x[:-300])
    other = mnist_cnn.load(dict(options, split_seed=1))
    assert not np.array_equal(other["val"][0], splits["val"][0])
    with pytest.raises(StudyError, match="^--val-size must be in 1..1023, got 0$"):
        mnist_cnn.load(dict(options, val_size=0))


def test_cifar_validates_on_a_stratified_sample():
    data = cifar.load_synthetic()
    x, y = data["train"]
    options = cifar10_resnet8.workload.option_values({"synthetic": True, "val_size": 120})
    splits = cifar10_resnet8.load(options)
    val = indices(len(x), 120, "random", 0, y)[1]
    assert np.array_equal(splits["val"][0], x[val]) and np.array_equal(splits["val"][1], y[val])
    check_stratified(y, val)
    assert np.array_equal(splits["test"][0], data["test"][0])
    tail = cifar10_resnet8.load(dict(options, val_split="tail"))
    assert np.array_equal(tail["val"][0], x[-120:])
    with pytest.raises(StudyError, match=f"^--val-size must be in 1..{len(x) - 1}, got {len(x)}$"):
        cifar10_resnet8.load(dict(options, val_size=len(x)))


def test_on_real_mnist_the_random_split_is_not_the_tail(mnist_dir):
    """MNIST's last training rows are easier than the rest (tests/ cannot afford the training that shows it; the
    issue and docs/workloads.md give the measurement): the default split must be another sample, stratified."""
    labels = mnist_data.load(mnist_dir).train_y
    train, val = indices(len(labels), 10_000, "random", 0, labels)
    assert np.array_equal(np.bincount(labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    check_stratified(labels, val)
    tail = np.arange(50_000, 60_000)
    assert not np.array_equal(labels[val], labels[tail])
    assert len(np.intersect1d(val, tail)) < 2_000  # about 1/6 of a random sample falls in the last 10,000 rows
    assert np.abs(np.bincount(labels[tail], minlength=10) - 10_000 * np.bincount(labels) / 60_000).max() > 1


def stored_study(folder, workload_name: str, kind: str, drop: tuple) -> None:
    """A study.json as a version without the options in `drop` wrote it: this version's arguments less those."""
    workload = resolve(workload_name)
    args = run_command.fill(run_command.parser(workload).parse_args([workload_name, "--smoke"]), workload)
    stored = {k: v for k, v in vars(args).items() if k not in drop}
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"study": workload.name, "kind": kind, "args": stored}))


@pytest.fixture
def loaded_options(monkeypatch):
    """The options a command loads its splits with; the command stops there (before Ray)."""
    seen = []

    def load_splits(workload, options):
        seen.append(options)
        raise StudyError("stopped before Ray")
    monkeypatch.setattr(run_command, "load_splits", load_splits)
    return seen


@pytest.mark.parametrize("command", ["run", "steps"])
def test_a_study_stored_before_the_option_resumes_with_the_tail(tmp_path, loaded_options, command):
    kind = "workload" if command == "run" else "steps"
    stored_study(tmp_path / "old", "mnist-cnn", kind, drop=("val_split", "split_seed"))
    common = ["--storage-path", str(tmp_path), "--name", "old", "--resume"]
    assert main([command, "mnist-cnn", *common, "--val-split", "random"]) == 2  # given now: the stored study wins
    assert len(loaded_options) == 1 and loaded_options[-1]["val_split"] == "tail"
    assert loaded_options[-1]["split_seed"] == 0
    assert main([command, "mnist-cnn", "--smoke", "--storage-path", str(tmp_path), "--name", "new"]) == 2
    assert len(loaded_options) == 2 and loaded_options[-1]["val_split"] == "random"


def test_a_stored_choice_and_an_older_regression_study_keep_their_split(tmp_path, loaded_options):
    stored_study(tmp_path / "old", "mnist-cnn", "workload", drop=())  # stored with val_split random
    assert main(["run", "mnist-cnn", "--storage-path", str(tmp_path), "--name", "old", "--resume",
                 "--val-split", "tail"]) == 2
    assert loaded_options[-1]["val_split"] == "random"
    assert mnist_regression.workload.options_before() == {}  # its hold-out was random before the option existed
    stored_study(tmp_path / "r" / "old", "mnist-regression", "workload", drop=("val_split", "split_seed"))
    assert main(["run", "mnist-regression", "--storage-path", str(tmp_path / "r"), "--name", "old", "--resume"]) == 2
    assert loaded_options[-1]["val_split"] == "random" and loaded_options[-1]["split_seed"] == 0
