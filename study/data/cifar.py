"""CIFAR-10 from the standard `cifar-10-batches-py` folder (Krizhevsky's python pickles), checked on reading.

Each of data_batch_1..5 and test_batch is a pickled dict with b"data", (N, 3072) uint8 rows of 32x32 RGB images
stored channel by channel, and b"labels", N ints in 0..9. A pickle can name any function to call while it is read,
so batches are read by an unpickler that admits only what a batch holds: dicts, lists, bytes, ints and numpy
uint8 arrays (the handful of numpy functions that rebuild an array and its dtype); a file that names anything else
is refused unread. `load_synthetic` writes a small generated set in the same format and reads it back through
`load`: what `--smoke` trains on.
"""

import functools
import pickle
import tempfile
from pathlib import Path

import numpy as np

from study.errors import StudyError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FETCH_HINT = "pass --download to fetch CIFAR-10 through torchvision, or --data-dir pointing at cifar-10-batches-py"


def find_folder(data_dir) -> Path:
    """data_dir itself when it holds the batch files, else data_dir/cifar-10-batches-py (torchvision's layout)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise StudyError(f"CIFAR-10 data folder {root} does not exist or is not a folder; {FETCH_HINT}")
    for folder in (root, root / FOLDER):
        if (folder / TEST_FILE).exists() or (folder / TRAIN_FILES[0]).exists():
            missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
            if missing:
                raise StudyError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}; {FETCH_HINT}")
            return folder
    raise StudyError(f"no CIFAR-10 batch files in {root} or {root / FOLDER}; {FETCH_HINT}")


class _Refused(pickle.UnpicklingError):
    """A pickle that names what a CIFAR-10 batch never does (as opposed to a damaged one)."""


def _latin1(text: str, encoding: str) -> bytes:
    """_codecs.encode as Python 3 pickles bytes with protocol 2, and only that use of it."""
    if encoding != "latin1" or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with {encoding!r}, which a CIFAR-10 batch never calls")
    return text.encode("latin1")


@functools.cache
def _allowed_globals() -> dict:
    """numpy's functions that rebuild an ndarray and its dtype, under the module names old and new numpy pickle
    them with (the released batches name numpy.core.multiarray, numpy 2 writes numpy._core), taken from numpy's
    own pickling; and bytes as protocol 2 writes them."""
    sample = np.zeros(1, np.uint8)
    reconstruct, frombuffer = sample.__reduce__()[0], sample.__reduce_ex__(5)[0]
    return {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1,
            **{(f"numpy.{core}.multiarray", "_reconstruct"): reconstruct for core in ("core", "_core")},
            **{(f"numpy.{core}.numeric", "_frombuffer"): frombuffer for core in ("core", "_core")}}


class _BatchUnpickler(pickle.Unpickler):
    """Admits the globals a CIFAR-10 batch needs and refuses every other (os.system, builtins.eval, ...)."""

    def find_class(self, module, name):
        if (module, name) not in _allowed_globals():
            raise _Refused(f"it names {module}.{name}, which a CIFAR-10 batch never does")
        return _allowed_globals()[module, name]


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ((N, 3, 32, 32) uint8 images, (N,) uint8 labels)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except _Refused as err:
        raise StudyError(f"{path} is not a CIFAR-10 batch ({err}); it was not read further: delete the folder and "
                         f"fetch CIFAR-10 again with --download")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as err:
        raise StudyError(f"cannot read {path}: {type(err).__name__}: {err} (corrupt or truncated? delete the folder "
                         f"and fetch it again)")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise StudyError(f"{path} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise StudyError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        raise StudyError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise StudyError(f"{path} has label {labels.max() if labels.max() > 9 else labels.min()}; CIFAR-10's "
                         f"labels are 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def load(data_dir) -> dict:
    """{"train": (x, y), "test": (x, y)}: the five training batches joined, and the test batch."""
    folder = find_folder(data_dir)
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    test = read_batch(folder / TEST_FILE)
    return {"train": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), "test": test}


def download(root) -> Path:
    """Fetch CIFAR-10 through torchvision into root/cifar-10-batches-py (needs internet)."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
        raise StudyError(f"downloading CIFAR-10 into {root} failed: {err}; without internet, copy the "
                         f"{FOLDER} folder there and pass --data-dir")
    return Path(root)


def write_batch(path: Path, images: np.ndarray, labels) -> None:
    """A batch file in CIFAR-10's own format ((N, 3, 32, 32) uint8 images): for tests and small examples."""
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": path.name.encode(), b"data": images.reshape(len(images), -1),
                     b"labels": [int(v) for v in labels], b"filenames": [b"%d.png" % i for i in range(len(images))]},
                    f)


# One colour per class (RGB, 0..255): a generated image is its class's colour under noise, learnable in a few steps.
_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200], [40, 200, 200],
                     [230, 230, 230], [30, 30, 30], [230, 130, 30], [120, 60, 180]], np.float32)


def make_synthetic(folder, per_batch: int = 80, n_test: int = 100, seed: int = 0) -> Path:
    """A small CIFAR-10-like set in CIFAR-10's own files (data_batch_1..5, test_batch, batches.meta), deterministic
    for a seed; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [(name, per_batch) for name in TRAIN_FILES] + [(TEST_FILE, n_test)]:
        labels = rng.integers(0, 10, n)
        noise = rng.normal(0, 40, (n, 3, 32, 32))
        images = np.clip(_COLOURS[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        write_batch(folder / name, images, labels)
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in LABEL_NAMES],
                     b"num_vis": 3 * 32 * 32}, f)
    return folder


def load_synthetic(per_batch: int = 80, n_test: int = 100, seed: int = 0) -> dict:
    """`load` of a generated set, written to a fresh temporary folder (removed after): the smoke runs' data go
    through the same reader and checks as CIFAR-10's own files, and never through files someone else could have
    placed in a shared folder."""
    with tempfile.TemporaryDirectory(prefix="cifar10-smoke-") as root:
        return load(make_synthetic(Path(root) / FOLDER, per_batch, n_test, seed))
