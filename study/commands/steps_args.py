"""The arguments of `python -m study steps` made whole: the goals (--goal, else the workload's), the defaults filled
from --smoke, the workload and TrainConfig, every flag checked, the Sobol points of the grid and each batch size's step
budget, and every trial config tried through TrainConfig before Ray starts.

Apart from steps_study.py, which holds the command line (parser), the driver's command and run_steps: what is here
only turns parsed flags into a checked grid, so it reads and tests without Tune.
"""

import argparse
import math

from study.commands import cli_checks as checks
from study.commands import flags
from study.engine import steps as S
from study.engine.config import TRAIN_OPTIMIZERS, TrainConfig
from study.engine.steps import BUDGET, CONFIG
from study.engine.steps_trial import split_config
from study.errors import StudyError
from study.workload import Goal, Workload

MOMENTUM_OPTIMIZERS = ("sgd", "nesterov")
DEFAULT_MOMENTUM_RANGE = (0.01, 0.5)  # 1 - momentum: momentum 0.5 .. 0.99
# Training flags with one value per study, as in `python -m study run` (epochs and momentum are the study's axes).
SCALARS = tuple(k for k in flags.TRAINING if k not in ("epochs", "momentum"))


def goals_of(args, workload: Workload) -> list[Goal]:
    """--goal METRIC=VALUE (several), else the workload's declared goals; each on a declared metric."""
    if not args.goal:
        if not workload.goals:
            raise StudyError(f"workload {workload.name} declares no goal; pass --goal METRIC=VALUE, e.g. "
                             f"--goal {workload.primary}=0.1")
        return list(workload.goals)
    goals = []
    for text in args.goal:
        metric, sep, value = text.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise StudyError(f"--goal {text!r}: expected METRIC=VALUE with a number, e.g. --goal val_error=0.02")
        if not metric.startswith("val_"):
            raise StudyError(f"--goal {text!r}: a goal is on a validation metric (val_...)")
        goals.append(workload.goal(metric, number))
    try:
        S.strictest(goals)
    except ValueError as err:
        raise StudyError(f"--goal: {err}")
    return goals


def fill(args, workload: Workload, n_train: int) -> argparse.Namespace:
    """Defaults from --smoke, the workload and TrainConfig; everything checked, with the grid's size."""
    defaults, base = workload.defaults, TrainConfig(workload="-")
    if args.optimizer is None:
        args.optimizer = (defaults.get("optimizers") or [base.optimizer])[0]
    if args.optimizer not in TRAIN_OPTIMIZERS:
        raise StudyError(f"--optimizer {args.optimizer!r}: choose one of {', '.join(TRAIN_OPTIMIZERS)}")
    if args.lr_range is None:
        lrs = defaults.get("lrs") or [base.lr]
        args.lr_range = [min(lrs) / 10, max(lrs) * 10]
    momentum = args.optimizer in MOMENTUM_OPTIMIZERS
    fixed = getattr(args, "momentum", None)  # absent from studies stored before the flag
    if fixed is not None:
        if not momentum or args.momentum_range is not None or not 0 <= fixed < 1:
            raise StudyError(f"--momentum {fixed:g}: a value in [0, 1) for sgd or nesterov, without --momentum-range "
                             f"(got --optimizer {args.optimizer})")
        if args.optimizer == "nesterov" and fixed == 0:
            raise StudyError("--momentum 0: nesterov needs a momentum above 0; use --optimizer sgd for plain SGD")
        momentum = False  # not sampled: every configuration has this one
    if args.momentum_range is None and momentum:
        args.momentum_range = list(DEFAULT_MOMENTUM_RANGE)
    if args.momentum_range is not None and not momentum:
        raise StudyError(f"--momentum-range: {args.optimizer} has no momentum")
    if args.smoke:
        args.batch_sizes = args.batch_sizes or list(workload.smoke.get("batch_sizes", [16, 64]))[:2]
        args.configs = 2 if args.configs == 16 else args.configs
        if args.budget_steps is None and args.budget_epochs is None:
            args.budget_epochs = float(workload.smoke.get("epochs", 1))
    if args.batch_sizes is None:
        try:
            args.batch_sizes = S.default_batch_sizes(n_train)
        except ValueError as err:
            raise StudyError(f"{err}; give smaller ones with --batch-sizes")
    if args.budget_steps is None and args.budget_epochs is None:
        args.budget_epochs = float(defaults.get("epochs", base.epochs))
    if args.budget_steps is not None and args.budget_scaling is not None and not args.resume:
        raise StudyError("--budget-scaling: --budget-steps gives every batch size the same steps; scale a budget "
                         "given with --budget-epochs")
    if args.budget_scaling is None:  # a study stored before the flag had epoch budgets
        args.budget_scaling = S.EPOCHS if args.resume else S.SQRT
    for key in SCALARS:
        if getattr(args, key, None) is None:
            setattr(args, key, defaults.get(key, getattr(base, key)))
    flags.check(args)
    for b in args.batch_sizes:
        if not 1 <= b <= n_train:
            raise StudyError(f"batch size {b} is outside 1..{n_train} (the training examples)")
    if args.configs < 1:
        raise StudyError(f"--configs must be >= 1, got {args.configs}")
    for flag, value in (("--budget-steps", args.budget_steps), ("--budget-epochs", args.budget_epochs)):
        if value is not None and not value > 0:
            raise StudyError(f"{flag} must be > 0, got {value}")
    if args.seed < 0:
        raise StudyError(f"--seed must be >= 0, got {args.seed}")
    try:
        args.points = S.sobol_configs(args.configs, ranges(args), args.seed, momentum)
    except ValueError as err:
        raise StudyError(f"--lr-range / --momentum-range: {err}")
    checks.check_grid_size(len(args.batch_sizes) * args.configs, args.max_trials,
                           f"{len(args.batch_sizes)} batch sizes x {args.configs} configs")
    return args


def check_trials(base: dict, points: list[dict], budgets: dict, steps_per_epoch: dict) -> None:
    """Every batch size's trial config through TrainConfig before Ray starts (as study.commands.run_command.trial_configs
    does), so a bad training flag (--schedule, --warmup-epochs, --weight-decay, ...) is one StudyError with nothing
    written, not a crashed trial per configuration. Only batch size and epochs differ between them besides the
    Sobol points, which fill() checked already."""
    point = points[0]
    for batch, budget in budgets.items():
        config = dict(base, batch_size=batch, lr=point["lr"], epochs=math.ceil(budget / steps_per_epoch[batch]),
                      seed=point["seed"], **{BUDGET: budget, CONFIG: 0})
        if point["momentum"] is not None:
            config["momentum"] = point["momentum"]
        split_config(config)


def ranges(args) -> dict:
    out = {"lr": tuple(args.lr_range)}
    if args.momentum_range is not None:
        out["one_minus_momentum"] = tuple(args.momentum_range)
    return out


def budgets_of(args, n_train: int) -> dict[int, int]:
    """Each batch size's step budget: --budget-steps at every one, or --budget-epochs at the smallest and
    study.engine.steps.step_budgets for the rest (--budget-scaling)."""
    if args.budget_steps is not None:
        return {b: int(args.budget_steps) for b in args.batch_sizes}
    return S.step_budgets(args.batch_sizes, n_train, args.budget_epochs, args.budget_scaling)
