"""PCam training throughput: images/s of the project's trial against a plain fp32 loop fed by a DataLoader.

    python benchmarks/pcam_train.py [--data-dir DIR [--limit N]] [--n 16384] [--eval-n 512] [--batch-size 128]
                                    [--epochs 3] [--packed 1 4] [--device auto] [--memory-batch 512] [--lr 1e-4]

(a) the project: `study.mnist.trainable.run_pcam`, a PCam trial as Tune runs it minus Ray: PatchBatches (the split on
    the GPU when it fits), batched `to_input` augmentation on the device, bf16 autocast, channels_last, fused SGD,
    the gradient noise scale. Its throughput is the trial's training images over its epoch seconds plus its probe
    seconds (training steps only, synchronised), the median over the epochs after the first (which holds cuDNN's
    autotuning and allocations).
(b) the baseline: `torchvision.datasets.PCAM` with the same augmentations per item (v2 transforms) in a
    `DataLoader` (batch size as (a), shuffled, pinned memory, os.cpu_count() / P workers), the same
    `VGG16Patches` in fp32 (with PyTorch's defaults, so cuDNN may use TF32 for the convolutions) and contiguous
    NCHW input, `torch.optim.SGD(momentum=0.9)`, the plain loop; timed the same way (a synchronised wall clock
    per epoch, median over the epochs after the first).
Both train the same model (random init: weights do not change the speed) on the same HDF5 files, lr --lr.

--packed P1 P2 ...: for each P, P processes share one GPU, as P Tune trials with --gpus-per-trial 1/P would (each
the project's with its memory capped at 1/P of the GPU less a CUDA context, as `train_pcam` does; packed, each
reads pinned host batches). They start every epoch together (a barrier), and an epoch's figure is all their
images over the time the slowest took; each process's own rate and peak memory are printed. The model FLOP
utilisation is images/s x the FLOPs of a training step per image (FlopCounterMode) over the bf16 peak.
Alone, the trial's process also measures its CUDA context (driver state, cuBLAS/cuDNN handles and kernels, after
training): the card's used memory less PyTorch's reserve and what was in use before the trial started, printed
against the allowance packed trials leave for it (study.engine.memory.CUDA_CONTEXT_BYTES).
--memory-batch B: afterwards one project trial at batch B runs one epoch alone, and its peak GPU memory
(torch.cuda.max_memory_allocated, the `gpu_memory_mb` every PCam trial reports, and the peak reserved by
PyTorch's caching allocator, which the per-trial cap limits) is printed against a quarter of the GPU (the
default --gpus-per-trial 0.25).

--limit N trains both on the first N patches of the train split. Without --data-dir, random patches in the
official HDF5 layout are written to a temporary folder (--n train, --eval-n validation and test). On CPU this
runs, slowly, to check the benchmark itself; the goal (>= 5x, alone and packed) is about CUDA.
"""

import argparse
import datetime
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.pcam_pipeline import per_item_transform, torchvision_root, write_random_split  # noqa: E402
from study import metrics as M  # noqa: E402
from study.pcam import stored  # noqa: E402
from study.pcam import data as pcam, writer as pcam_writer  # noqa: E402
from study.engine.memory import CUDA_CONTEXT_BYTES  # noqa: E402
from study.engine.train import sync  # noqa: E402

def write_random_set(folder: Path, n: int, n_eval: int) -> Path:
    """Random train (n), valid and test (n_eval each) splits in the official layout; returns the folder."""
    write_random_split(folder, n)
    rng = np.random.default_rng(1)
    for split in ("valid", "test"):
        pcam_writer.write_split(folder, split, rng.integers(0, 256, (n_eval, 96, 96, 3), dtype=np.uint8),
                         rng.integers(0, 2, n_eval))
    return folder


# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, SXM parts) for the model FLOP utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def training_flops_per_image(freeze_blocks: int = 2) -> float:
    """FLOPs of one training step per image (forward and backward, counted by PyTorch's FlopCounterMode on a
    CPU batch of two; frozen blocks compute no weight gradients, which the count reflects)."""
    from torch.utils.flop_counter import FlopCounterMode

    from study.pcam.model import VGG16Patches

    model = VGG16Patches(None, freeze_blocks)
    x = torch.randn(2, 3, 96, 96)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / len(x)


def peak_tflops(device: torch.device, given: float) -> float | None:
    if given:
        return given
    from benchmarks.mnist_trial import device_name  # not at the top: see main

    name = device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


BARRIER_SECONDS = 900  # longest wait for the slowest neighbour at an epoch boundary before giving up


def combined_rate(outs: list[dict]) -> tuple[float, list[float]]:
    """Images/s of all processes together, and of each alone: medians over the epochs after the first (all of them
    when there is only one). The processes start each epoch together (a barrier), so an epoch's combined rate is
    the images they trained over the time the slowest of them took."""
    epochs = list(zip(*(o["epochs"] for o in outs)))  # per epoch: (images, seconds) of every process
    epochs = epochs[1:] or epochs
    together = statistics.median(sum(i for i, _ in e) / max(s for _, s in e) for e in epochs)
    alone = [statistics.median(i / s for i, s in (o["epochs"][1:] or o["epochs"])) for o in outs]
    return together, alone


