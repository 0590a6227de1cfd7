"""The MNIST regression study: `python -m study.mnist --data-dir DIR` (or `--smoke` on built-in synthetic digits).

Stage 1 searches the learning rate per target at batch 32 (a log grid, then a finer grid round the best), selected
on a held-out validation split; stage 2 sweeps the batch sizes with each target's chosen rate, 10 seeded runs each.
Each stage is one Tune experiment under <storage-path>/<name>/: lr_coarse, lr_fine, batch_sweep; the chosen
rates are in chosen_lr.json, the arguments in study.json. `tensorboard --logdir <storage-path>/<name>`.
The model, loss, metrics, data splits, scaling and default grid are the mnist-regression workload's
(study/mnist/workload.py); this module keeps the original study's flags, stages and stored layout, and
the one driver (study.commands.driver) runs them.
"""

import argparse
import dataclasses
import math
import sys

from ray import tune

from study.commands import cli_checks as checks
from study.commands import driver
from study.commands import flags
from study import metrics as M
from study.commands.console import StudyConsole
from study.engine.config import NOISE_EVERY, TRAIN_OPTIMIZERS, TrainConfig
from study.data import mnist as mnist_data
from study.mnist import targets as regression_targets
from study.errors import StudyError
from study.engine.lr_scaling import scaling_rules
from study.commands.lr_search import best as best_trial
from study.commands.tensorboard import StudyTensorBoard, write_experiment
from study.mnist import board
from study.mnist import stored
from study.mnist.trainable import train_mnist
from study.commands.tuning import add_common_args, check_common_args, grid_axis
from study.mnist.workload import TARGETS, read, workload

SEARCH = workload.stages["lr_search"]  # the learning-rate search stage the workload declares
OPTIONS = {o.name: o for o in workload.options}

