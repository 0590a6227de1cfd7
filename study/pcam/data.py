"""PatchCamelyon in its official HDF5 layout: find, decompress once, verify, and map the splits into memory.

The release is six files, `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (x: (N, 96, 96, 3) uint8
patches, y: (N, 1, 1, 1) uint8 labels), distributed as `.h5.gz`. `locate` finds them (flat, or torchvision's
`pcam/` folder), `verify` checks them before Ray starts, and each trial calls `load_split`, which hands back a
read-only memory map so every trial on a machine shares one copy in the page cache. Nothing touches the network
unless `download` is called. Writing a split in this layout (the Kaggle converter's output, the small synthetic
stand-in for smoke runs and tests) is writer.py's.
"""

import gzip
import hashlib
import importlib.util
import os
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
from study.data.locks import step_lock
from study.errors import StudyError
from study.data.progress import Progress

SPLITS = ("train", "valid", "test")
SHAPE = (96, 96, 3)
FETCH_HINT = ("pass --download to fetch PCam through torchvision (needs internet and the gdown package), or get "
              "the .h5.gz files from https://github.com/basveeling/pcam and pass --data-dir pointing at them")
# Errors h5py raises for truncated or garbled files, depending on which structure the damage hits.
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)
READ_ROWS = 4096  # patches per bulk read when converting (4096 * 27 KiB = 113 MiB)
LABEL_ROWS = 1 << 20  # labels per bulk read when verifying
# The most a decompressed file of the release may hold: train x is 262,144 patches of 27 KiB (6.75 GiB), a y file a
# few MiB. A .h5.gz that inflates beyond this (a gzip bomb, or not PCam) is refused before it fills the disk.
MAX_DECOMPRESSED = {"x": 8 << 30, "y": 64 << 20}


def file_name(split: str, kind: str) -> str:
    """The release's name for one split's patches (kind "x") or labels (kind "y")."""
    if split not in SPLITS:
        raise StudyError(f"unknown PCam split {split!r}; choose one of {', '.join(SPLITS)}")
    return f"camelyonpatch_level_2_split_{split}_{kind}.h5"


def default_cache_dir(data_dir) -> Path:
    """Where decompressed and converted copies go: data_dir/.pcam-cache, or the user cache if data_dir is read-only."""
    root = Path(data_dir).expanduser().resolve()
    if (root / "CACHEDIR.TAG").is_file():  # already a cache folder (a decompressed file's own folder)
        return root
    if os.access(root, os.W_OK):
        return root / ".pcam-cache"
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # One folder per data folder, so two read-only copies of PCam never share cached files.
    return user_cache / "batchsize-study" / f"pcam-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"


def _make_cache(cache_dir: Path) -> Path:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tag = cache_dir / "CACHEDIR.TAG"
        if not tag.exists():  # the standard tag: backup tools skip these multi-GB copies
            tag.write_text("Signature: 8a477f597d28d172789f06886806bc55\n# batchsize-study PCam cache\n")
    except OSError as err:
        raise StudyError(f"cannot create the PCam cache folder {cache_dir}: {err}; pass a writable cache_dir")
    return cache_dir


def _fresh(copy: Path, source: Path) -> bool:
    """A cached copy is reused unless the source was replaced after the copy was made."""
    return copy.is_file() and copy.stat().st_mtime >= source.stat().st_mtime


def _decompress(gz_path: Path, cache_dir: Path) -> Path:
    """gz_path decompressed into cache_dir once; concurrent trials wait on the lock instead of racing."""
    target = _make_cache(cache_dir) / gz_path.name[: -len(".gz")]
    with step_lock(str(target) + ".lock"):
        if _fresh(target, gz_path):
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        limit = MAX_DECOMPRESSED["y" if target.name.endswith("_y.h5") else "x"]
        try:
            with open(gz_path, "rb") as raw, gzip.GzipFile(fileobj=raw) as src, open(tmp, "wb") as dst, \
                    Progress(f"decompressing {gz_path.name}", gz_path.stat().st_size, "compressed bytes") as progress:
                while chunk := src.read(16 << 20):
                    if dst.tell() + len(chunk) > limit:
                        raise StudyError(f"{gz_path} decompresses to more than {limit >> 20:,} MiB, more than any "
                                         f"file of the PCam release holds; delete it and fetch PCam again")
                    dst.write(chunk)
                    progress.advance_to(raw.tell())
            os.replace(tmp, target)  # atomic: a reader never sees half a file under the final name
        except (OSError, EOFError, zlib.error) as err:
            raise StudyError(f"cannot decompress {gz_path}: {err} (corrupt or truncated download? "
                             f"delete it and fetch it again)")
        finally:
            tmp.unlink(missing_ok=True)  # gone after the rename; a partial file on any failure
    return target


