"""A batch-size study of any workload: `run_study(workload, **flags)` from Python (a notebook), of which
`python -m study run WORKLOAD [flags]` is a thin layer.

The grid is batch sizes x optimizers x learning rates x lr-scaling rules x seeds, one Tune experiment ("sweep")
under <storage-path>/<name>/; study.json holds the arguments, workload.json what the report needs to know of the
workload (metric names and directions, goals, chance levels, the grid's axes). Flags are defined once here: the
training flags (study.config.TrainConfig), the Ray and storage flags (study.tuning) and the workload's own options.
"""

import argparse
import math
import shlex
import sys
from pathlib import Path

from study import cli_checks as checks
from study import metrics as M
from study.config import SCHEDULES, TRAIN_OPTIMIZERS, TrainConfig
from study.errors import StudyError
from study.lr_scaling import RULES as LR_SCALING_RULES, scaling_rules
from study.tuning import (RESOURCE_FLAGS, STUDY_FILE, StudyFolder, add_common_args, check_common_args,
                          code_version, default_name)
from study.workload import SPLITS, Workload, describe, resolve

STAGE = "sweep"
# Grid flags and the TrainConfig fields they fill; a workload's `defaults` and `smoke` use the flags' names.
GRID = dict(batch_sizes="batch_size", optimizers="optimizer", lrs="lr", lr_scaling="lr_scaling", seeds="seed")
# Training flags with one value per study: flag name -> (type, help). Their defaults are TrainConfig's.
SCALARS = dict(epochs=(int, "epochs per trial"), momentum=(float, "sgd and nesterov momentum"),
               weight_decay=(float, "L2 (sgd, nesterov, adam) or decoupled (adamw) weight decay"),
               lr_reference_batch=(int, "the batch size the learning rates are given for (--lr-scaling)"),
               warmup_epochs=(float, "linear warmup over this many epochs"),
               schedule=(str, f"lr decay after warmup: {', '.join(SCHEDULES)}"),
               final_lr_factor=(float, "the schedule's last lr as a multiple of the base lr"),
               eval_batch_size=(int, "examples per evaluation forward pass (memory only)"),
               noise_every=(int, "probe the noise scale on every Nth training step of an epoch"))


