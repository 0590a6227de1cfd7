"""PCam input pipeline: images/s of augmented, normalised batches on the device, project vs torchvision.

    python benchmarks/pcam_pipeline.py [--data-dir DIR] [--n 4096] [--batch-size 128] [--batches 50] [--device auto]

(a) the project: `PatchBatches` over the memory-mapped split + batched `to_input` on the device.
(b) the baseline it replaces: `torchvision.datasets.PCAM` with v2 transforms doing the same augmentations per
    item (flips, 90-degree rotation, zoom 0.9-1.1, brightness 0.9-1.1, ImageNet normalisation), in a DataLoader
    with the same batch size and num_workers = os.cpu_count(), moved to the device.
Both deliver the same number of batches after one warm-up batch; the ratio is project / baseline. Without
--data-dir a PCam-like train split of --n random patches is written to a temporary folder.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from study.augment import IMAGENET_MEAN, IMAGENET_STD, to_input  # noqa: E402
from study.data import pcam  # noqa: E402
from study.data.batches import PatchBatches  # noqa: E402


def write_random_split(folder: Path, n: int) -> tuple[Path, Path]:
    """n random patches and labels as the official train split (random bytes: the content does not matter)."""
    rng = np.random.default_rng(0)
    blocks = (rng.integers(0, 256, (min(1024, n - s), 96, 96, 3), dtype=np.uint8) for s in range(0, n, 1024))
    return pcam.write_split(folder, "train", blocks, rng.integers(0, 2, n), n=n)


def torchvision_root(x_path: Path, y_path: Path, folder: Path) -> Path:
    """A root in torchvision's layout (root/pcam/<official names>) linking to the same files.

    torchvision's PCAM only checks that the two files exist (no checksum unless it downloads), so links load
    offline.
    """
    (folder / "pcam").mkdir(parents=True, exist_ok=True)
    for path, kind in ((x_path, "x"), (y_path, "y")):
        link = folder / "pcam" / pcam.file_name("train", kind)
        if link.resolve() != path.resolve():
            link.symlink_to(path.resolve())
    return folder


def endless(make_epoch):
    while True:
        yield from make_epoch()


def images_per_second(stream, batches: int, device: torch.device) -> float:
    """Images/s over `batches` batches, after one warm-up batch (worker start-up, allocations, kernels)."""
    next(stream)
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream))
    sync(device)
    return images / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project(x_path, y_path, args, device):
    x, y = pcam.load_split(x_path, y_path)
    on_device = {"auto": None, "yes": True, "no": False}[args.on_device]
    batches = PatchBatches(x, y, args.batch_size, device, drop_last=True, on_device=on_device)
    data_gen, aug_gen = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0)
    stream = (to_input(xb, generator=aug_gen) for xb, _ in endless(lambda: batches.epoch(data_gen)))
    path = "whole split on device" if batches.on_device else "memmap reads, prefetch thread"
    return images_per_second(stream, args.batches, device), path


def baseline(root: Path, args, device):
    from torch.utils.data import DataLoader
    from torchvision.datasets import PCAM
    from torchvision.transforms import v2

    per_item = v2.Compose([
        v2.PILToTensor(),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.RandomAffine(degrees=0, scale=(0.9, 1.1), interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])
    workers = os.cpu_count()
    loader = DataLoader(PCAM(str(root), split="train", transform=per_item), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=True,
                        pin_memory=device.type == "cuda")
    to_device = lambda xb: xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    stream = (to_device(xb) for xb, _ in endless(lambda: iter(loader)))
    return images_per_second(stream, args.batches, device), workers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="a PCam folder (official names, flat or torchvision layout, .h5 or .gz)")
    parser.add_argument("--n", type=int, default=4096, help="patches to generate when no --data-dir")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="timed batches per pipeline")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--on-device", choices=["auto", "yes", "no"], default="auto",
                        help="the project's path: upload the split (yes), stream from the memmap (no)")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    with tempfile.TemporaryDirectory(prefix="pcam-bench-") as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            x_path, y_path = pcam.locate(args.data_dir)["train"]
        else:
            x_path, y_path = write_random_split(tmp / "data", args.n)
        n = pcam.verify({"train": (x_path, y_path)})["train"]
        if n < args.batch_size:
            parser.error(f"the train split has {n} patches, fewer than one batch of {args.batch_size}")
        print(f"device {device}, train split {n} patches, batch {args.batch_size}, {args.batches} timed batches")
        ours, path = project(x_path, y_path, args, device)
        print(f"project  PatchBatches + to_input ({path}): {ours:10.0f} images/s")
        theirs, workers = baseline(torchvision_root(x_path, y_path, tmp / "tv"), args, device)
        print(f"baseline torchvision PCAM + v2 per item, DataLoader({workers} workers): {theirs:10.0f} images/s")
        print(f"ratio project / baseline: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
