"""A batch-size study of any workload: `run_study(workload, **flags)` from Python (a notebook), of which
`python -m study run WORKLOAD [flags]` is a thin layer.

The grid is batch sizes x optimizers x learning rates x lr-scaling rules x seeds, one Tune experiment ("sweep")
under <storage-path>/<name>/; study.json holds the arguments, workload.json what the report needs to know of the
workload (metric names and directions, goals, chance levels, the grid's axes). The flags come from where each is
defined once: the grid and training flags from study.flags (their defaults from the workload, then TrainConfig), the
Ray and storage flags from study.tuning, and the workload's own options from its Options.
"""

import argparse
import math
import sys
from pathlib import Path

from study import cli_checks as checks
from study import flags, lease
from study import metrics as M
from study import preflight
from study.config import TrainConfig
from study.errors import StudyError
from study.flags import from_python  # run_study's **flags hides the module
from study.lr_scaling import scaling_rules
from study.tuning import (STUDY_FILE, StudyFolder, add_common_args, check_common_args, code_version,
                          default_name, restore_args)
from study.workload import SPLITS, Workload, describe, resolve

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
    """The workload's splits, loaded once and checked, after its every piece ran on a few of them (study.preflight):
    a bug in the workload is one line here, before Ray starts, not an error in every trial."""
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
    tune_callbacks = check_callbacks(callbacks)
    spec = workload if isinstance(workload, str) else spec_of(workload)
    found = resolve(spec)
    args = parser(found).parse_args([spec])
    unknown = sorted(set(flags) - set(vars(args)))
    if unknown:
        raise StudyError(f"unknown flags {', '.join(unknown)}; see python -m study run {found.name} --help")
    vars(args).update(flags)
    return execute(from_python(args), found, tune_callbacks)[1]


def check_callbacks(callbacks) -> list:
    """run_study's and run_steps' callbacks= as a list of Tune callbacks (kept out of the stored arguments: they
    are objects, not flags)."""
    from ray import tune

    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, tune.Callback) for c in callbacks):
        listed = isinstance(callbacks, (list, tuple))
        got = [type(c).__name__ for c in callbacks] if listed else type(callbacks).__name__
        raise StudyError(f"callbacks must be a list of ray.tune.Callback objects (e.g. "
                         f"ray.air.integrations.mlflow.MLflowLoggerCallback), got {got}")
    return list(callbacks)


def spec_of(workload: Workload) -> str:
    """How the trials find a Workload object again in their own processes: its file, or module:name."""
    module = sys.modules.get(getattr(workload.load, "__module__", ""))
    name = next((k for k, v in vars(module).items() if v is workload), None) if module else None
    if name is None or module.__name__ == "__main__":
        raise StudyError(f"workload {workload.name} is not defined at the top level of an importable module or "
                         f"file; define it in a file (workload = Workload(...)) and pass the file's path")
    file = getattr(module, "__file__", None)
    return file if module.__name__.startswith("_workload_") and file else f"{module.__name__}:{name}"


def start(args, workload: Workload, kind: str, suffix: str = "") -> argparse.Namespace:
    """What every workload study does first: its name (default: the workload's and the time), storage checks and,
    with --resume, the stored arguments (study.tuning.restore_args; an option a study stored before it existed lacks
    takes the value it ran with then, Option.before)."""
    if args.resume and not args.name:
        raise StudyError("--resume needs --name: the study folder to continue")
    args.name = args.name or default_name(workload.name + suffix + ("-smoke" if args.smoke else ""))
    checks.check_name(args.name)
    checks.check_uri(args.storage_path, "--storage-path")
    if args.resume:
        args = restore_args(args, kind, workload.name, workload.options_before())
    args.study = workload.name
    return args


