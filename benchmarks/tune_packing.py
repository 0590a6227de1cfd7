"""Packed MNIST trials in a real Ray Tune grid: aggregate training steps per second, P at once against one at a time.

    python benchmarks/tune_packing.py [--data-dir DIR [--train-limit N] | --smoke] [--batch-size 16] [--packed 8]
                                      [--alone 2] [--epochs 2] [--num-cpus N] [--keep DIR]

Runs the study itself twice (`python -m study.mnist`, stage 2 only: --lr given, target mean): P trials with
--gpus-per-trial 1/P (all on one GPU at once), then --alone trials with --gpus-per-trial 1 (one at a time). Each
run's figure is every trained step of all its trials over the wall time from the first trial's start to the last
one's final result (Tune's own records, read back with analysis.load): Ray's scheduling, each trial's setup,
evaluations and checkpoints are all inside it, as in a real study. The sum of the trials' training-only rates
(their `images_per_second` / batch) is printed beside it. Without a GPU the trials run on CPU, packed by CPU
share (--num-cpus / P each against all of them alone); the goal (packed >= 3x alone) is about the GPU.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from analysis.load import open_study  # noqa: E402
from study import metrics as M  # noqa: E402


def run_grid(args, name: str, trials: int, gpus: float, cpus: float, storage: Path) -> dict:
    data = ["--smoke"] if args.smoke else ["--data-dir", args.data_dir]
    if args.train_limit:
        data += ["--train-limit", str(args.train_limit)]
    command = [sys.executable, "-m", "study.mnist", *data, "--lr", "1e-3", "--targets", "mean", "--batch-sizes",
               str(args.batch_size), "--runs", str(trials), "--epochs", str(args.epochs), "--gpus-per-trial",
               f"{gpus:g}", "--cpus-per-trial", f"{cpus:g}", "--num-cpus", str(args.num_cpus), "--storage-path",
               str(storage), "--name", name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: python -m study.mnist exited {done.returncode}:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    study = open_study(str(storage / name))
    finished = [t for t in study.trials("batch_sweep") if t.outcome == "done"]
    if len(finished) != trials:
        raise SystemExit(f"{name}: {len(finished)} of {trials} trials finished")
    steps, rates = 0.0, []
    for t in finished:
        trained = [r for r in t.rows if r[M.EPOCH] > 0]
        steps += sum(r[M.IMAGES_PER_SECOND] * r[M.EPOCH_SECONDS] for r in trained) / args.batch_size
        rates.append(statistics.median(r[M.IMAGES_PER_SECOND] for r in (trained[1:] or trained)) / args.batch_size)
    wall = max(t.end_time for t in finished) - min(t.start_time for t in finished)
    return {"trials": trials, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "sum_of_rates": sum(rates), "median_trial_rate": statistics.median(rates),
            "devices": sorted({str(t.last(M.DEVICE, "?")) for t in finished})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="folder with the four MNIST idx files")
    source.add_argument("--smoke", action="store_true", help="the study's built-in synthetic digits")
    p.add_argument("--train-limit", type=int, default=0, help="training images per trial (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--packed", type=int, default=8, help="trials sharing one GPU at once")
    p.add_argument("--alone", type=int, default=2, help="trials run one at a time (their rate is per trial)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--keep", help="keep both studies in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.packed, args.alone, args.epochs, args.num_cpus) < 1 or args.train_limit < 0:
        p.error("--batch-size, --packed, --alone, --epochs and --num-cpus must be at least 1, --train-limit >= 0")
    import torch

    gpu = torch.cuda.is_available()
    # On a GPU one CPU per packed trial at least; on CPU the CPUs are what is shared.
    cpus_packed = max(1, args.num_cpus // args.packed) if gpu else args.num_cpus / args.packed
    with tempfile.TemporaryDirectory(prefix="tune-packing-") as tmp:
        storage = Path(args.keep or tmp)
        packed = run_grid(args, "packed", args.packed, 1 / args.packed, cpus_packed, storage)
        alone = run_grid(args, "alone", args.alone, 1, args.num_cpus, storage)
    for label, r, share in (("packed", packed, f"{1 / args.packed:g} GPU"), ("alone", alone, "1 GPU")):
        print(f"{label}: {r['trials']} trials at {share} each (ran on {', '.join(r['devices'])}): "
              f"{r['steps']:.0f} steps in {r['wall_s']:.1f} s wall = {r['steps_per_s']:.3g} steps/s | training "
              f"only: sum of trial rates {r['sum_of_rates']:.3g} steps/s, median trial {r['median_trial_rate']:.3g}")
    print(f"ratio packed / alone at batch {args.batch_size}: {packed['steps_per_s'] / alone['steps_per_s']:.2f}x "
          f"wall (goal >= 3x); training only {packed['sum_of_rates'] / alone['median_trial_rate']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
