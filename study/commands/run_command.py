"""`python -m study run WORKLOAD [flags]`, and `run_study(workload, **flags)` from Python (a notebook): a
batch-size study of any workload, run by the one driver (study.commands.driver); this module writes only what differs:
the flags, the grid and the stages.

The grid is batch sizes x optimizers x learning rates x lr-scaling rules x seeds, one Tune experiment ("sweep")
under <storage-path>/<name>/, after lr_coarse and lr_fine when the workload's learning-rate search is asked for;
study.json holds the arguments, workload.json what the report needs to know of the workload (metric names and
directions, goals, chance levels, the grid's axes). The flags come from where each is defined once: the grid and
training flags from study.commands.flags (their defaults from the workload, then TrainConfig), the Ray and storage flags
from study.commands.tuning, and the workload's own options from its Options.
"""

import argparse
import math
from pathlib import Path

from study.commands import cli_checks as checks
from study.commands import driver
from study.commands import flags
from study.commands import preflight
from study import metrics as M
from study.engine.config import TrainConfig
from study.errors import StudyError
from study.engine.lr_scaling import scaling_rules
from study.commands.tuning import add_common_args, check_common_args
from study.workload import SPLITS, Workload, describe

STAGE = "sweep"
# Grid flags and the TrainConfig fields they fill; a workload's `defaults` and `smoke` use the flags' names.
GRID = dict(batch_sizes="batch_size", optimizers="optimizer", lrs="lr", lr_scaling="lr_scaling", seeds="seed")
SCALARS = flags.TRAINING  # training flags with one value per study; their defaults are TrainConfig's


