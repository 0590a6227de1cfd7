"""The validation split a workload carves out of its training file, drawn once at load time.

A training file is not always in random order: MNIST's last rows are easier than the rest (a CNN trained on the
others scored 52-61 % of the error on the last 2,000 rows that it did on four other 2,000-row slices; the numbers
are in docs/workloads.md), so "the last N rows" makes every goal easier than on a fair sample. The default is therefore
a seeded random sample, stratified by class where the rows have classes: each class gets its share of the split within
one example. "tail", the last N rows, is what studies stored before this choice existed ran with (a workload declares
that through Option.before, and a resumed study keeps it).

A workload declares the two options with `options(before, classes)` and calls `carve(x, y, options, classes)` in its
load().
"""

import numpy as np

from study.errors import StudyError
from study.workload import Option

HOW = ("random", "tail")


def options(before: str, classes: bool) -> tuple[Option, Option]:
    """The workload options val_split and split_seed; `before`: how the workload drew its split before they existed
    (what a study stored without them resumes with); classes: its labels are classes (carve(classes=True))."""
    sample = "a seeded sample, stratified by class" if classes else "a seeded sample"
    then = ", what studies stored without this option ran with" if before == "tail" else ""
    return (Option("val_split", str, "random", f"how the validation split is drawn from the training file: random "
                                               f"({sample}) or tail (the last --val-size rows{then})",
                   HOW, before=before),
            Option("split_seed", int, 0, "seed of the random validation split (the same rows for every trial)"))


def indices(n: int, size: int, how: str = "random", seed: int = 0,
            labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a file of n rows, each ascending, disjoint, together every row.
    random: `size` rows drawn with numpy's default_rng(seed); with labels, each class's share of them is its share
    of the file rounded down or up (largest remainders up, so the sizes add up). tail: the last `size` rows."""
    if not 0 <= size < n:
        raise ValueError(f"a validation split of {size} rows out of {n}")
    if how == "tail":
        return np.arange(n - size), np.arange(n - size, n)
    if how != "random":
        raise ValueError(f"unknown validation split {how!r}; one of {', '.join(HOW)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # the unstratified draw: also a paper's stored hold-out, whose rows must stay the same
    if labels is None:
        return np.sort(order[size:]), np.sort(order[:size])
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} rows")
    classes, label_index = np.unique(labels, return_inverse=True)
    counts = np.bincount(label_index, minlength=len(classes))
    exact = size * counts / n
    quota = np.floor(exact).astype(np.int64)
    short = size - int(quota.sum())  # < number of classes: one more row for the largest remainders
    quota[np.argsort(quota - exact, kind="stable")[:short]] += 1
    # Rows grouped by class, in random order within each; the first quota[c] of class c's group are validation.
    grouped = order[np.argsort(label_index[order], kind="stable")]
    rank = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    chosen = rank < np.repeat(quota, counts)
    return np.sort(grouped[~chosen]), np.sort(grouped[chosen])


def carve(x, y, options: dict, classes: bool) -> tuple[tuple, tuple]:
    """((train x, train y), (val x, val y)) of a training file by the workload's val_size, val_split and split_seed;
    classes: y holds class labels (the split is stratified by them). An impossible size is the user's error."""
    n, size = len(x), options["val_size"]
    if not 0 < size < n:
        raise StudyError(f"--val-size must be in 1..{n - 1}, got {size}")
    if options["val_split"] == "tail":  # views, as before: no copy of the file
        return (x[:-size], y[:-size]), (x[-size:], y[-size:])
    train, val = indices(n, size, options["val_split"], options["split_seed"], y if classes else None)
    return (x[train], y[train]), (x[val], y[val])
