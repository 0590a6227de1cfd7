"""MNIST: find and verify the four idx files, make synthetic digits for smoke runs (`load_synthetic` writes them
as the four idx files and reads them back through `load`).

Read once by a study's driver, verified before Ray starts, then shared with every trial through Ray's object
store. Nothing here touches the network unless `download` is called.
"""

import gzip
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.errors import StudyError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # idx: unsigned byte data, 3 and 1 dimensions
FETCH_HINT = "pass --download to fetch MNIST through torchvision, or --data-dir pointing at the four idx files"


@dataclass(frozen=True)
class Mnist:
    train_x: np.ndarray  # (N, 28, 28) uint8
    train_y: np.ndarray  # (N,) uint8 digit labels (unused by the regression, kept for checks)
    test_x: np.ndarray
    test_y: np.ndarray

    def limit(self, train: int = 0, test: int = 0) -> "Mnist":
        """The first `train` / `test` images (0 keeps all)."""
        tr = slice(None, train or None)
        te = slice(None, test or None)
        return Mnist(self.train_x[tr], self.train_y[tr], self.test_x[te], self.test_y[te])


def find_files(data_dir) -> dict[str, Path]:
    """The four files in data_dir, data_dir/MNIST/raw (torchvision's layout) or data_dir/raw; .gz or not."""
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise StudyError(f"--data-dir {root} is a file; pass the folder that holds the four MNIST idx files")
    if not root.is_dir():
        raise StudyError(f"MNIST data folder {root} does not exist; {FETCH_HINT}")
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        found = {}
        for key, name in FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
                if candidate.exists():  # a folder (or a device) where the file belongs
                    raise StudyError(f"{candidate} is not a file; put the idx file {name} (.gz or not) there")
        if len(found) == len(FILES):
            return found
    missing = [name for key, name in FILES.items() if not any(root.rglob(f"{name}*"))]
    raise StudyError(f"MNIST files missing in {root}: {', '.join(missing) or 'not all four in one folder'}; "
                     f"{FETCH_HINT}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One idx file as a uint8 array, after checking its magic number and that its size matches its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise StudyError(f"cannot read {path}: {err} (corrupt or truncated download? delete it and fetch again)")
    if len(raw) < 8:
        raise StudyError(f"{path} is {len(raw)} bytes: too short to be an idx file")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise StudyError(f"{path} has magic number {found_magic}, expected {magic}: not an MNIST "
                         f"{'image' if magic == IMAGE_MAGIC else 'label'} file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise StudyError(f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load(data_dir) -> Mnist:
    """Read and verify MNIST: magic numbers, sizes, 28x28 images, as many labels as images, labels 0..9."""
    files = find_files(data_dir)
    arrays = {key: read_idx(path, IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC)
              for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[1:] != (28, 28):
            raise StudyError(f"{files[f'{split}_images']}: images are {x.shape[1:]}, expected 28x28")
        if len(x) != len(y):
            raise StudyError(f"{split} split has {len(x)} images but {len(y)} labels "
                             f"({files[f'{split}_images']}, {files[f'{split}_labels']})")
        if len(x) == 0:
            raise StudyError(f"{files[f'{split}_images']} holds no images")
        if y.max() > 9:
            raise StudyError(f"{files[f'{split}_labels']} has label {y.max()}, MNIST labels are 0..9")
    return Mnist(arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"])


def download(root) -> Path:
    """Fetch MNIST through torchvision into root/MNIST/raw (needs internet) and return root."""
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            # torchvision draws its own bars; say what they are for and where it goes
            print(f"fetching MNIST's {'training' if train else 'test'} set through torchvision into {root}/MNIST",
                  file=sys.stderr, flush=True)
            MNIST(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
        raise StudyError(f"downloading MNIST into {root} failed: {err}; without internet, "
                         f"copy the four idx files into a folder and pass --data-dir")
    return Path(root)


# Seven-segment strokes per digit: a, b, c, d, e, f, g (top, upper right, lower right, bottom, lower left,
# upper left, middle). Enough digit-like structure that the statistics vary the way MNIST's do.
_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd"]


def synthetic(n_train: int = 512, n_test: int = 128, seed: int = 0) -> Mnist:
    """Small synthetic 28x28 'digits' (random position, size, stroke width and ink), built-in for smoke runs."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
        top = rng.uniform(3, 7, (n, 1, 1))
        left = rng.uniform(6, 11, (n, 1, 1))
        height = rng.uniform(14, 19, (n, 1, 1))
        width = rng.uniform(7, 11, (n, 1, 1))
        half = rng.uniform(0.8, 1.8, (n, 1, 1))  # half the stroke width, pixels
        ink = rng.uniform(160, 255, (n, 1, 1))
        bottom, right, mid = top + height, left + width, top + height / 2
        horiz = lambda row: (np.abs(yy - row) <= half) & (xx >= left) & (xx <= right)
        vert = lambda col, lo, hi: (np.abs(xx - col) <= half) & (yy >= lo) & (yy <= hi)
        strokes = {"a": horiz(top), "g": horiz(mid), "d": horiz(bottom),
                   "f": vert(left, top, mid), "b": vert(right, top, mid),
                   "e": vert(left, mid, bottom), "c": vert(right, mid, bottom)}
        img = np.zeros((n, 28, 28), np.float32)
        for digit, segments in enumerate(_SEGMENTS):
            mask = sum(strokes[s] for s in segments) > 0
            img = np.where((labels == digit)[:, None, None] & mask, ink, img)
        img += rng.normal(0, 12, img.shape) * (img > 0)
        return np.clip(img, 0, 255).astype(np.uint8), labels

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Mnist(train_x, train_y, test_x, test_y)


def write_idx(path: Path, array: np.ndarray) -> None:
    """One uint8 array as an idx file: the magic number (0, 0, 8 for unsigned bytes, the number of dimensions),
    each dimension as a big-endian 4-byte integer, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def load_synthetic(n_train: int = 512, n_test: int = 128, seed: int = 0) -> Mnist:
    """`synthetic` digits written as the four idx files to a fresh temporary folder (removed after) and read back
    by `load`: the smoke runs' data go through the same reader and checks as MNIST's own files."""
    data = synthetic(n_train, n_test, seed)
    arrays = {"train_images": data.train_x, "train_labels": data.train_y, "test_images": data.test_x,
              "test_labels": data.test_y}
    with tempfile.TemporaryDirectory(prefix="mnist-smoke-") as folder:
        for key, name in FILES.items():
            write_idx(Path(folder) / name, arrays[key])
        return load(folder)
