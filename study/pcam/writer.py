"""PatchCamelyon splits written in the release's HDF5 layout: `write_split` (the Kaggle converter's output, the
benchmarks' sets) and `make_synthetic`, a tiny learnable stand-in for smoke runs and tests.

Apart from data.py, which only reads (finds, decompresses, verifies and maps the files): what is written here is
contiguous and uncompressed, so data.load_split maps it in place, and it passes data.verify like the release.
"""

from pathlib import Path

import h5py
import numpy as np

from study.errors import StudyError
from study.pcam.data import SHAPE, SPLITS, file_name


def write_split(out_dir, split: str, x, y, *, n: int | None = None) -> tuple[Path, Path | None]:
    """Write one split in the official layout (contiguous, uncompressed, so `load_split` maps it in place).

    x is a (N, 96, 96, 3) uint8 array, or an iterable of such blocks when n gives the total N (large sets are
    written without holding them in memory). y is (N,) or (N, 1, 1, 1) labels 0/1, or None for no y file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = [np.asarray(x)] if n is None else x
    total = len(blocks[0]) if n is None else n
    x_path = out / file_name(split, "x")
    with h5py.File(x_path, "w") as f:
        dset = f.create_dataset("x", shape=(total, *SHAPE), dtype=np.uint8)
        start = 0
        for block in blocks:
            block = np.asarray(block)
            if block.shape[1:] != SHAPE or block.dtype != np.uint8:
                raise StudyError(f"{split} patches must be (N, 96, 96, 3) uint8, got {block.shape} {block.dtype}")
            dset[start:start + len(block)] = block
            start += len(block)
        if start != total:
            raise StudyError(f"{split}: expected {total} patches, got {start}")
    if y is None:
        return x_path, None
    labels = np.asarray(y, dtype=np.uint8).reshape(-1, 1, 1, 1)
    if len(labels) != total:
        raise StudyError(f"{split}: {total} patches but {len(labels)} labels")
    y_path = out / file_name(split, "y")
    with h5py.File(y_path, "w") as f:
        f.create_dataset("y", data=labels)
    return x_path, y_path


def _synthetic_patches(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Pink, eosin-like background with dark purple 'nuclei'; tumour (1) patches have more and larger nuclei."""
    n, blobs = len(labels), 16
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    tumour = labels[:, None].astype(bool)
    count = np.where(labels == 1, rng.integers(10, 17, n), rng.integers(2, 6, n))
    radius = np.where(tumour, rng.uniform(5, 8, (n, blobs)), rng.uniform(2.5, 4.5, (n, blobs)))
    centre = rng.uniform(0, 96, (n, blobs, 2)).astype(np.float32)
    active = np.arange(blobs)[None] < count[:, None]
    dist2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    nuclei = ((dist2 <= (radius ** 2)[..., None, None]) & active[..., None, None]).any(axis=1)
    background = np.array([225, 165, 200], np.float32) + rng.normal(0, 8, (n, 1, 1, 3))
    ink = np.array([95, 55, 135], np.float32) + rng.normal(0, 10, (n, 1, 1, 3))
    img = np.where(nuclei[..., None], ink, background) + rng.normal(0, 12, (n, 96, 96, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic(out_dir, n_train: int = 64, n_valid: int = 24, n_test: int = 24, seed: int = 0) -> Path:
    """A small PCam-like set in the official layout, balanced labels, deterministic for a seed; returns out_dir."""
    rng = np.random.default_rng(seed)
    for split, n in zip(SPLITS, (n_train, n_valid, n_test)):
        if n < 2:
            raise StudyError(f"synthetic PCam needs at least 2 patches per split, got {n} for {split}")
        labels = rng.permutation(np.arange(n) % 2).astype(np.uint8)
        blocks = [_synthetic_patches(rng, labels[s:s + 256]) for s in range(0, n, 256)]  # bounds the blob arrays
        write_split(out_dir, split, blocks, labels, n=n)
    return Path(out_dir)