def project_trial(args, data_dir: str, device: torch.device, share: float, batch_size: int, epochs: int,
                  barrier) -> dict:
    """One project trial: (images, seconds) of each trained epoch, peak GPU memory allocated and reserved, and alone on
    CUDA its process's CUDA context (MiB)."""
    from study.engine.memory import cap_memory, configure_cuda
    from study.pcam.trainable import run_pcam

    cfg = stored.train_config(dict(batch_size=batch_size, optimizer="sgd", lr=args.lr, epochs=epochs,
                                   data_dir=data_dir, weights="none", train_limit=args.limit))
    configure_cuda(device, tf32=cfg.tf32, benchmark=True)  # as train_pcam sets up a trial
    budget = cap_memory(device, share)
    seen = []

    def report(metrics, state, files):
        seen.append(metrics)
        barrier.wait(BARRIER_SECONDS)  # every trial starts its next epoch with its neighbours

    run_pcam(cfg, None, device, report, memory_budget=budget, packed=share < 1)
    trained = [m for m in seen if m[M.EPOCH] > 0]
    if any(m[M.DIVERGED] for m in trained):
        raise RuntimeError(f"the project trial diverged at lr {args.lr}: lower --lr")
    reserved = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else math.nan
    context = math.nan
    if device.type == "cuda" and share == 1:  # alone on the card: what it uses besides the cache is its context
        free, total = torch.cuda.mem_get_info(device)
        context = (total - free - torch.cuda.memory_reserved(device) - args.used_before) / 2**20
    # The whole epoch, noise probes included (the trial reports them apart): the work the project does per epoch.
    return {"epochs": [(m[M.IMAGES_PER_SECOND] * m[M.EPOCH_SECONDS], m[M.EPOCH_SECONDS] + m.get(M.PROBE_SECONDS, 0.0))
                       for m in trained],
            "memory_mb": max(m[M.GPU_MEMORY_MB] for m in seen), "reserved_mb": reserved, "context_mb": context}