def parser(workload: Workload | None = None) -> argparse.ArgumentParser:
    p = flags.Parser(prog="python -m study run", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", help="a shipped workload (python -m study list), path/to/file.py or module:name")
    grid = p.add_argument_group("grid (defaults: the workload's)")
    flags.add(grid, "batch_sizes", "optimizers", "lrs", "lr_scaling", "seeds", "runs", "smoke")
    flags.add(p.add_argument_group("training"), *SCALARS, "noise_scale", "tf32", "amp")
    add_common_args(p, gpus_per_trial=0.25)
    if workload is not None and "lr_search" in workload.stages:
        search = workload.stages["lr_search"]
        grid.add_argument("--lr-search", action="store_true",
                          help=f"first the workload's learning-rate search (lr_coarse: {search['lr_grid']} at batch "
                               f"{search['batch_size']}, then lr_fine round the best), on {search['select']}; its "
                               f"choice replaces --lrs")
    if workload is not None and workload.options:
        flags.add_options(p, workload)
    return p


def fill(args, workload: Workload) -> argparse.Namespace:
    """Flags not given take the smoke grid (with --smoke), then the workload's defaults, then TrainConfig's."""
    base = TrainConfig(workload="-")
    layers = [workload.smoke if args.smoke else {}, workload.defaults,
              dict(batch_sizes=[base.batch_size], optimizers=[base.optimizer], lrs=[base.lr], lr_scaling=["none"],
                   seeds=[0], **{k: getattr(base, k) for k in SCALARS})]
    if args.runs is not None:
        flags.check(argparse.Namespace(runs=args.runs))
        if args.seeds is not None:
            raise StudyError("--runs and --seeds both given; pass one")
        args.seeds = list(range(args.runs))
    layers[-1]["amp"] = "off"
    for key in [*GRID, *SCALARS, "amp"]:
        if getattr(args, key, None) is None:
            setattr(args, key, next(layer[key] for layer in layers if key in layer))
    return fill_options(args, workload)


def fill_options(args, workload: Workload) -> argparse.Namespace:
    """The workload's own options not given: the smoke data's (with --smoke), else each option's default."""
    smoke_options = workload.smoke.get("options", {}) if args.smoke else {}
    for o in workload.options:
        if getattr(args, o.name, None) is None:
            setattr(args, o.name, smoke_options.get(o.name, o.default))
    return args


def check_flags(args) -> None:
    """What needs no data: ranges, repeated grid values, the grid's size (before the data is read)."""
    check_common_args(args)
    for flag in GRID:
        if not getattr(args, flag):
            raise StudyError(f"{flags.flag(flag)} needs at least one value")
    flags.check(args)
    size = math.prod(len(getattr(args, flag)) for flag in GRID)
    checks.check_grid_size(size, args.max_trials, " x ".join(f"{len(getattr(args, f))} {f}" for f in GRID))


def check_splits(splits, workload: Workload) -> dict:
    """What load() returned: train and val (test optional), each (x, y) of the same length."""
    if not isinstance(splits, dict) or "train" not in splits or "val" not in splits:
        got = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise StudyError(f"workload {workload.name}: load() must return a dict with 'train', 'val' (and optional "
                         f"'test') splits, got {got}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise StudyError(f"workload {workload.name}: load() returned unknown splits {', '.join(unknown)}")
    for name, split in splits.items():
        if name == "test" and isinstance(split, tuple) and len(split) == 2 and split[1] is None and len(split[0]):
            continue  # unlabelled (a competition's test split): predicted for the workload's files, never scored
        if not (isinstance(split, tuple) and len(split) == 2 and len(split[0]) == len(split[1]) and len(split[0])):
            raise StudyError(f"workload {workload.name}: split {name} must be a non-empty (x, y) pair of one length")
    return splits


def load_splits(workload: Workload, options: dict) -> dict:
    """The workload's splits, loaded once and checked, after its every piece ran on a few of them
    (study.commands.preflight): a bug in the workload is one line here, before Ray starts, not an error in every
    trial."""
    splits = check_splits(workload.load(options), workload)
    preflight.check(workload, splits, options)
    return splits


def trial_configs(args, workload_spec: str, options: dict, version: str) -> tuple[dict, dict]:
    """The constant part of every trial's config, and the grid's axes (flag values per TrainConfig field)."""
    base = dict(TrainConfig(workload=workload_spec).to_dict(), workload=workload_spec, options=options,
                stage=STAGE, noise_scale=args.noise_scale == "on", tf32=args.tf32, amp=args.amp == "on",
                code_version=version,
                **{k: getattr(args, k) for k in SCALARS})
    axes = {field: list(getattr(args, flag)) for flag, field in GRID.items()}
    for combo in ({field: values[i % len(values)] for field, values in axes.items()}
                  for i in range(max(len(v) for v in axes.values()))):
        TrainConfig.from_dict(dict(base, **combo))  # every value of every axis, before Ray starts
    return base, axes


def run_study(workload: str | Workload, *, callbacks: list | None = None, **flags) -> str:
    """Run (or with resume=True and name=..., continue) a study; returns its folder's URI. flags: the CLI's flags
    with underscores (batch_sizes=[32, 64], lrs=[0.1], smoke=True, storage_path=..., data_dir=... for the
    workload's own options). callbacks: Ray Tune callbacks (ray.tune.Callback, e.g. Ray's MLflowLoggerCallback or
    WandbLoggerCallback), given to every stage's Tuner after the study's own; a resumed study runs with those given
    now. Raises StudyError on bad input; a trial's failure is in the stored results."""
    return driver.call("run", parser, execute, workload, callbacks, flags)


def execute(args, workload: Workload, tune_callbacks: list = ()) -> tuple[int, str]:
    """The study of parsed flags: (exit status, folder URI). Exit 1 when a trial failed or ran out of memory.
    tune_callbacks: the user's Tune callbacks (run_study's callbacks=), after the study's own in every stage."""
    command = RunCommand(workload)
    suffix = "-smoke" if args.smoke else ""
    return driver.drive(command, driver.resumed(args, command, workload.name + suffix, workload.options_before()),
                        tune_callbacks)


class RunCommand(driver.Command):
    """`python -m study run`: one sweep stage over the grid, after the workload's lr search with --lr-search."""

    kind = "workload"

    def __init__(self, workload: Workload):
        self.workload, self.study = workload, workload.name

    def prepare(self, args) -> None:
        workload = self.workload
        args.study = workload.name
        args.lr_scaling = scaling_rules(args.lr_scaling) if args.lr_scaling is not None else None
        fill(args, workload)
        # A file is found again from the trials' own working folders: pass it on as an absolute path.
        spec = str(Path(args.workload).resolve()) if args.workload.endswith(".py") else args.workload
        check_flags(args)
        if getattr(args, "lr_search", False) and len(args.optimizers) > 1:
            raise StudyError("--lr-search chooses one learning rate for one optimizer: pass one --optimizers value")
        self.options = workload.option_values({o.name: getattr(args, o.name) for o in workload.options})
        self.splits = load_splits(workload, self.options)
        n_train = len(self.splits["train"][0])
        for b in args.batch_sizes:
            if not 1 <= b <= n_train:
                raise StudyError(f"batch size {b} is outside 1..{n_train} (the training examples)")
        self.base, self.axes = trial_configs(args, spec, self.options, "")
        self.searching = getattr(args, "lr_search", False)

    def record(self, study) -> dict:
        return {"study": self.study, "kind": self.kind, "args": vars(study.args),
                "stages": (["lr_coarse", "lr_fine"] if self.searching else []) + [STAGE],
                "data": {s: len(split[0]) for s, split in self.splits.items()}}

    def stages(self, study):
        from ray import tune

        from study.commands.console import StudyConsole
        from study.engine.run_workload import train_workload
        from study.commands.tensorboard import StudyTensorBoard, option_hparams, tag, write_experiment
        from study.commands.tuning import grid_axis

        args, folder, workload, base, axes = study.args, study.folder, self.workload, self.base, self.axes
        base["code_version"] = study.version
        if self.searching:
            axes["lr"] = [searched_lr(study, workload, base, self.splits)]
        if not args.resume or not folder.has(M.WORKLOAD_FILE):  # also for a start stopped before it was written
            folder.write_json(M.WORKLOAD_FILE, dict(describe(workload, self.splits), axes=axes))
        metric_names = [f"{s}_{m.name}" for s in ("val", "test") if s in self.splits for m in workload.metrics]
        if not args.resume:
            key = [workload.primary] + [m for m in metric_names if m != workload.primary]
            own = {name: [value] for name, value in option_hparams(self.options, {*base, "run"}).items()}
            write_experiment(folder, workload.name, dict(axes, momentum=[args.momentum],
                                                         weight_decay=[args.weight_decay], schedule=[args.schedule],
                                                         **own),
                             [(tag(m), m.replace("_", " ")) for m in key])
        space = dict(base, **{field: grid_axis(values) for field, values in axes.items()})
        space["run"] = grid_axis(axes["seed"])  # names the trial folder (seed=...)
        space["seed"] = tune.sample_from(lambda c: c["run"])
        columns = [f for f, values in axes.items() if len(values) > 1 and f != "seed"] + ["run"]
        # Memory-mapped splits never travel: each trial opens the files itself (study.engine.run_workload).
        return study.stage(STAGE, train_workload, space, data=None if workload.memory_mapped else self.splits,
                           tensorboard=StudyTensorBoard(workload.name, STAGE, {m: tag(m) for m in metric_names},
                                                        workload.primary),
                           console=StudyConsole(STAGE, columns, [workload.primary], workload.primary))


def searched_lr(study, workload: Workload, base: dict, splits: dict) -> float:
    """--lr-search: the workload's search stages (study.commands.lr_search); a --resume reads back the rate they
    chose."""
    from study.commands.console import StudyConsole
    from study.commands.lr_search import search
    from study.engine.run_workload import train_workload

    folder = study.folder
    if study.args.resume and folder.has(M.CHOSEN_FILE):
        return folder.read_json(M.CHOSEN_FILE)["lr"]
    select = workload.stages["lr_search"]["select"]

    def run(stage, space):
        return study.stage(stage, train_workload, space, data=splits, console=StudyConsole(stage, ["lr"], [select]))

    chosen = search(workload, study.args, base, run, folder)
    folder.write_json(M.CHOSEN_FILE, chosen)
    print(f"learning rate: {chosen['lr']:.4g} (chosen on {select})")
    return chosen["lr"]