def parser(workload: Workload | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", help="a shipped workload (python -m study list), path/to/file.py or module:name")
    grid = p.add_argument_group("grid (defaults: the workload's)")
    grid.add_argument("--batch-sizes", type=int, nargs="+")
    grid.add_argument("--optimizers", nargs="+", help=f"of {', '.join(TRAIN_OPTIMIZERS)}")
    grid.add_argument("--lrs", type=float, nargs="+", help="base learning rates (before --lr-scaling)")
    grid.add_argument("--lr-scaling", choices=LR_SCALING_RULES, nargs="+",
                      help="lr = base x (batch / --lr-reference-batch) or its square root; several are an axis")
    grid.add_argument("--seeds", type=int, nargs="+", help="seeded runs of each configuration")
    grid.add_argument("--runs", type=int, help="seeds 0..N-1 (instead of --seeds)")
    grid.add_argument("--smoke", action="store_true", help="the workload's tiny smoke grid (a minute on CPU)")
    train = p.add_argument_group("training")
    for name, (kind, text) in SCALARS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    train.add_argument("--noise-scale", choices=("on", "off"), default="on", help="estimate the gradient noise scale")
    train.add_argument("--tf32", action="store_true", help="on CUDA: TF32 convolutions and matmuls")
    train.add_argument("--amp", choices=("on", "off"), help="on CUDA: bf16 autocast (default: the workload's; off)")
    add_common_args(p, gpus_per_trial=0.25)
    if workload is not None and "lr_search" in workload.stages:
        search = workload.stages["lr_search"]
        grid.add_argument("--lr-search", action="store_true",
                          help=f"first the workload's learning-rate search (lr_coarse: {search['lr_grid']} at batch "
                               f"{search['batch_size']}, then lr_fine round the best), on {search['select']}; its "
                               f"choice replaces --lrs")
    if workload is not None and workload.options:
        own = p.add_argument_group(f"{workload.name}'s options")
        for o in workload.options:
            flag = "--" + o.name.replace("_", "-")
            try:
                if o.type is bool:
                    own.add_argument(flag, dest=o.name, action="store_true", default=None, help=o.help)
                else:
                    own.add_argument(flag, dest=o.name, type=o.type, help=f"{o.help} (default {o.default!r})")
            except argparse.ArgumentError:
                raise StudyError(f"workload {workload.name}: option {o.name} clashes with the engine's flag {flag}")
    return p


def fill(args, workload: Workload) -> argparse.Namespace:
    """Flags not given take the smoke grid (with --smoke), then the workload's defaults, then TrainConfig's."""
    base = TrainConfig(workload="-")
    layers = [workload.smoke if args.smoke else {}, workload.defaults,
              dict(batch_sizes=[base.batch_size], optimizers=[base.optimizer], lrs=[base.lr], lr_scaling=["none"],
                   seeds=[0], **{k: getattr(base, k) for k in SCALARS})]
    if args.runs is not None:
        if args.runs < 1:
            raise StudyError(f"--runs must be >= 1, got {args.runs}")
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
    for flag in ("batch_sizes", "optimizers", "lrs", "lr_scaling", "seeds"):
        values = getattr(args, flag)
        if not values:
            raise StudyError(f"--{flag.replace('_', '-')} needs at least one value")
        checks.check_unique("--" + flag.replace("_", "-"), values)
    for value in args.lrs:
        checks.check_number("--lrs", value, 0, low_open=True)
    for name in ("momentum", "weight_decay", "warmup_epochs", "final_lr_factor"):
        checks.check_number("--" + name.replace("_", "-"), getattr(args, name), 0)
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


def run_study(workload: str | Workload, **flags) -> str:
    """Run (or with resume=True and name=..., continue) a study; returns its folder's URI. flags: the CLI's flags
    with underscores (batch_sizes=[32, 64], lrs=[0.1], smoke=True, storage_path=..., data_dir=... for the
    workload's own options). Raises StudyError on bad input; a trial's failure is in the stored results."""
    spec = workload if isinstance(workload, str) else spec_of(workload)
    found = resolve(spec)
    args = parser(found).parse_args([spec])
    unknown = sorted(set(flags) - set(vars(args)))
    if unknown:
        raise StudyError(f"unknown flags {', '.join(unknown)}; see python -m study run {found.name} --help")
    vars(args).update(flags)
    return execute(args, found)[1]


def spec_of(workload: Workload) -> str:
    """How the trials find a Workload object again in their own processes: its file, or module:name."""
    module = sys.modules.get(getattr(workload.load, "__module__", ""))
    name = next((k for k, v in vars(module).items() if v is workload), None) if module else None
    if name is None or module.__name__ == "__main__":
        raise StudyError(f"workload {workload.name} is not defined at the top level of an importable module or "
                         f"file; define it in a file (workload = Workload(...)) and pass the file's path")
    file = getattr(module, "__file__", None)
    return file if module.__name__.startswith("_workload_") and file else f"{module.__name__}:{name}"


def restore(args) -> argparse.Namespace:
    """With --resume, the stored arguments (the resource flags may change; keys a newer version added keep
    this version's defaults)."""
    folder = StudyFolder(args.storage_path, args.name)
    if not (folder.exists() and folder.has(STUDY_FILE)):
        raise StudyError(f"--resume: no study at {folder.uri} (no {STUDY_FILE}); check --storage-path and --name, "
                         f"or start a new study without --resume")
    saved = folder.read_json(STUDY_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise StudyError(f"{folder.child(STUDY_FILE)} is not a readable study record; restore it from a copy, or "
                         f"start a new study under another --name")
    if saved.get("kind") != "workload":
        raise StudyError(f"{folder.uri} holds a {saved.get('study')} study, not a workload study; resume it with "
                         f"python -m study.{saved.get('study')} --resume")
    return argparse.Namespace(**{**vars(args), **saved["args"], **{k: getattr(args, k) for k in RESOURCE_FLAGS}})


def execute(args, workload: Workload) -> tuple[int, str]:
    """The study of parsed flags: (exit status, folder URI). Exit 1 when a trial failed or ran out of memory."""
    from ray import tune

    from study.console import StudyConsole, tensorboard_hint
    from study.run_workload import train_workload
    from study.tensorboard import StudyTensorBoard, write_experiment
    from study.tuning import grid_axis, open_study, run_stage

    if args.resume and not args.name:
        raise StudyError("--resume needs --name: the study folder to continue")
    args.name = args.name or default_name(workload.name + ("-smoke" if args.smoke else ""))
    checks.check_name(args.name)
    checks.check_uri(args.storage_path, "--storage-path")
    if args.resume:
        args = restore(args)
        if args.study != workload.name:
            raise StudyError(f"{args.storage_path}/{args.name} holds a {args.study} study, not {workload.name}")
    args.lr_scaling = scaling_rules(args.lr_scaling) if args.lr_scaling is not None else None
    fill(args, workload)
    args.study = workload.name
    # A file is found again from the trials' own working folders: pass it on as an absolute path.
    spec = str(Path(args.workload).resolve()) if args.workload.endswith(".py") else args.workload
    check_flags(args)
    if getattr(args, "lr_search", False) and len(args.optimizers) > 1:
        raise StudyError("--lr-search chooses one learning rate for one optimizer: pass one --optimizers value")
    options = workload.option_values({o.name: getattr(args, o.name) for o in workload.options})
    splits = check_splits(workload.load(options), workload)
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
        axes["lr"] = [searched_lr(args, workload, folder, base, resources, splits)]
    if not args.resume:
        folder.write_json(M.WORKLOAD_FILE, dict(describe(workload, splits), axes=axes))
        key = [workload.primary] + [m for m in metric_names if m != workload.primary]
        write_experiment(folder, workload.name, dict(axes, momentum=[args.momentum],
                                                     weight_decay=[args.weight_decay], schedule=[args.schedule]),
                         [(tag(m), m.replace("_", " ")) for m in key])
    print(f"study folder: {folder.uri}\n{tensorboard_hint(folder.uri)}")
    space = dict(base, **{field: grid_axis(values) for field, values in axes.items()})
    space["run"] = grid_axis(axes["seed"])  # names the trial folder (seed=...)
    space["seed"] = tune.sample_from(lambda c: c["run"])
    columns = [f for f, values in axes.items() if len(values) > 1 and f != "seed"] + ["run"]
    callbacks = [StudyTensorBoard(workload.name, STAGE, {m: tag(m) for m in metric_names})]
    if not args.verbose:
        callbacks.append(StudyConsole(STAGE, columns, [workload.primary]))
    # Memory-mapped splits never travel: each trial opens the files itself (study.run_workload).
    results = run_stage(train_workload, space, folder=folder, stage=STAGE, args=args, resources=resources,
                        data=None if workload.memory_mapped else splits, callbacks=callbacks)
    print(f"results: {folder.uri}  (report: python -m analysis.report {shlex.quote(folder.uri)})")
    failed = any(r.error is not None or (r.metrics or {}).get(M.STATUS) == M.STATUS_OOM for r in results)
    return (1 if failed else 0), folder.uri


def searched_lr(args, workload: Workload, folder, base: dict, resources: dict, splits: dict) -> float:
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
                         data=splits, callbacks=[] if args.verbose else [StudyConsole(stage, ["lr"], [select])])

    chosen = search(workload, args, base, run, folder)
    folder.write_json(M.CHOSEN_FILE, chosen)
    print(f"learning rate: {chosen['lr']:.4g} (chosen on {select})")
    return chosen["lr"]


def tag(metric: str) -> str:
    """A prefixed metric's TensorBoard tag: val_error -> val/error."""
    split, _, name = metric.partition("_")
    return f"{split}/{name}"