def baseline_trial(args, device: torch.device, workers: int, barrier) -> dict:
    """The plain fp32 loop over torchvision's PCAM in a DataLoader: (images, seconds) of each epoch."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import PCAM

    from study.pcam.model import VGG16Patches

    dataset = PCAM(args.tv_root, split="train", transform=per_item_transform())
    if args.limit:
        dataset = Subset(dataset, range(args.limit))
    # torchvision's PCAM holds the h5py module, which cannot be pickled: the workers are forked, and forked before
    # this process touches CUDA (they only read and transform on the CPU).
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=True, multiprocessing_context="fork", pin_memory=device.type == "cuda")
    batches = iter(loader)
    model = VGG16Patches(None, freeze_blocks=2).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    epochs = []
    for epoch in range(args.epochs):
        if epoch:
            batches = iter(loader)  # persistent workers: the same processes serve every epoch
        barrier.wait(BARRIER_SECONDS)
        sync(device)
        started, seen = time.perf_counter(), 0
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).float()
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        sync(device)
        epochs.append((seen, time.perf_counter() - started))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the baseline diverged at lr {args.lr}: lower --lr")
    return {"epochs": epochs}


def child(way: str, args, data_dir: str, device: str, packed: int, barrier, results) -> None:
    """One trial in its own process (its own CUDA context, as a Tune trial has), in step with its neighbours."""
    try:
        device = torch.device(device)
        torch.set_num_threads(max(1, os.cpu_count() // packed))
        if way == "project":
            out = project_trial(args, data_dir, device, 1 / packed, args.batch_size, args.epochs, barrier)
        elif way == "memory":
            out = project_trial(args, data_dir, device, 1.0, args.memory_batch, 1, barrier)
        else:
            out = baseline_trial(args, device, max(1, os.cpu_count() // packed), barrier)
        results.put(out)
    except BaseException as err:  # reported to the parent, which stops with it
        barrier.abort()  # neighbours waiting for this process stop waiting
        results.put({"error": f"{way}: {type(err).__name__}: {err}"})


def run_packed(way: str, args, data_dir: str, device: torch.device, packed: int) -> list[dict]:
    """`packed` processes of one way at once; each one's result. Stops (non-zero exit) if one fails or dies."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, results = ctx.Barrier(packed), ctx.Queue()
    procs = [ctx.Process(target=child, args=(way, args, data_dir, str(device), packed, barrier, results))
             for _ in range(packed)]
    for p in procs:
        p.start()
    outs = []
    try:
        while len(outs) < packed:  # results before join: a child cannot exit while its queue item is unread
            try:
                outs.append(results.get(timeout=5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # killed (e.g. for memory) or crashed without a word
                    raise SystemExit(f"benchmark failed: a {way} process died (exit code {dead[0]})")
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise SystemExit("benchmark failed: " + "; ".join(errors))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return outs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="a PCam folder with the three splits (official names)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N patches only (0: all)")
    parser.add_argument("--n", type=int, default=16384, help="train patches to generate when no --data-dir")
    parser.add_argument("--eval-n", type=int, default=512,
                        help="validation and test patches to generate (evaluated, not timed)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial; the first is left out")
    parser.add_argument("--packed", type=int, nargs="+", default=[1, 4], help="trials sharing the device at once")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--memory-batch", type=int, default=0, help="also measure peak GPU memory at this batch")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of both ways")
    parser.add_argument("--peak-tflops", type=float, default=0,
                        help="the GPU's dense bf16 peak for the FLOP utilisation (default: known H200/H100/A100...)")
    args = parser.parse_args(argv)
    # Here, not at the top: every trial process re-imports this module (spawn), and mnist_trial brings in
    # study.mnist.trainable and Ray, seconds of imports that the baseline's processes do not need.
    from benchmarks.mnist_trial import device_name

    if (min(args.epochs, args.batch_size, *args.packed) < 1 or args.eval_n < 2
            or min(args.memory_batch, args.limit, args.peak_tflops) < 0 or args.lr <= 0):
        parser.error("--epochs, --batch-size and --packed must be at least 1, --eval-n at least 2, --memory-batch "
                     "and --limit >= 0, --lr > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU here")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    with tempfile.TemporaryDirectory(prefix="pcam-train-bench-") as tmp:
        data_dir = args.data_dir or str(write_random_set(Path(tmp) / "data", args.n, args.eval_n))
        files = pcam.locate(data_dir)
        n = pcam.verify(files)["train"]
        n = min(n, args.limit or n)
        args.tv_root = str(torchvision_root(*files["train"], Path(tmp) / "tv"))  # links: data_dir may be read-only
        if n < max(args.batch_size, args.memory_batch):
            parser.error(f"the train split has {n} patches, fewer than one batch")
        print(f"{datetime.date.today()}, {device_name(device)}, torch {torch.__version__}, {os.cpu_count()} cores; "
              f"train split {n} patches, batch {args.batch_size}, {args.epochs} epochs per trial, lr {args.lr:g}")
        flops, peak = training_flops_per_image(), peak_tflops(device, args.peak_tflops)
        print(f"model FLOPs per training image: {flops / 1e9:.2f} GFLOP (forward + backward, FlopCounterMode); "
              f"bf16 peak {f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}")
        if device.type == "cuda":  # in use before any trial starts (this process, other tenants of the card)
            free, total = torch.cuda.mem_get_info(device)
            args.used_before = total - free
        for packed in args.packed:
            project = run_packed("project", args, data_dir, device, packed)
            if packed == 1 and device.type == "cuda":
                print(f"CUDA context of one trial process: {project[0]['context_mb']:.0f} MiB (used on the card "
                      f"after training, less PyTorch's reserve and what was in use before; packed trials allow "
                      f"{CUDA_CONTEXT_BYTES / 2**20:.0f} MiB each)")
            (a, ours), (b, theirs) = combined_rate(project), combined_rate(run_packed("baseline", args, data_dir,
                                                                                       device, packed))
            # One decimal: a tiny CPU run (the test's) trains below one image a second, which must not print as 0.
            each = lambda rates: ", ".join(f"{r:.1f}" for r in rates)  # noqa: E731
            print(f"{packed} trial(s) at once: project {a:8.1f} images/s ({each(ours)}) | "
                  f"baseline fp32 DataLoader({max(1, os.cpu_count() // packed)} workers each) {b:7.1f} images/s "
                  f"({each(theirs)}) | ratio {a / b:.2f}x")
            mfu = f"{100 * a * flops / (peak * 1e12):.1f} %" if peak and device.type == "cuda" else "not measured"
            memory = ", ".join(f"{o['memory_mb']:.0f}" for o in project)
            print(f"  project at batch {args.batch_size}, {packed} at once: model FLOP utilisation {mfu}; peak GPU "
                  f"memory per trial (MiB allocated) {memory}")
        if args.memory_batch:
            out = run_packed("memory", args, data_dir, device, 1)[0]
            if device.type == "cuda":
                quarter = torch.cuda.get_device_properties(device).total_memory / 4 / 2**20
                print(f"peak GPU memory of one trial at batch {args.memory_batch}: {out['memory_mb']:.0f} MiB "
                      f"allocated, {out['reserved_mb']:.0f} MiB reserved by PyTorch's cache (a quarter of this GPU: "
                      f"{quarter:.0f} MiB; the CUDA context, outside both, comes on top)")
            else:
                print(f"peak GPU memory at batch {args.memory_batch}: not measured on {device}")

if __name__ == "__main__":
    main()
