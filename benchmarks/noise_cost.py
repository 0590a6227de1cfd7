"""What measuring the gradient noise scale costs: training steps with the noise probes on against off, in one run.

    python benchmarks/noise_cost.py [--every 32] [--rounds 5] [--mnist-batch-sizes ...] [--pcam-batch-sizes ...]
                                    [--device auto|cpu|cuda] [--threads 1]

Per batch size, the loop's two kinds of training step are timed on the study's model and loss, interleaved in
rounds so that both see the same machine load: a plain step (forward, loss.backward(), optimizer.step()) and a
probe step (study.engine.noise.NoiseScale.probe, then optimizer.step()). With noise on, the loop runs one probe per
`every` steps, so the extra training time is (probe - plain) / (every x plain); the medians over the rounds are
used. MNIST: the regression CNN on random 28x28 inputs at the study's default batch sizes. PCam: VGG16Patches
(random init, the first two blocks frozen, as a trial) on random 96x96 patches; on CPU its default batch sizes are
the smoke study's and 32, because a VGG16 step at 64-512 patches takes minutes on one core (pass
--pcam-batch-sizes to measure them). Trials run on one thread each (--cpus-per-trial 1), so --threads 1.
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.mnist_trial import device_name  # noqa: E402
from study.pcam.augment import to_input  # noqa: E402
from study.engine.config import NOISE_EVERY  # noqa: E402
from study.pcam.workload import BATCH_SIZES as PCAM_BATCH_SIZES  # noqa: E402
from study.mnist.workload import BATCH_SIZES as MNIST_BATCH_SIZES  # noqa: E402
from study.mnist.model import RegressionCNN  # noqa: E402
from study.pcam.model import VGG16Patches  # noqa: E402
from study.engine.noise import NoiseScale  # noqa: E402
from study.engine.train import make_optimizer, sync  # noqa: E402

PCAM_CPU_BATCH_SIZES = (8, 16, 32)


def mnist_setup(batch: int, device: torch.device):
    model = RegressionCNN().to(device)
    if device.type == "cpu":  # as run_mnist
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, 1, 28, 28, device=device) * 255
    return model, x, x.mean((1, 2, 3)), torch.nn.functional.mse_loss, "adam", None


def pcam_setup(batch: int, device: torch.device):
    model = VGG16Patches(None).to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":  # as run_pcam
        model = model.to(memory_format=torch.channels_last)
    raw = torch.randint(0, 256, (batch, 96, 96, 3), dtype=torch.uint8, device=device)
    x = to_input(raw, train=False)
    y = torch.randint(0, 2, (batch,), device=device).float()
    return model, x, y, torch.nn.functional.binary_cross_entropy_with_logits, "sgd", amp


def step_times(setup, batch: int, device: torch.device, rounds: int, every: int) -> tuple[float, float]:
    """Median seconds of a plain step and of a probe step, timed alternately."""
    model, x, y, loss_fn, optimizer_name, amp = setup(batch, device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), 1e-4, 0.9, device)
    noise = NoiseScale(model.parameters(), every)

    def loss_of(xb, yb):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return loss_fn(model(xb), yb)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        optimizer.step()

    def probe():
        optimizer.zero_grad(set_to_none=True)
        noise.probe(loss_of, x, y)
        optimizer.step()

    reps = max(1, round(0.5 / max(timed(plain, device, 1), 1e-4)))  # ~0.5 s per timing: short steps repeat
    times = {plain: [], probe: []}
    for _ in range(rounds):
        for way in (plain, probe):
            times[way].append(timed(way, device, reps))
    return statistics.median(times[plain]), statistics.median(times[probe])


def timed(way, device: torch.device, reps: int) -> float:
    way()  # warm: allocations, oneDNN/cuDNN choices
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        way()
    sync(device)
    return (time.perf_counter() - started) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=NOISE_EVERY, help="probe interval, steps (the flag)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timings of each kind of step")
    p.add_argument("--mnist-batch-sizes", type=int, nargs="*", default=list(MNIST_BATCH_SIZES))
    p.add_argument("--pcam-batch-sizes", type=int, nargs="*", default=None,
                   help=f"default {list(PCAM_BATCH_SIZES)} on CUDA, {list(PCAM_CPU_BATCH_SIZES)} on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (a trial's --cpus-per-trial)")
    args = p.parse_args(argv)
    if args.every < 1 or args.rounds < 1 or args.threads < 1:
        p.error(f"--every, --rounds and --threads must be >= 1, got {args.every}, {args.rounds}, {args.threads}")
    if any(b < 2 for b in args.mnist_batch_sizes + (args.pcam_batch_sizes or [])):
        p.error("batch sizes must be >= 2 (a probe splits the batch)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    pcam_sizes = args.pcam_batch_sizes
    if pcam_sizes is None:
        pcam_sizes = list(PCAM_BATCH_SIZES if device.type == "cuda" else PCAM_CPU_BATCH_SIZES)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{datetime.date.today()}  {device_name(device)}  torch {torch.__version__}  threads {args.threads}  "
          f"probe every {args.every} steps, median of {args.rounds} rounds  (load {load:.2f})")
    print(f"{'study':>6} {'batch':>6} {'plain step':>12} {'probe step':>12} {'probe/plain':>12} "
          f"{'noise on: +time':>16}")
    worst = 0.0
    for study, setup, sizes in (("mnist", mnist_setup, args.mnist_batch_sizes), ("pcam", pcam_setup, pcam_sizes)):
        for batch in sizes:
            torch.manual_seed(0)
            plain, probe = step_times(setup, batch, device, args.rounds, args.every)
            extra = (probe - plain) / (args.every * plain)
            worst = max(worst, extra)
            print(f"{study:>6} {batch:>6} {plain * 1e3:>9.2f} ms {probe * 1e3:>9.2f} ms {probe / plain:>11.2f}x "
                  f"{100 * extra:>15.1f}%", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"largest extra training time with noise on: {100 * worst:.1f}%  (load {load:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