def locate(data_dir, cache_dir=None) -> dict[str, tuple[Path, Path | None]]:
    """Per split, the (x, y) files in data_dir or data_dir/pcam; `.h5.gz` is decompressed into cache_dir once.

    The test split's y may be absent (a Kaggle-prepared set has an unlabelled test split): then it is None.
    """
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise StudyError(f"--data-dir {root} is a file; pass the folder that holds the PCam files")
    if not root.is_dir():
        raise StudyError(f"PCam data folder {root} does not exist; {FETCH_HINT}")
    folders = (root, root / "pcam")
    found, missing = {}, []
    for split in SPLITS:
        for kind in ("x", "y"):
            name = file_name(split, kind)
            candidates = [f / n for f in folders for n in (name, name + ".gz")]
            path = next((c for c in candidates if c.is_file()), None)
            odd = next((c for c in candidates if c.exists() and not c.is_file()), None)
            if path is None and odd is not None:
                raise StudyError(f"{odd} is not a file; put the PCam file {name} (.h5 or .h5.gz) there")
            if path is None and not (split == "test" and kind == "y"):
                missing.append(name)
            found[split, kind] = path
    if missing:
        raise StudyError(f"PCam files missing in {root} (looked there and in {root / 'pcam'}): "
                         f"{', '.join(missing)} (.h5 or .h5.gz); {FETCH_HINT}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(root)
    for key, path in found.items():
        if path is not None and path.suffix == ".gz":
            found[key] = _decompress(path, cache)
    return {split: (found[split, "x"], found[split, "y"]) for split in SPLITS}


def _dataset(handle: h5py.File, name: str, path: Path) -> h5py.Dataset:
    dset = handle.get(name)
    if not isinstance(dset, h5py.Dataset):
        raise StudyError(f"{path} has no dataset {name!r} (holds {', '.join(handle.keys()) or 'nothing'}): "
                         f"not a PCam file")
    if dset.dtype != np.uint8:
        raise StudyError(f"{path}: dataset {name!r} is {dset.dtype}, PCam stores uint8")
    return dset


def _check_x(dset: h5py.Dataset, path: Path) -> int:
    if dset.ndim != 4 or dset.shape[1:] != SHAPE:
        raise StudyError(f"{path}: patches have shape {dset.shape}, expected (N, 96, 96, 3)")
    if dset.shape[0] == 0:
        raise StudyError(f"{path} holds no patches")
    return dset.shape[0]


def _check_y(dset: h5py.Dataset, path: Path, n: int, x_path: Path) -> None:
    if dset.ndim != 4 or dset.shape[1:] != (1, 1, 1):
        raise StudyError(f"{path}: labels have shape {dset.shape}, expected (N, 1, 1, 1)")
    if dset.shape[0] != n:
        raise StudyError(f"{path} holds {dset.shape[0]} labels but {x_path} holds {n} patches")


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except H5_ERRORS as err:
        raise StudyError(f"cannot open {path} as HDF5: {err} (truncated or corrupt? delete it and fetch it again)")


def _read_error(path: Path, err: Exception) -> StudyError:
    return StudyError(f"cannot read {path}: {err} (truncated or corrupt? delete it and fetch it again)")


def _verify_x(x_path: Path) -> int:
    try:
        with _open(x_path) as f:
            dset = _dataset(f, "x", x_path)
            n = _check_x(dset, x_path)
            dset[:1], dset[n - 1:]  # the first and last patch: catches data cut off behind an intact header
    except H5_ERRORS as err:
        raise _read_error(x_path, err)
    return n


def _verify_y(y_path: Path, n: int, x_path: Path) -> None:
    try:
        with _open(y_path) as f:
            labels = _dataset(f, "y", y_path)
            _check_y(labels, y_path, n, x_path)
            for start in range(0, n, LABEL_ROWS):
                top = int(labels[start:start + LABEL_ROWS].max())
                if top > 1:
                    raise StudyError(f"{y_path} has label {top}; PCam labels are 0 or 1")
    except H5_ERRORS as err:
        raise _read_error(y_path, err)


def verify(files: dict[str, tuple[Path, Path | None]]) -> dict[str, int]:
    """Check names, shapes, dtypes, label values and lengths of every split; return patches per split."""
    counts = {}
    for split, (x_path, y_path) in files.items():
        counts[split] = _verify_x(Path(x_path))
        if y_path is not None:
            _verify_y(Path(y_path), counts[split], Path(x_path))
    return counts


def _convert_to_npy(dset: h5py.Dataset, x_path: Path, cache_dir: Path) -> Path:
    """Copy a chunked or compressed dataset into a plain .npy once, so it can be memory-mapped."""
    target = _make_cache(cache_dir) / (x_path.stem + ".npy")
    with step_lock(str(target) + ".lock"):
        if _fresh(target, x_path):
            try:
                if np.load(target, mmap_mode="r").shape == dset.shape:
                    return target
            except (OSError, ValueError):
                pass  # a damaged copy: convert again
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=dset.shape)
            with Progress(f"copying {x_path.name} into {target}", dset.shape[0], "patches") as progress:
                for start in range(0, dset.shape[0], READ_ROWS):
                    out[start:start + READ_ROWS] = dset[start:start + READ_ROWS]
                    progress.update(min(READ_ROWS, dset.shape[0] - start))
            out.flush()
            del out
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def load_split(x_path, y_path, *, cache_dir=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Patches as a read-only memory map (N, 96, 96, 3) uint8, labels as (N,) uint8 (None without a y file).

    A contiguous, uncompressed dataset is mapped in place; anything else is converted once to a .npy in
    cache_dir (default: `default_cache_dir` of the file's folder), which is then mapped.
    """
    x_path = Path(x_path)
    try:
        with _open(x_path) as f:
            dset = _dataset(f, "x", x_path)
            n = _check_x(dset, x_path)
            offset = dset.id.get_offset() if dset.chunks is None and not dset.compression else None
            if offset is None:
                npy = _convert_to_npy(dset, x_path, Path(cache_dir or default_cache_dir(x_path.parent)))
                x = np.load(npy, mmap_mode="r")
            else:
                x = np.memmap(x_path, dtype=np.uint8, mode="r", offset=offset, shape=dset.shape)
    except H5_ERRORS as err:
        raise _read_error(x_path, err)
    if y_path is None:
        return x, None
    y_path = Path(y_path)
    try:
        with _open(y_path) as f:
            labels = _dataset(f, "y", y_path)
            _check_y(labels, y_path, n, x_path)
            return x, labels[()].reshape(-1)
    except H5_ERRORS as err:
        raise _read_error(y_path, err)


def download(root) -> Path:
    """Fetch the three splits through torchvision into root/pcam (needs internet and gdown); return that folder."""
    from torchvision.datasets import PCAM

    if importlib.util.find_spec("gdown") is None:  # torchvision fetches PCam from Google Drive through it
        raise StudyError("PCam's --download needs the gdown package: pip install 'batchsize-study[pcam]' (or "
                         "pip install gdown), or get the .h5.gz files from https://github.com/basveeling/pcam and "
                         "pass --data-dir pointing at them")
    try:
        for split in ("train", "val", "test"):  # torchvision's name for the valid split
            # torchvision and gdown draw their own bars; say what they are for and where it goes
            print(f"fetching PCam's {split} split through torchvision into {root}/pcam", file=sys.stderr, flush=True)
            PCAM(str(root), split=split, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
        raise StudyError(f"downloading PCam into {root} failed: {err}; without internet, get the .h5.gz files "
                         f"from https://github.com/basveeling/pcam and pass --data-dir pointing at them")
    return Path(root) / "pcam"


def locate_or_fetch(root: Path) -> dict:
    """The PCam files under root; missing ones are fetched once: the first trial on a node downloads under a file
    lock while the node's other trials wait for it. Files already there are used, never fetched again."""
    try:
        return locate(root)
    except StudyError:
        root.mkdir(parents=True, exist_ok=True)
    with step_lock(root / ".download.lock"):
        try:
            return locate(root)
        except StudyError:
            download(root)
            return locate(root)
