"""One MNIST regression trial, seconds per epoch: the project's trial vs the classic DataLoader loop.

    python benchmarks/mnist_trial.py [--data-dir DIR] [--batch-size 16] [--epochs 1] [--device auto|cpu|cuda]
        [--target mean] [--train-limit N] [--test-limit N] [--repeats 1] [--workers 0] [--threads N]
        [--noise-scale on|off] [--compile]

(a) the project: `study.mnist.trainable.run_mnist` as a trial runs it without Ray (data put on the device once,
    batched by indexing a shuffled permutation, foreach/fused Adam, loss summed on the device). Its per-epoch
    `epoch_seconds` plus `probe_seconds` are used; its wall time, which adds setup and the evaluations, is printed
    separately.
(b) the baseline, written here the way the original paper's code and most tutorials do it: a per-item
    `Dataset` over the numpy arrays, `DataLoader(shuffle=True)` in the main process, `.to(device)` per batch,
    default `torch.optim.Adam`, `nn.MSELoss`, `loss.item()` per step for the running loss.
Same images, targets, seed (so the same initial weights; the two shuffles draw different permutations), lr and
epochs; only the training epochs are timed (CUDA synchronised), after a few warm-up steps of a throwaway model.
When epochs >= 2 the first epoch of every way is left out of the medians. Without --data-dir, MNIST-like synthetic digits stand in for the images.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from study import metrics as M  # noqa: E402
from study.mnist import trainable as trainables  # noqa: E402
from study.engine.config import TrainConfig  # noqa: E402
from study.mnist import stored  # noqa: E402
from study.mnist.workload import TARGETS  # noqa: E402
from study.data import mnist as mnist_data  # noqa: E402
from study.mnist import targets as regression_targets  # noqa: E402
from study.errors import StudyError  # noqa: E402
from study.mnist.model import RegressionCNN  # noqa: E402

SYNTHETIC_CHUNK = 10_000  # images per call of the synthetic generator (its temporaries grow with n)
MNIST_TEST_SIZE = 10_000


def load_data(args) -> tuple[np.ndarray, np.ndarray, str]:
    """(train images, test images, description); uint8 (N, 28, 28)."""
    if args.data_dir:
        data = mnist_data.load(args.data_dir).limit(train=args.train_limit or 0, test=args.test_limit or 0)
        return data.train_x, data.test_x, f"MNIST from {args.data_dir}"
    n = args.train_limit or 60_000
    n_test = min(args.test_limit or MNIST_TEST_SIZE, MNIST_TEST_SIZE)  # as many as MNIST has at most
    parts = [mnist_data.synthetic(min(SYNTHETIC_CHUNK, n - start), n_test if start == 0 else 0,
                                  seed=start // SYNTHETIC_CHUNK) for start in range(0, n, SYNTHETIC_CHUNK)]
    train_x = np.concatenate([p.train_x for p in parts])
    return train_x, parts[0].test_x, "synthetic MNIST-like digits (study.data.mnist.synthetic)"


class PixelStatDataset(Dataset):
    """The classic per-item dataset: one (1x28x28 float image on 0..255, float target) per __getitem__."""

    def __init__(self, images: np.ndarray, targets: np.ndarray):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.tensor(self.images[i], dtype=torch.float32).unsqueeze(0)
        return image, torch.tensor(self.targets[i], dtype=torch.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device, batch_size: int) -> None:
    """A few steps of a throwaway model, so that neither way pays for CUDA/cuDNN/oneDNN start-up in its epoch.
    Draws from its own generator: the global seed of both ways is set after this anyway."""
    model = RegressionCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    sync(device)


def run_classic(cfg: TrainConfig, train_x, train_t, test_x, test_t, device, workers: int) -> dict:
    """The baseline trial: per-epoch training seconds and mean losses, the test MSE after training (untimed)."""
    torch.manual_seed(cfg.seed)  # what RegressionCNN's init and the DataLoader's shuffle draw from
    model = RegressionCNN().to(device)
    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    loader = DataLoader(PixelStatDataset(train_x, train_t), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, pin_memory=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    criterion = nn.MSELoss()
    seconds, cpu_seconds, losses = [], [], []
    for _ in range(cfg.epochs):
        model.train()
        running, seen = 0.0, 0
        sync(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)
            seen += len(y)
        sync(device)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        losses.append(running / seen)
    model.eval()
    with torch.no_grad():
        x = torch.tensor(test_x, dtype=torch.float32).unsqueeze(1)
        pred = torch.cat([model(chunk.to(device)).cpu() for chunk in x.split(cfg.eval_batch_size)])
    test_mse = torch.mean((pred - torch.from_numpy(test_t)) ** 2).item()
    return {"epoch_seconds": seconds, "cpu_seconds": cpu_seconds, "train_loss": losses, "test_mse": test_mse,
            "initial": initial}


def run_project(cfg: TrainConfig, data: dict, device, compile_model: bool = False) -> dict:
    """run_mnist with a collecting report; also records where its batches live and the process CPU time of each
    training epoch (from the first batch drawn to the last: the span fit times, without its CUDA syncs)."""
    rows, stamps, seen, cpu_seconds = [], [], {}, []
    initial = {}

    class RecordingBatches(trainables.DeviceBatches):
        def __init__(self, x, y, batch_size):
            super().__init__(x, y, batch_size)
            seen.update(device=str(x.device), shape=tuple(x.shape), dtype=str(x.dtype).removeprefix("torch."))

        def epoch(self, generator):
            started = time.process_time()
            for xb, yb in super().epoch(generator):
                seen.setdefault("batch_device", str(xb.device))
                yield xb, yb
            cpu_seconds.append(time.process_time() - started)

    def report(metrics, state):
        stamps.append(time.perf_counter())
        rows.append(metrics)
        if metrics[M.EPOCH] == 0:  # the live weights move on; keep the untrained ones to compare
            initial.update({k: v.detach().cpu().clone() for k, v in state["model"].items()})

    def model_factory():
        return torch.compile(RegressionCNN()) if compile_model else RegressionCNN()

    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(trainables, "DeviceBatches", RecordingBatches))
        # The trial builds its model from the MNIST regression workload: swap in the (compiled) factory there.
        workload = dataclasses.replace(trainables.regression.workload, model=lambda options: model_factory())
        patches.enter_context(mock.patch.object(trainables.regression, "workload", workload))
        started = time.perf_counter()
        trainables.run_mnist(cfg, data, device, report)
        wall = time.perf_counter() - started
    trained = rows[1:]
    # Between two reports: one training epoch, then its evaluation and the checkpoint state (snapshot).
    # The whole epoch, noise probes included (the trial reports them apart): the work the project does per epoch.
    epoch_seconds = [r[M.EPOCH_SECONDS] + r.get(M.PROBE_SECONDS, 0.0) for r in trained]
    overhead = [b - a - s for a, b, s in zip(stamps, stamps[1:], epoch_seconds)]
    return {"epoch_seconds": epoch_seconds, "cpu_seconds": cpu_seconds,
            "train_loss": [r[M.TRAIN_LOSS] for r in trained],
            "test_mse": rows[-1][M.TEST_MSE], "wall": wall, "setup_and_first_eval": stamps[0] - started,
            "eval_per_epoch": statistics.median(overhead), "initial": initial, "batches": seen}


def timed_epochs(runs: list[dict], key: str = "epoch_seconds") -> list[float]:
    """Seconds of every measured epoch over the repeats; the first of each run is warm-up when there are more."""
    return [s for r in runs for s in (r[key][1:] or r[key])]


def steady(runs: list[dict], key: str = "epoch_seconds") -> float:
    return statistics.median(timed_epochs(runs, key))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four MNIST idx files (default: synthetic digits)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--target", choices=TARGETS, default="mean")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=None, help="default: the batch size (the sweep's seed for run 0)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training images (default: all 60,000 of MNIST, or 60,000 synthetic ones)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test images, evaluated untimed (default: all 10,000, or 10,000 synthetic ones)")
    p.add_argument("--repeats", type=int, default=1, help="run both ways this many times, alternating")
    p.add_argument("--workers", type=int, default=0, help="DataLoader num_workers of the classic way")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads on CPU (default os.cpu_count(); 1 gives steadier timings on a loaded machine)")
    p.add_argument("--noise-scale", choices=("on", "off"), default="on",
                   help="the project's gradient noise-scale estimate (on in the study)")
    p.add_argument("--compile", action="store_true", help="also time the project's trial with torch.compile")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0 or args.threads < 0 or any(n is not None and n < 1 for n in (args.train_limit,
                                                                                      args.test_limit)):
        p.error("--workers and --threads must be >= 0, --train-limit and --test-limit >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        train_x, test_x, source = load_data(args)
    except StudyError as err:
        hint = (" (this benchmark only reads files; to fetch them: python -c \"from study.data.mnist import download; "
                f"download('{args.data_dir}')\")") if args.data_dir else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    if args.batch_size > len(train_x):
        print(f"error: --batch-size {args.batch_size} exceeds the {len(train_x)} training images", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())  # both ways get the same cores: the same footing
    cfg = stored.train_config(dict(target=args.target, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                                   seed=args.batch_size if args.seed is None else args.seed,
                                   noise_scale=args.noise_scale == "on"))  # a study.mnist trial's stored layout
    train_t, test_t = regression_targets.targets(train_x, args.target), regression_targets.targets(test_x, args.target)
    data = {"train_x": train_x, "test_x": test_x, "targets": {args.target: (train_t, test_t)}}

    print("MNIST regression trial: project (study.mnist.trainable.run_mnist) vs classic (per-item Dataset + DataLoader)")
    print(f"date {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  torch {torch.__version__}  "
          f"python {platform.python_version()}")
    print(f"device {device.type}: {device_name(device)}  torch threads {torch.get_num_threads()} "
          f"(os.cpu_count {os.cpu_count()})  load average before {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"data: {source}, {len(train_x)} train / {len(test_x)} test images; target {args.target}, batch "
          f"{cfg.batch_size}, epochs {cfg.epochs}, lr {cfg.lr:g}, seed {cfg.seed}, repeats {args.repeats}")
    print(f"classic: DataLoader(shuffle=True, num_workers={args.workers}, pin_memory=False), torch.optim.Adam "
          f"(default implementation), loss.item() per step;  project: noise scale {args.noise_scale}")

    warm_up(device, cfg.batch_size)
    ways = {"project (run_mnist)": [], "classic (DataLoader)": []}
    if args.compile:
        ways["project + torch.compile"] = []
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))  # alternate: load drift hits both
        for way in order:
            if way.startswith("classic"):
                ways[way].append(run_classic(cfg, train_x, train_t, test_x, test_t, device, args.workers))
                continue
            try:
                ways[way].append(run_project(cfg, data, device, compile_model="compile" in way))
            except Exception as err:  # torch.compile needs a working compiler toolchain; say why and go on
                if "compile" not in way:
                    raise
                print(f"torch.compile failed, its row is left out: {type(err).__name__}: {err}".splitlines()[0])
                del ways[way]

    print(f"\n{'way':<24} {'s/epoch':>8} {'min':>8} {'CPU s':>8} {'images/s':>9} {'train loss':>11} {'test MSE':>9}")
    for way, runs in ways.items():
        seconds = steady(runs)
        print(f"{way:<24} {seconds:>8.2f} {min(timed_epochs(runs)):>8.2f} {steady(runs, 'cpu_seconds'):>8.2f} "
              f"{len(train_x) / seconds:>9.0f} {runs[-1]['train_loss'][-1]:>11.4g} {runs[-1]['test_mse']:>9.4g}")
    print("(s/epoch: median wall seconds of a training epoch; min: the fastest; CPU s: median CPU seconds of this "
          "process (host side on CUDA), less hurt by other load on shared cores but counting threads' spinning)")
    project, classic = ways["project (run_mnist)"], ways["classic (DataLoader)"]
    walls = [r["wall"] for r in project]
    print(f"project wall time per trial incl. setup and {cfg.epochs + 1} evaluations: {statistics.median(walls):.2f} s"
          f" (setup + epoch-0 evaluation {project[-1]['setup_and_first_eval']:.2f} s, evaluation + checkpoint "
          f"state after each epoch {project[-1]['eval_per_epoch']:.2f} s)")
    if "project + torch.compile" in ways and ways["project + torch.compile"]:
        first = statistics.median(r["epoch_seconds"][0] for r in ways["project + torch.compile"])
        print(f"torch.compile: first epoch (includes compiling) {first:.2f} s"
              + ("" if cfg.epochs > 1 else "; use --epochs 2 or more to see its steady speed"))
    b = project[-1]["batches"]
    print(f"project data: one {b['dtype']} tensor {'x'.join(map(str, b['shape']))} on {b['device']}, batches on "
          f"{b['batch_device']} by indexing a shuffled permutation (DeviceBatches)")
    same = same_weights(project[-1]["initial"], classic[-1]["initial"])
    print(f"same initial weights in both ways: {'yes' if same else 'NO'}")
    print(f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    fastest = min(timed_epochs(classic)) / min(timed_epochs(project))
    cpu = steady(classic, "cpu_seconds") / steady(project, "cpu_seconds")
    print(f"ratio (classic / project) at batch {cfg.batch_size}: {steady(classic) / steady(project):.2f}x "
          f"(median wall; fastest epochs {fastest:.2f}x; CPU time {cpu:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