@lease.released_at_end()  # the study folder's lease, taken in open_study
def execute(args, workload: Workload, tune_callbacks: list = ()) -> tuple[int, str]:
    """The study of parsed flags: (exit status, folder URI). Exit 1 when a trial failed or ran out of memory.
    tune_callbacks: the user's Tune callbacks (run_study's callbacks=), after the study's own in every stage."""
    from ray import tune

    from study.console import StudyConsole, finished, started
    from study.run_workload import train_workload
    from study.tensorboard import StudyTensorBoard, option_hparams, write_experiment
    from study.tuning import grid_axis, open_study, run_stage

    args = start(args, workload, "workload")
    args.lr_scaling = scaling_rules(args.lr_scaling) if args.lr_scaling is not None else None
    fill(args, workload)
    # A file is found again from the trials' own working folders: pass it on as an absolute path.
    spec = str(Path(args.workload).resolve()) if args.workload.endswith(".py") else args.workload
    check_flags(args)
    if getattr(args, "lr_search", False) and len(args.optimizers) > 1:
        raise StudyError("--lr-search chooses one learning rate for one optimizer: pass one --optimizers value")
    options = workload.option_values({o.name: getattr(args, o.name) for o in workload.options})
    splits = load_splits(workload, options)
    n_train = len(splits["train"][0])
    for b in args.batch_sizes:
        if not 1 <= b <= n_train:
            raise StudyError(f"batch size {b} is outside 1..{n_train} (the training examples)")
    base, axes = trial_configs(args, spec, options, "")
    folder = StudyFolder(args.storage_path, args.name)
    resources = open_study(folder, args)
    version = code_version()
    base["code_version"] = version
    metric_names = [f"{s}_{m.name}" for s in ("val", "test") if s in splits for m in workload.metrics]
    searching = getattr(args, "lr_search", False)
    if not args.resume:
        folder.write_json(STUDY_FILE, {"study": workload.name, "kind": "workload",
                                       "stages": (["lr_coarse", "lr_fine"] if searching else []) + [STAGE],
                                       "args": vars(args), "code_version": version, "resources_per_trial": resources,
                                       "data": {s: len(splits[s][0]) for s in splits}})
    if searching:
        axes["lr"] = [searched_lr(args, workload, folder, base, resources, splits, tune_callbacks)]
    if not args.resume or not folder.has(M.WORKLOAD_FILE):  # also for a start stopped before it was written
        folder.write_json(M.WORKLOAD_FILE, dict(describe(workload, splits), axes=axes))
    if not args.resume:
        key = [workload.primary] + [m for m in metric_names if m != workload.primary]
        own = {name: [value] for name, value in option_hparams(options, {*base, "run"}).items()}
        write_experiment(folder, workload.name, dict(axes, momentum=[args.momentum],
                                                     weight_decay=[args.weight_decay], schedule=[args.schedule], **own),
                         [(tag(m), m.replace("_", " ")) for m in key])
    started(folder.uri)
    space = dict(base, **{field: grid_axis(values) for field, values in axes.items()})
    space["run"] = grid_axis(axes["seed"])  # names the trial folder (seed=...)
    space["seed"] = tune.sample_from(lambda c: c["run"])
    columns = [f for f, values in axes.items() if len(values) > 1 and f != "seed"] + ["run"]
    callbacks = [StudyTensorBoard(workload.name, STAGE, {m: tag(m) for m in metric_names}, workload.primary)]
    if not args.verbose:
        callbacks.append(StudyConsole(STAGE, columns, [workload.primary], workload.primary))
    # Memory-mapped splits never travel: each trial opens the files itself (study.run_workload).
    results = run_stage(train_workload, space, folder=folder, stage=STAGE, args=args, resources=resources,
                        data=None if workload.memory_mapped else splits, callbacks=[*callbacks, *tune_callbacks])
    return finished(folder.uri, results), folder.uri


def searched_lr(args, workload: Workload, folder, base: dict, resources: dict, splits: dict,
                tune_callbacks: list = ()) -> float:
    """--lr-search: the workload's search stages (study.lr_search); a --resume reads back the rate they chose."""
    from study.console import StudyConsole
    from study.lr_search import search
    from study.run_workload import train_workload
    from study.tuning import run_stage

    if args.resume and folder.has(M.CHOSEN_FILE):
        return folder.read_json(M.CHOSEN_FILE)["lr"]
    select = workload.stages["lr_search"]["select"]

    def run(stage, space):
        return run_stage(train_workload, space, folder=folder, stage=stage, args=args, resources=resources,
                         data=splits, callbacks=[*([] if args.verbose else [StudyConsole(stage, ["lr"], [select])]),
                                                 *tune_callbacks])

    chosen = search(workload, args, base, run, folder)
    folder.write_json(M.CHOSEN_FILE, chosen)
    print(f"learning rate: {chosen['lr']:.4g} (chosen on {select})")
    return chosen["lr"]


def tag(metric: str) -> str:
    """A prefixed metric's TensorBoard tag: val_error -> val/error."""
    split, _, name = metric.partition("_")
    return f"{split}/{name}"
