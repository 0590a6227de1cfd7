"""Every flag the study commands share, defined once: `python -m study run` (study.api), `python -m study steps`
(study.steps_study) and the two original studies' aliases (study.mnist, study.pcam) take theirs from here, and a
workload's own options become flags through `add_options`. A command passes its own defaults (the original studies
keep theirs, stored in their study.json) and may word a flag's help for itself; the name, type, choices and the
range `check` enforces are the table's.
"""

import argparse
import math

from study import cli_checks as checks
from study.config import SCHEDULES, TRAIN_OPTIMIZERS
from study.errors import StudyError
from study.lr_scaling import RULES as LR_SCALING_RULES

# name -> argparse settings; `--name-with-dashes` on the command line, args.name in Python.
FLAGS = dict(
    smoke=dict(action="store_true", help="the workload's tiny smoke grid on its smoke data (a minute on CPU)"),
    batch_sizes=dict(type=int, nargs="+", help="batch sizes, a grid axis"),
    optimizers=dict(nargs="+", help=f"of {', '.join(TRAIN_OPTIMIZERS)}"),
    lrs=dict(type=float, nargs="+", help="base learning rates (before --lr-scaling)"),
    lr_scaling=dict(choices=LR_SCALING_RULES, nargs="+",
                    help="lr = base x (batch / --lr-reference-batch) or its square root; several rules are a grid "
                         "axis (each with the same seeds)"),
    seeds=dict(type=int, nargs="+", help="seeded runs of each configuration"),
    runs=dict(type=int, help="seeded runs of each configuration: seeds 0..N-1 (instead of --seeds)"),
    epochs=dict(type=int, help="epochs per trial"),
    momentum=dict(type=float, help="sgd and nesterov momentum"),
    weight_decay=dict(type=float, help="L2 (sgd, nesterov, adam) or decoupled (adamw) weight decay"),
    lr_reference_batch=dict(type=int, help="the batch size the learning rates are given for (--lr-scaling)"),
    warmup_epochs=dict(type=float, help="linear warmup over this many epochs"),
    schedule=dict(help=f"lr decay after warmup: {', '.join(SCHEDULES)}"),  # checked by TrainConfig: one line
    final_lr_factor=dict(type=float, help="the schedule's last lr as a multiple of the base lr"),
    eval_batch_size=dict(type=int, help="examples per evaluation forward pass (memory only)"),
    noise_every=dict(type=int, help="probe the noise scale on every Nth training step of an epoch (32: < 4 %% time)"),
    noise_scale=dict(choices=("on", "off"), default="on", help="estimate the gradient noise scale"),
    tf32=dict(action="store_true", help="on CUDA: TF32 convolutions and matmuls (default fp32)"),
    amp=dict(choices=("on", "off"), help="on CUDA: bf16 autocast (default: the workload's; off)"),
)
# The flags with one value per study that fill TrainConfig fields of the same name.
TRAINING = ("epochs", "momentum", "weight_decay", "lr_reference_batch", "warmup_epochs", "schedule",
            "final_lr_factor", "eval_batch_size", "noise_every")
# Allowed ranges: name -> (low, high, low open, high open), checked by check() once the defaults are filled in.
RANGES = dict(epochs=(1, math.inf, False, False), runs=(1, math.inf, False, False),
              eval_batch_size=(1, math.inf, False, False), noise_every=(1, math.inf, False, False),
              lr_reference_batch=(1, math.inf, False, False), momentum=(0, 1, False, True),
              weight_decay=(0, math.inf, False, False), warmup_epochs=(0, math.inf, False, False),
              final_lr_factor=(0, math.inf, False, False), lrs=(0, math.inf, True, False))
LISTS = ("batch_sizes", "optimizers", "lrs", "lr_scaling", "seeds")  # grid axes: no value twice


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add(group, *names: str, help: dict | None = None, **defaults) -> None:  # noqa: A002 (argparse's word)
    """The table's flags on a parser or argument group; defaults and help wordings by name override the table's."""
    for name in names:
        settings = dict(FLAGS[name])
        if name in defaults:
            settings["default"] = defaults[name]
        if help and name in help:
            settings["help"] = help[name]
        group.add_argument(flag(name), dest=name, **settings)


def add_options(parser: argparse.ArgumentParser, workload, names=None, group=None, **defaults) -> None:
    """A workload's own options as flags (all, or those named): --name-with-dashes of the option's type, default
    None so that a study tells a given value from the workload's default (defaults= sets one instead)."""
    options = {o.name: o for o in workload.options}
    group = group or parser.add_argument_group(f"{workload.name}'s options")
    for name in names or options:
        o = options[name]
        default = defaults.get(name)
        try:
            if o.type is bool:
                group.add_argument(flag(name), dest=name, action="store_true", default=default, help=o.help)
            else:
                group.add_argument(flag(name), dest=name, type=o.type, default=default, choices=o.choices or None,
                                   help=f"{o.help} (default {o.default!r})")
        except argparse.ArgumentError:
            raise StudyError(f"workload {workload.name}: option {name} clashes with the engine's flag {flag(name)}")


def check(args) -> None:
    """The table's ranges and no repeated grid value, for every table flag args holds (None: not set, skipped)."""
    for name, (low, high, low_open, high_open) in RANGES.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            if math.isinf(high) and math.isfinite(v) and not (v > low if low_open else v >= low):
                raise StudyError(f"{flag(name)} must be {'>' if low_open else '>='} {low:g}, got {v}")
            checks.check_number(flag(name), v, low, high, low_open=low_open, high_open=high_open)
    for name in LISTS:
        if isinstance(getattr(args, name, None), (list, tuple)):  # (study.pcam's --seeds is a count)
            checks.check_unique(flag(name), getattr(args, name))
