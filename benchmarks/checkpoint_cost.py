"""PCam checkpoint cost: seconds to write one trial checkpoint against the seconds of one training epoch.

    python benchmarks/checkpoint_cost.py [--device auto] [--optimizer sgd adam] [--batch-size 128] [--n 2048]
                                         [--eval-n 64] [--epochs 2] [--full-train 262144]

Runs `study.mnist.trainable.run_pcam` (a PCam trial as Tune runs it, minus Ray) on generated patches, and at every
epoch does what `bridge.report` does with a checkpoint: torch.save of the trial's state (model, optimizer,
best-so-far weights, RNG and noise-scale state) into a temporary folder, then a copy of that folder into a storage
folder (Tune persists a local checkpoint by copying it; to S3 it uploads it, which is slower). The epoch figure is
the trial's own training throughput (images/s, the epochs after the first) over the full training split
(--full-train, PCam's 262,144 patches): the epoch a real trial checkpoints after. Without a GPU this measures the
CPU, where an epoch takes hours and a checkpoint seconds; the ratio that matters is the GPU's.
"""

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.mnist_trial import device_name  # noqa: E402
from benchmarks.pcam_train import write_random_set  # noqa: E402
from study import metrics as M  # noqa: E402
from study.pcam import stored  # noqa: E402
from study.engine.memory import configure_cuda  # noqa: E402
from study.pcam.trainable import run_pcam  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure(optimizer: str, args, data_dir: str, device: torch.device, storage: Path) -> dict:
    """One trial: per epoch the checkpoint's seconds (save, persist) and size, and the trial's images/s."""
    cfg = stored.train_config(dict(batch_size=args.batch_size, optimizer=optimizer, lr=1e-4, epochs=args.epochs,
                                   data_dir=data_dir, weights="none"))  # a study.pcam trial's stored layout
    configure_cuda(device, tf32=cfg.tf32, benchmark=True)
    rows = []

    def report(metrics, state, files):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            torch.save(state, Path(folder) / M.STATE_FILE)
            for name, write in files.items():
                write(Path(folder) / name)
            saved = time.perf_counter()
            target = storage / f"{optimizer}-{metrics[M.EPOCH]}"
            shutil.copytree(folder, target)
            done = time.perf_counter()
            rows.append({"epoch": metrics[M.EPOCH], "save_s": saved - started, "persist_s": done - saved,
                         "mb": folder_bytes(target) / 2**20, "images_per_s": metrics[M.IMAGES_PER_SECOND]})
            shutil.rmtree(target)

    run_pcam(cfg, None, device, report)
    trained = [r for r in rows if r["epoch"] > 0]
    steady = trained[1:] or trained
    with_best = [r for r in rows if r["epoch"] > 0]  # from epoch 1 on the state also holds the best weights
    checkpoint_s = statistics.median(r["save_s"] + r["persist_s"] for r in with_best)
    images_per_s = statistics.median(r["images_per_s"] for r in steady)
    return {"optimizer": optimizer, "mb": max(r["mb"] for r in rows), "checkpoint_s": checkpoint_s,
            "save_s": statistics.median(r["save_s"] for r in with_best),
            "epoch_s": args.full_train / images_per_s, "images_per_s": images_per_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--optimizer", nargs="+", choices=("sgd", "adam"), default=["sgd", "adam"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n", type=int, default=2048, help="generated training patches (the measured epochs)")
    p.add_argument("--eval-n", type=int, default=64, help="generated validation and test patches (evaluated, untimed)")
    p.add_argument("--epochs", type=int, default=2, help="trained epochs (the first is left out of images/s)")
    p.add_argument("--full-train", type=int, default=262_144, help="patches of the epoch the figure is about")
    args = p.parse_args(argv)
    if min(args.batch_size, args.n, args.epochs, args.full_train) < 1 or args.batch_size > args.n or args.eval_n < 2:
        p.error("--batch-size, --n, --epochs and --full-train must be at least 1, --batch-size at most --n, --eval-n "
                "at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU here")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    print(f"{datetime.date.today()}, {device_name(device)}, torch {torch.__version__}, {os.cpu_count()} cores; "
          f"batch {args.batch_size}, {args.n} generated patches, {args.epochs} epochs; epoch figure for "
          f"{args.full_train} patches")
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as tmp:
        data_dir = str(write_random_set(Path(tmp) / "data", args.n, args.eval_n))
        storage = Path(tmp) / "storage"
        storage.mkdir()
        for optimizer in args.optimizer:
            r = measure(optimizer, args, data_dir, device, storage)
            print(f"{optimizer}: checkpoint {r['mb']:.0f} MB in {r['checkpoint_s']:.2f} s (torch.save "
                  f"{r['save_s']:.2f} s, the rest the copy to storage) | epoch of {args.full_train} patches at "
                  f"{r['images_per_s']:.0f} images/s: {r['epoch_s']:.1f} s | checkpoint / epoch "
                  f"{100 * r['checkpoint_s'] / r['epoch_s']:.3g} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
