"""PCam input pipeline: images/s of augmented, normalised batches on the device, project vs torchvision.

    python benchmarks/pcam_pipeline.py [--data-dir DIR] [--n 4096] [--batch-size 128] [--batches 50]
                                       [--seconds 2] [--rounds 3] [--device auto] [--on-device auto]

(a) the project: `PatchBatches` over the memory-mapped split + batched `to_input` on the device.
(b) the baseline it replaces: `torchvision.datasets.PCAM` with v2 transforms doing the same augmentations per
    item (flips, 90-degree rotation, zoom 0.9-1.1, brightness 0.9-1.1, ImageNet normalisation), in a DataLoader
    with the same batch size and num_workers = os.cpu_count(), moved to the device.
Both use every core: the project runs torch on os.cpu_count() threads (plus its reader thread), the baseline
os.cpu_count() worker processes. They are timed in alternating windows, --rounds of each, so a change in the
machine's load hits both alike; a window is one warm-up batch, then at least --batches batches and --seconds
seconds, and it shuts its reader thread or DataLoader workers down before the next window starts, so neither
side's prefetching runs in the other's window. The ratio printed is the median of the rounds' ratios, next to
the load average (the machine may be shared). Without --data-dir a PCam-like train split of --n random patches
is written to a temporary folder.

On a machine busy with other jobs, run it with OMP_WAIT_POLICY=PASSIVE: by default OpenMP threads spin while
they wait for a partner thread, and when that partner has been descheduled every parallel torch op costs a
scheduler time slice, which can slow the project several-fold (the baseline's workers run one thread each and
never wait on each other). On an idle machine spinning is faster, so the policy is left to the caller.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from study.pcam.augment import IMAGENET_MEAN, IMAGENET_STD, to_input  # noqa: E402
from study.pcam import data as pcam, writer as pcam_writer  # noqa: E402
from study.data.batches import PatchBatches  # noqa: E402
from study.engine.memory import plan_uploads  # noqa: E402


def write_random_split(folder: Path, n: int) -> tuple[Path, Path]:
    """n random patches and labels as the official train split (random bytes: the content does not matter)."""
    rng = np.random.default_rng(0)
    blocks = (rng.integers(0, 256, (min(1024, n - s), 96, 96, 3), dtype=np.uint8) for s in range(0, n, 1024))
    return pcam_writer.write_split(folder, "train", blocks, rng.integers(0, 2, n), n=n)


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


def window(stream, args, device: torch.device) -> tuple[float, int]:
    """(images/s, batches) of one window of `stream`: a warm-up batch (worker start-up, allocations, kernels),
    then at least args.batches batches and args.seconds seconds. Closes the stream, stopping its background work."""
    try:
        next(stream)
        sync(device)
        start, images, batches = time.perf_counter(), 0, 0
        while batches < args.batches or time.perf_counter() - start < args.seconds:
            images += len(next(stream))
            batches += 1
        sync(device)
        return images / (time.perf_counter() - start), batches
    finally:
        stream.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project(batches: PatchBatches, device, seed: int):
    """Endless augmented batches; closing it closes the current epoch, which stops PatchBatches' reader thread."""
    data_gen, aug_gen = torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed)
    while True:
        epoch = batches.epoch(data_gen)
        try:
            for xb, _ in epoch:
                yield to_input(xb, generator=aug_gen)
        finally:
            epoch.close()


def per_item_transform():
    """The typical per-item torchvision pipeline doing the project's augmentations, then ImageNet normalisation."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.RandomAffine(degrees=0, scale=(0.9, 1.1), interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def baseline(root: Path, args, device):
    """Endless batches of the typical torchvision pipeline; closing it shuts its worker processes down."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import PCAM

    loader = DataLoader(PCAM(str(root), split="train", transform=per_item_transform()), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, num_workers=os.cpu_count(), persistent_workers=True,
                        pin_memory=device.type == "cuda")
    iterator = None
    try:
        while True:
            iterator = iter(loader)  # persistent workers: a new epoch reuses the same processes
            for xb, _ in iterator:
                yield xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    finally:
        del iterator, loader  # the last references: the iterator's finaliser stops the workers now


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="a PCam folder (official names, flat or torchvision layout, .h5 or .gz)")
    parser.add_argument("--n", type=int, default=4096, help="patches to generate when no --data-dir")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="timed batches per window, at least")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per window, at least")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows of each pipeline")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--on-device", choices=["auto", "yes", "no"], default="auto",
                        help="the project's path: upload the split (yes), stream from the memmap (no)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 1:
        parser.error("--rounds and --batches must be at least 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    workers = os.cpu_count()
    torch.set_num_threads(workers)
    with tempfile.TemporaryDirectory(prefix="pcam-bench-") as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            x_path, y_path = pcam.locate(args.data_dir)["train"]
        else:
            x_path, y_path = write_random_split(tmp / "data", args.n)
        n = pcam.verify({"train": (x_path, y_path)})["train"]
        if n < args.batch_size:
            parser.error(f"the train split has {n} patches, fewer than one batch of {args.batch_size}")
        x, y = pcam.load_split(x_path, y_path)
        on_device = {"yes": True, "no": False}.get(args.on_device) if args.on_device != "auto" else plan_uploads(
            {"train": x.nbytes}, budget_bytes=torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None,
            needs_bytes=0, packed=False)["train"]  # a whole card, nothing else on it: as a trial alone on a GPU
        batches = PatchBatches(x, y, args.batch_size, device, drop_last=True, on_device=on_device)
        root = torchvision_root(x_path, y_path, tmp / "tv")
        print(f"device {device}, train split {n} patches, batch {args.batch_size}, windows of >= {args.batches} "
              f"batches and >= {args.seconds:g} s; torch threads {torch.get_num_threads()}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        ours, theirs = [], []
        for r in range(args.rounds):
            ours.append(window(project(batches, device, seed=r), args, device))
            theirs.append(window(baseline(root, args, device), args, device))
            (a, na), (b, nb) = ours[-1], theirs[-1]
            print(f"round {r + 1}: project {a:8.0f} images/s ({1000 * args.batch_size / a:6.1f} ms/batch, {na} "
                  f"batches) | baseline {b:6.0f} images/s ({1000 * args.batch_size / b:6.1f} ms/batch, {nb} "
                  f"batches) | ratio {a / b:.2f}x")
        ratios = [a / b for (a, _), (b, _) in zip(ours, theirs)]
        path = "whole split on device" if batches.on_device else "memmap reads, prefetch thread"
        print(f"project  PatchBatches + to_input ({path}): {statistics.median(a for a, _ in ours):10.0f} images/s")
        print(f"baseline torchvision PCAM + v2 per item, DataLoader({workers} workers): "
              f"{statistics.median(b for b, _ in theirs):10.0f} images/s")
        print(f"ratio project / baseline: {statistics.median(ratios):.2f}x (median of {args.rounds} rounds, "
              f"range {min(ratios):.2f}-{max(ratios):.2f})")
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
