"""Where a steps-to-result trial's time goes, and trial seconds / training seconds, old schedule against new.

    python benchmarks/steps_cost.py [--data-dir ../shared/data/mnist] [--batch-sizes 16 256] [--goal 0.05]
                                    [--val-size 2000] [--device auto|cpu|cuda] [--threads N]

Runs mnist-cnn steps trials (study.engine.steps_trial.run_steps_trial, a trial as Tune runs it, minus Ray) at each batch size
on the same seed, so on the same weights step by step, on four schedules (SCHEDULES): the old one, an evaluation at
every step of the fine grid (every step to 10, then <= 10 % apart); evaluations about 2x apart with the fine grid's
weights kept in between and evaluated back when one reaches the goal (study.engine.eval_schedule); the same with
each evaluation screened (stopped once the goal is out of its reach); and the default, screened and evaluating
every fine step once a screen says the goal is near. All must give the same steps to result (printed), "splits
scored" says how many whole validation splits' worth of examples the evaluations scored. Per trial: start-up (the trial's data onto the device and its model, up to the
step-0 evaluation), training (the rows' training seconds, noise probes left out), noise probes, evaluations (inside
the evaluation function), checkpoints (torch.save of the trial's state as study.engine.bridge does, at most every
study.engine.steps_trial.CHECKPOINT_SECONDS and at the end; to a local temporary folder), the rest (the loop's own
bookkeeping, the kept weights' copies, reporting), and the ratio trial seconds / training seconds. Ray's share (the
worker's start, tune.report) is not in it: benchmarks/tune_overhead.py measures that. Without MNIST's files
(--data-dir, default ../shared/data/mnist) synthetic digits stand in. Time nothing else on the machine meanwhile
(the load average at the start is printed). After the table: a trial's start-up with its splits copied onto the
device and taken from a reused worker's cache; --profile adds torch.profiler's table of one evaluation.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.mnist_trial import device_name  # noqa: E402
from study import metrics as M  # noqa: E402
from study.engine import run_workload  # noqa: E402
from study.engine import steps_trial  # noqa: E402
from study.engine.config import TrainConfig  # noqa: E402
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL, REACHED  # noqa: E402
from study.workload import resolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = {  # run_steps_trial' schedule arguments: the old schedule, the coarse one alone, and the screens
    "every fine step": dict(coarse=None, screen=False), "coarse 2x + back": dict(screen=False, refine=False),
    "screened, coarse 2x + back": dict(refine=False), "screened, fine when near": dict()}
LR = {16: 0.01, 32: 0.01, 64: 0.02, 128: 0.03, 256: 0.05, 512: 0.05}  # nesterov 0.9: reach 5 % error on MNIST


def one_trial(batch: int, schedule: dict, args, splits, options, device) -> dict:
    workload = resolve("mnist-cnn")
    cfg = TrainConfig(workload="mnist-cnn", batch_size=batch, optimizer="nesterov", lr=LR.get(batch, 0.02),
                      momentum=0.9, seed=0, noise_every=args.noise_every, options=options)
    goal = {"metric": "val_error", "value": args.goal, "higher_is_better": False}
    extra = {GOAL: goal, BUDGET: args.budget, CHANCE: None, CONFIG: 0, steps_trial.GOALS: [goal]}
    times = {"evaluations": 0.0, "checkpoints": 0.0}
    evaluate = run_workload.WorkloadTrial.evaluate

    def timed_evaluate(self, model, settles=None):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = evaluate(self, model, settles)  # its scores are floats: the device was synchronised
        times["evaluations"] += time.perf_counter() - started
        return out

    rows, saved_at = [], [time.perf_counter()]

    def report(row, state):
        if not rows:  # the step-0 row: start-up ends, less its evaluation
            times["first_row"], times["first_evaluation"] = time.perf_counter(), times["evaluations"]
        rows.append(row)
        final = row[M.STATUS] != M.STATUS_RUNNING
        if final or time.perf_counter() - saved_at[0] >= steps_trial.CHECKPOINT_SECONDS:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / M.STATE_FILE)
            times["checkpoints"] += time.perf_counter() - started
            saved_at[0] = time.perf_counter()

    run_workload.WorkloadTrial.evaluate = timed_evaluate
    try:
        started = time.perf_counter()
        last = steps_trial.run_steps_trial(cfg, extra, workload, splits, device, report, **schedule)
        total = time.perf_counter() - started
    finally:
        run_workload.WorkloadTrial.evaluate = evaluate
    train = last[M.TRAIN_SECONDS]
    probes = sum(r[M.PROBE_SECONDS] for r in rows)
    startup = times["first_row"] - started - times["first_evaluation"]
    rest = total - train - probes - times["evaluations"] - times["checkpoints"] - startup
    scored = sum(r.get(M.EVAL_EXAMPLES, args.val_size) for r in rows) / args.val_size
    return {"steps": last[M.STEP] if last[M.STATUS] == REACHED else None, "rows": len(rows), "total": total,
            "screened": sum(bool(r.get(M.SCREENED)) for r in rows), "scored": scored,
            "startup": startup, "train": train, "probes": probes, "evaluations": times["evaluations"],
            "checkpoints": times["checkpoints"], "rest": rest, "ratio": total / train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    p.add_argument("--goal", type=float, default=0.05, help="val_error goal")
    p.add_argument("--budget", type=int, default=3000, help="step budget (the goal comes well before)")
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--noise-every", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also torch.profiler's table of one evaluation")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    real = (Path(args.data_dir) / "train-images-idx3-ubyte.gz").exists()
    workload = resolve("mnist-cnn")
    options = workload.option_values({"val_size": args.val_size, **({"data_dir": args.data_dir} if real else
                                                                     {"synthetic": True})})
    splits = workload.load(options)
    print(f"# steps_cost {datetime.date.today()} on {device_name(device)} ({device.type}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{'MNIST' if real else 'synthetic digits'}, val {args.val_size}, goal val_error <= {args.goal}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print("| batch | schedule | steps to result | rows (screened) | splits scored | trial s | start-up | training "
          "| probes | evaluations | checkpoints | rest | trial / training |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        for name, schedule in SCHEDULES.items():
            r = one_trial(batch, schedule, args, splits, options, device)
            print(f"| {batch} | {name} | {r['steps']} | {r['rows']} ({r['screened']}) | {r['scored']:.1f} | "
                  f"{r['total']:.1f} | {r['startup']:.1f} | {r['train']:.1f} | {r['probes']:.1f} | "
                  f"{r['evaluations']:.1f} | {r['checkpoints']:.2f} | {r['rest']:.1f} | {r['ratio']:.2f} |", flush=True)
    cold, warm = startup(workload, options, splits, device)
    print(f"\nstart-up of a trial (data onto the device, model, optimizer), median of 5: {cold * 1000:.0f} ms "
          f"copying the splits, {warm * 1000:.0f} ms from a reused worker's cache")
    if args.profile:
        profile(workload, options, splits, device)


def startup(workload, options, splits, device) -> tuple[float, float]:
    """WorkloadTrial's set-up, seconds (median of 5): the splits copied onto the device, and taken up from the
    worker's cache (study.engine.run_workload.on_device) as a reused worker's next trial of the study does."""
    cfg = TrainConfig(workload="mnist-cnn", batch_size=16, optimizer="nesterov", lr=0.01, options=options)
    times = {True: [], False: []}
    for cached in (False, True) * 5:
        if not cached:
            run_workload._ON_DEVICE.clear()
        started = time.perf_counter()
        run_workload.WorkloadTrial(cfg, workload, splits, device, scored=("val",))
        times[cached].append(time.perf_counter() - started)
    return statistics.median(times[False]), statistics.median(times[True])


def profile(workload, options, splits, device) -> None:
    """torch.profiler's table of one whole evaluation of the validation split (after one to warm up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cfg = TrainConfig(workload="mnist-cnn", batch_size=16, optimizer="nesterov", lr=0.01, options=options)
    trial = run_workload.WorkloadTrial(cfg, workload, splits, device, scored=("val",))
    trial.evaluate(trial.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        trial.evaluate(trial.model)
    print("\none evaluation of the validation split, torch.profiler:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

if __name__ == "__main__":
    main()
