"""Tune's driver overhead per trial: a grid of trivial trials against the same function called in-process.

    python benchmarks/tune_overhead.py [--trials 1000] [--rows 5] [--num-cpus 2] [--keep DIR]

The steps-to-result study puts batch sizes x configurations (1,000 and more) into one Tune grid, so the driver's
cost per trial bounds how small a trial may be before the driver dominates. Each trial here is a plain function
trainable that reports --rows rows and returns: everything it costs is Tune's (scheduling, actor reuse, result
processing, experiment-state checkpoints, per-trial files). The grid runs twice, at --trials / 10 and --trials,
so the per-trial figure can be read both as an average and as the marginal cost between the two sizes (equal if
the driver's cost is linear in the number of trials). Baseline, measured in the same run: the same function
called --trials times in-process with a no-op report. Ray's start-up and a warm-up grid (one trial per CPU, to
start the worker processes) are outside every timed span.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def trivial(config, report) -> None:
    for step in range(config["rows"]):
        report({"step": step, "value": config["index"] * 0.5 + step})


def tune_trial(config) -> None:
    from ray import tune

    trivial(config, tune.report)


def run_grid(trials: int, rows: int, storage: Path) -> float:
    """Wall seconds of Tuner.fit over a grid of `trials` trivial trials; every trial must end without error."""
    from ray import tune

    tuner = tune.Tuner(
        tune_trial,
        param_space={"index": tune.grid_search(list(range(trials))), "rows": rows},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"overhead-{trials}-{time.monotonic_ns()}", storage_path=str(storage),
                                  verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    if results.num_errors or len(results) != trials:
        raise SystemExit(f"grid of {trials}: {len(results)} results, {results.num_errors} errors")
    return wall


def in_process(trials: int, rows: int) -> float:
    reported = []
    start = time.perf_counter()
    for index in range(trials):
        trivial({"index": index, "rows": rows}, reported.append)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=1000, help="trials in the large grid (the small one has 1/10)")
    p.add_argument("--rows", type=int, default=5, help="rows each trial reports")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--keep", help="keep Tune's folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.trials < 10 or args.rows < 1 or args.num_cpus < 1:
        p.error("--trials must be at least 10, --rows and --num-cpus at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    small = args.trials // 10
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
            storage = Path(args.keep or tmp)
            run_grid(args.num_cpus, args.rows, storage)  # warm-up: starts the worker processes, untimed
            wall_small = run_grid(small, args.rows, storage)
            wall_large = run_grid(args.trials, args.rows, storage)
    finally:
        ray.shutdown()
    baseline = in_process(args.trials, args.rows)
    load = os.getloadavg()[0]
    per_small, per_large = wall_small / small, wall_large / args.trials
    marginal = (wall_large - wall_small) / (args.trials - small)
    print(f"{time.strftime('%Y-%m-%d')}  ray {ray.__version__}  {args.num_cpus} CPUs  {args.rows} rows per trial  "
          f"(load {load:.2f})")
    print(f"grid of {small:>6} trials: {wall_small:9.2f} s wall = {per_small * 1e3:8.2f} ms per trial")
    print(f"grid of {args.trials:>6} trials: {wall_large:9.2f} s wall = {per_large * 1e3:8.2f} ms per trial")
    print(f"marginal cost per trial between the two grids: {marginal * 1e3:.2f} ms "
          f"(large / small per-trial ratio {per_large / per_small:.2f}; 1.00 = linear)")
    print(f"baseline, the same {args.trials} trials in-process: {baseline:.4f} s = "
          f"{baseline / args.trials * 1e6:.2f} us per trial")
    print(f"ratio Tune / in-process per trial: {per_large / (baseline / args.trials):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
