"""The regression targets of the MNIST regression paper: per-image pixel statistics of MNIST's images (the
data reader is study.data.mnist), and their box-plot statistics for the report."""

import numpy as np

from study.errors import StudyError


def targets(images: np.ndarray, target: str) -> np.ndarray:
    """Per-image pixel statistic on the 0..255 scale, as float32. std/var are population (numpy's ddof=0)."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    stat = {"mean": np.mean, "median": np.median, "std": np.std, "var": np.var}.get(target)
    if stat is None:
        raise StudyError(f"unknown target {target!r}; choose one of mean, median, std, var")
    return stat(flat, axis=1).astype(np.float32)


def target_stats(images: np.ndarray) -> dict:
    """Box-plot statistics (matplotlib `bxp` keys, 1.5 IQR whiskers) of every target over these images."""
    stats = {}
    for target in ("mean", "median", "std", "var"):
        values = targets(images, target).astype(np.float64)
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        inside = values[(values >= q1 - 1.5 * (q3 - q1)) & (values <= q3 + 1.5 * (q3 - q1))]
        stats[target] = {"whislo": float(inside.min()), "q1": float(q1), "med": float(med), "q3": float(q3),
                         "whishi": float(inside.max()), "mean": float(values.mean()), "min": float(values.min()),
                         "max": float(values.max()), "n": int(len(values))}
    return stats
