"""What TF32 does to the MNIST regression: test MSE and seconds per epoch with `tf32` off and on, same seed.

    python benchmarks/tf32_effect.py [--data-dir DIR] [--target var] [--batch-size 64] [--epochs 2]
                                     [--train-limit 20000] [--test-limit 0] [--device auto]

Runs `study.mnist.trainable.run_mnist` (a trial without Ray) twice with the config's `tf32` False and True: the same
seed, data and order, so the only difference is the precision of the convolutions and matmuls (TF32 rounds their
inputs to 10 mantissa bits on Ampere and later). The network sees raw 0..255 pixels and the variance target is in
the thousands, which is where a precision loss would show. On CPU TF32 does not exist and both runs are the same.
Without --data-dir, synthetic digits stand in.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.mnist_trial import device_name, load_data  # noqa: E402
from study import metrics as M  # noqa: E402
from study.mnist import stored  # noqa: E402
from study.mnist.workload import TARGETS  # noqa: E402
from study.mnist import targets as regression_targets  # noqa: E402
from study.engine.memory import configure_cuda  # noqa: E402
from study.mnist.trainable import run_mnist  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir")
    p.add_argument("--target", choices=TARGETS, default="var")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=20_000)
    p.add_argument("--test-limit", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if min(args.batch_size, args.epochs, args.train_limit) < 1 or args.test_limit < 0:
        p.error("--batch-size, --epochs and --train-limit must be at least 1, --test-limit >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU here")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    train_x, test_x, source = load_data(argparse.Namespace(data_dir=args.data_dir, train_limit=args.train_limit,
                                                              test_limit=args.test_limit))
    targets = {args.target: tuple(regression_targets.targets(x, args.target) for x in (train_x, test_x))}
    data = {"train_x": train_x, "test_x": test_x, "targets": targets}
    print(f"{device_name(device)}, torch {torch.__version__}; {source}, {len(train_x)} train / {len(test_x)} test "
          f"images, target {args.target}, batch {args.batch_size}, {args.epochs} epochs")
    mse = {}
    for tf32 in (False, True):
        cfg = stored.train_config(dict(target=args.target, batch_size=args.batch_size, epochs=args.epochs,
                                       seed=args.batch_size, tf32=tf32))
        configure_cuda(device, tf32=tf32, benchmark=False)  # as train_mnist sets up a trial
        rows = []
        run_mnist(cfg, data, device, lambda metrics, state: rows.append(metrics))
        seconds = sorted(r[M.EPOCH_SECONDS] for r in rows[1:])[len(rows[1:]) // 2]
        mse[tf32] = rows[-1][M.TEST_MSE]
        print(f"tf32 {'on ' if tf32 else 'off'}: test MSE {mse[tf32]:.6g}, {seconds:.2f} s/epoch")
    change = (mse[True] - mse[False]) / mse[False] if mse[False] else float("nan")
    print(f"test MSE with tf32 relative to without: {change:+.3%}" + (" (CPU: no TF32)" if device.type == "cpu"
                                                                        else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