SMOKE = dict(targets=["mean", "std"], lr_grid=[1e-3, 1e-2, 1e3], fine_factors=[0.5, 1.0, 2.0], batch_sizes=[16, 64],
             runs=2, epochs=2, val_size=128, train_limit=0, test_limit=0)  # lr 1e3 diverges (NaN) on purpose


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.Parser(prog="python -m study.mnist", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    flags.add_options(p, workload, ("data_dir", "download"), group=data, download=False)
    flags.add(data, "smoke", help={"smoke": "the whole pipeline on built-in synthetic digits with a tiny grid "
                                            "(under a minute on CPU)"})
    flags.add_options(p, workload, ("train_limit", "test_limit"), group=data)
    grid = p.add_argument_group("grid (defaults: the original study)")
    # The original's own flags: the learning-rate search stage per target, and one optimizer.
    grid.add_argument("--targets", nargs="+", default=None, help=f"of {', '.join(TARGETS)} (default all)")
    grid.add_argument("--lr", type=float, default=None, help="use this learning rate for every target; skips stage 1")
    grid.add_argument("--lr-grid", type=float, nargs="+", default=None, help="stage 1 coarse grid")
    grid.add_argument("--fine-factors", type=float, nargs="+", default=None, help="stage 1 fine grid, x best lr")
    grid.add_argument("--lr-search-batch", type=int, default=SEARCH["batch_size"],
                      help=f"stage 1 batch size (default {SEARCH['batch_size']}, the original's)")
    grid.add_argument("--select-on", choices=("val", "test"), default="val",
                      help="stage 1 selects on the validation split (default) or, as the original, the test set")
    grid.add_argument("--optimizer", default=workload.defaults["optimizers"][0],
                      help=f"one of {', '.join(TRAIN_OPTIMIZERS)}")
    flags.add_options(p, workload, ("val_size",), group=grid)
    flags.add(grid, "batch_sizes", "runs", "epochs", help=dict(
        batch_sizes="stage 2 batch sizes",
        runs=f"seeded runs per batch size, seed = batch size + run (default {len(workload.defaults['seeds'])})",
        epochs="epochs per trial (default 10)"))
    flags.add(grid, "momentum", momentum=0.0, help={"momentum": "SGD momentum"})
    flags.add_options(p, workload, ("input_scale", "target_scale"), group=grid,
                      **{n: OPTIONS[n].default for n in ("input_scale", "target_scale")})
    flags.add(grid, "noise_scale", "tf32", "noise_every", "lr_scaling", "lr_reference_batch", "warmup_epochs",
              noise_every=NOISE_EVERY, lr_scaling=["none"], lr_reference_batch=SEARCH["batch_size"],
              warmup_epochs=0.0, help={"lr_scaling": "stage 2: lr = chosen x (batch / --lr-reference-batch) or its "
                                                     "square root; several rules are a grid axis (same seeds)"})
    add_common_args(p, gpus_per_trial=0.125)
    args = p.parse_args(argv)
    defaults = dict(targets=list(TARGETS), lr_grid=list(SEARCH["lr_grid"]),
                    fine_factors=list(SEARCH["fine_factors"]), batch_sizes=list(workload.defaults["batch_sizes"]),
                    runs=len(workload.defaults["seeds"]), epochs=workload.defaults["epochs"],
                    val_size=OPTIONS["val_size"].default, train_limit=0, test_limit=0)
    return driver.paper_defaults(p, args, defaults, SMOKE, "mnist")


def check_flags(args) -> None:
    """Refuse what needs no data to judge before the data is read: wrong ranges, NaN, repeated grid values, a grid
    too large for the driver (counted, never built)."""
    check_common_args(args)
    checks.check_lr_flags(args)
    flags.check(args)
    for flag in ("--train-limit", "--test-limit", "--val-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 0:
            raise StudyError(f"{flag} must be >= 0 (0 for --train-limit/--test-limit: all images), got {value}")
    if args.lr_search_batch < 1:
        raise StudyError(f"--lr-search-batch must be >= 1, got {args.lr_search_batch}")
    for flag in ("--targets", "--lr-grid", "--fine-factors"):
        checks.check_unique(flag, getattr(args, flag[2:].replace("-", "_")))
    targets, rules = len(args.targets or ()), len(scaling_rules(args.lr_scaling))
    sweep = targets * len(args.batch_sizes or ()) * args.runs * rules
    search = 0 if args.lr is not None else targets * (len(args.lr_grid or ()) + len(args.fine_factors or ()))
    checks.check_grid_size(search + sweep, getattr(args, "max_trials", checks.MAX_TRIALS),
                           f"{search} learning-rate search + {sweep} batch sweep")


def check_grid(args, n_train: int) -> None:
    """Refuse impossible grids before Ray starts (after check_flags); every message names the value and the allowed
    range."""
    if not args.targets or not args.batch_sizes or (args.lr is None and not (args.lr_grid and args.fine_factors)):
        raise StudyError("empty grid: --targets, --batch-sizes, --lr-grid and --fine-factors need at least one value")
    rates = ([args.lr] if args.lr is not None else list(args.lr_grid)) + list(args.fine_factors or [])
    for value in rates:
        if not (math.isfinite(value) and value > 0):
            raise StudyError(f"learning rates and fine factors must be positive numbers, got {value}")
    if args.lr is None and not 0 < args.val_size < n_train and args.select_on == "val":
        raise StudyError(f"--val-size must be in 1..{n_train - 1} (training images: {n_train}), got {args.val_size}")
    for b in args.batch_sizes:
        if not 1 <= b <= n_train:
            raise StudyError(f"batch size {b} is outside 1..{n_train} (the number of training images)")
    search_train = n_train - (args.val_size if args.select_on == "val" else 0)
    if args.lr is None and not 1 <= args.lr_search_batch <= search_train:
        raise StudyError(f"--lr-search-batch {args.lr_search_batch} is outside 1..{search_train}")


def load_data(args) -> tuple[mnist_data.Mnist, str]:
    options = dict(synthetic=args.smoke, data_dir=args.data_dir or "", download=args.download, val_size=args.val_size,
                   train_limit=args.train_limit, test_limit=args.test_limit)
    return read(options), "synthetic digits (built-in)" if args.smoke else args.data_dir


def trial_base(args, version: str) -> TrainConfig:
    """What every trial of the study shares; each stage sets its grid on top, in the stored layout
    (study.mnist.stored), so each trial stores its full config."""
    return stored.train_config(dict(
        epochs=args.epochs, optimizer=args.optimizer, momentum=args.momentum, input_scale=args.input_scale,
        target_scale=args.target_scale, noise_scale=args.noise_scale == "on", tf32=getattr(args, "tf32", False),
        noise_every=args.noise_every, code_version=version))


def choose_lr(results, select_on: str) -> dict:
    """Per target, the learning rate with the lowest final MSE among trials that finished and did not diverge
    (study.commands.lr_search.best, per target)."""
    key = M.VAL_MSE if select_on == "val" else M.TEST_MSE
    by_target = {}
    for result in results:
        if result.config:
            by_target.setdefault(result.config["target"], []).append(result)
    found = {t: best_trial(rs, key, higher_is_better=False) for t, rs in by_target.items()}
    return {t: {"lr": f["lr"], "mse": f[key], "selected_on": key} for t, f in found.items() if f is not None}


def hparam_domains(args) -> dict:
    """Every value each grid hyperparameter can take in this study (TensorBoard's HPARAMS experiment)."""
    search = args.lr is None
    rules = scaling_rules(args.lr_scaling)
    lrs = {args.lr} if not search else set(args.lr_grid) | {g * f for g in args.lr_grid for f in args.fine_factors}
    return dict(stage=(["lr_coarse", "lr_fine"] if search else []) + ["batch_sweep"], target=args.targets,
                optimizer=[args.optimizer], lr=sorted(lrs), lr_factor=args.fine_factors if search else [],
                lr_scaling=rules, batch_size=set(args.batch_sizes) | ({args.lr_search_batch} if search else set()),
                run=list(range(args.runs)),
                seed={b + r for b in args.batch_sizes for r in range(args.runs)} |
                     ({args.lr_search_batch} if search else set()))


def callbacks(args, stage: str, columns: list[str]) -> dict:
    """A stage's TensorBoard writer and console (study.commands.driver.Study.stage)."""
    metric = M.VAL_MSE if stage != "batch_sweep" and args.select_on == "val" else M.TEST_MSE
    return dict(tensorboard=StudyTensorBoard("mnist", stage, key_metrics=board.KEY_METRICS),
                console=StudyConsole(stage, columns, [metric]))


def lr_search(study, data, base) -> dict:
    args, folder = study.args, study.folder
    common = dict(base, batch_size=args.lr_search_batch, seed=args.lr_search_batch,
                  val_size=args.val_size if args.select_on == "val" else 0, noise_scale=False)
    coarse = study.stage("lr_coarse", train_mnist,
                         dict(common, stage="lr_coarse", target=tune.grid_search(args.targets),
                              lr=tune.grid_search(args.lr_grid)),
                         data=data, run_names=board.run_names(), **callbacks(args, "lr_coarse", ["target", "lr"]))
    best = choose_lr(coarse, args.select_on)
    missing = sorted(set(args.targets) - set(best))
    if missing:
        raise StudyError(f"stage 1: every coarse learning rate diverged or failed for {', '.join(missing)}; "
                         f"see {folder.child('lr_coarse')}")
    centre = {t: best[t]["lr"] for t in best}
    fine = study.stage("lr_fine", train_mnist, dict(common, stage="lr_fine", target=tune.grid_search(args.targets),
                                                    lr=tune.sample_from(lambda c: centre[c["target"]] * c["lr_factor"]),
                                                    lr_factor=tune.grid_search(args.fine_factors)),
                       data=data, run_names=board.run_names(centre),
                       **callbacks(args, "lr_fine", ["target", "lr_factor", "lr"]))
    chosen = choose_lr(fine, args.select_on)
    for t in args.targets:  # the fine grid includes the coarse best (factor 1), so this only guards failures
        chosen.setdefault(t, best[t])
        chosen[t]["coarse_lr"] = centre[t]
    return chosen


class MnistCommand(driver.Command):
    """The original study's stages: lr_coarse and lr_fine per target (unless --lr or a stored choice), then
    batch_sweep at each target's chosen rate."""

    study = "mnist"

    def prepare(self, args) -> None:
        check_flags(args)
        self.data, self.source = load_data(args)
        check_grid(args, len(self.data.train_x))
        base = trial_base(args, "")  # every other flag, before Ray starts: TrainConfig's and the workload's checks
        for target in args.targets:
            workload.option_values(dict(base.options, target=target))
        for rule in scaling_rules(args.lr_scaling):
            dataclasses.replace(base, lr_scaling=rule, warmup_epochs=args.warmup_epochs,
                                lr_reference_batch=args.lr_reference_batch)

    def record(self, study) -> dict:
        return dict(super().record(study), data={"source": self.source, "n_train": len(self.data.train_x),
                                                 "n_test": len(self.data.test_x)})

    def begin(self, study) -> None:
        args, data = study.args, self.data
        targets = {t: tuple(regression_targets.targets(x, t) for x in (data.train_x, data.test_x))
                   for t in args.targets}
        if not args.resume:  # the analysis draws the target distributions from this; it never reads the images
            study.folder.write_json(M.TARGET_STATS_FILE, regression_targets.target_stats(data.train_x))
            write_experiment(study.folder, "mnist", hparam_domains(args), board.KEY_METRICS, board.HPARAMS)
        self.shared = {"train_x": data.train_x, "test_x": data.test_x, "targets": targets}

    def stages(self, study):
        args, folder = study.args, study.folder
        base = stored.stored_config(trial_base(args, study.version))
        if args.lr is not None:
            chosen = {t: {"lr": args.lr, "selected_on": "--lr"} for t in args.targets}
        elif args.resume and folder.has(M.CHOSEN_FILE):
            chosen = folder.read_json(M.CHOSEN_FILE)
        else:
            chosen = lr_search(study, self.shared, base)
        folder.write_json(M.CHOSEN_FILE, chosen)
        for t in args.targets:
            print(f"learning rate for {t}: {chosen[t]['lr']:.4g} ({chosen[t]['selected_on']})")
        lrs, rules = {t: chosen[t]["lr"] for t in args.targets}, scaling_rules(args.lr_scaling)
        space = dict(base, stage="batch_sweep", val_size=0, target=tune.grid_search(args.targets),
                     batch_size=tune.grid_search(args.batch_sizes), run=tune.grid_search(list(range(args.runs))),
                     seed=tune.sample_from(lambda c: c["batch_size"] + c["run"]),
                     lr=tune.sample_from(lambda c: lrs[c["target"]]), lr_scaling=grid_axis(rules),
                     lr_reference_batch=args.lr_reference_batch, warmup_epochs=args.warmup_epochs)
        columns = ["target"] + (["lr_scaling"] if len(rules) > 1 else []) + ["batch_size", "run"]
        return study.stage("batch_sweep", train_mnist, space, data=self.shared, run_names=board.run_names(lrs),
                           **callbacks(args, "batch_sweep", columns))

    def end(self, study, results) -> None:
        print_summary(results)


def run(args) -> int:
    return driver.drive(MnistCommand(), args)[0]


def print_summary(results) -> None:
    rows = {}
    for r in results:
        last = r.metrics or {}
        if not r.config:  # errored before it reported anything (after a --resume)
            continue
        rows.setdefault((r.config["target"], r.config["batch_size"]), []).append(
            math.nan if r.error is not None else last.get(M.TEST_MSE, math.nan))
    print(f"{'target':>7} {'batch':>6} {'runs':>5} {'min MSE':>11} {'mean MSE':>11} {'max MSE':>11}")
    for (target, batch), values in sorted(rows.items()):
        finite = [v for v in values if math.isfinite(v)]
        low, mean, high = (min(finite), sum(finite) / len(finite), max(finite)) if finite else (math.nan,) * 3
        print(f"{target:>7} {batch:>6} {len(finite):>2}/{len(values):<2} {low:>11.4g} {mean:>11.4g} {high:>11.4g}")


def main(argv=None) -> int:
    return driver.main_of(MnistCommand(), parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
