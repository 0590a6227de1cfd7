"""Every flag the study commands share, defined once: `python -m study run` (study.commands.run_command), `python -m
study steps` (study.commands.steps_study) and the papers' own commands (study/<paper>/command.py) take theirs from here,
and a workload's own options become flags through `add_options`. A command passes its own defaults (the original studies
keep theirs, stored in their study.json) and may word a flag's help for itself; the name, type, choices and the
range `check` enforces are the table's. An on/off flag is `--name` / `--no-name` (OnOff); the commands' parser
(Parser) still reads the older `--name on|off`, so the commands stored studies were started with run as they did.
"""

import argparse
import math
import sys

from study.commands import cli_checks as checks
from study.engine.config import SCHEDULES, TRAIN_OPTIMIZERS
from study.errors import StudyError
from study.engine.lr_scaling import RULES as LR_SCALING_RULES


class OnOff(argparse.Action):
    """`--name` and `--no-name`, storing `on` or `off`: the values studies stored before the flags took this
    style ("on"/"off" for some, True/False for others), so that a stored study's arguments mean what they did."""

    def __init__(self, option_strings, dest, on=True, off=False, default=None, help=None):  # noqa: A002
        super().__init__([option_strings[0], "--no-" + option_strings[0][2:]], dest, nargs=0, default=default,
                         help=help)
        self.on, self.off = on, off

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.off if option_string.startswith("--no-") else self.on)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def old_spellings(argv: list[str], actions) -> list[str]:
    """argv with each on/off flag's older spelling, `--name on|off` or `--name=on|off`, as --name or --no-name."""
    names = {a.option_strings[0] for a in actions if isinstance(a, OnOff)}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # the rest are positional values
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if not eq and name in names and i + 1 < len(argv) and argv[i + 1] in ("on", "off"):
            value, i = argv[i + 1], i + 1
        if name in names and value in ("on", "off"):
            arg = name if value == "on" else "--no-" + name[2:]
        out.append(arg)
        i += 1
    return out


class Parser(argparse.ArgumentParser):
    """The study commands' parser: an on/off flag's older spelling (`--noise-scale off`) reads as the one style."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(old_spellings(argv, self._actions), namespace)


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
    # On/off flags store what studies stored before: "on"/"off" (noise_scale, amp) or True/False (tf32).
    noise_scale=dict(action=OnOff, on="on", off="off", default="on",
                     help="estimate the gradient noise scale (default on)"),
    tf32=dict(action=OnOff, default=False, help="on CUDA: TF32 convolutions and matmuls (default off: fp32)"),
    amp=dict(action=OnOff, on="on", off="off", help="on CUDA: bf16 autocast (default: the workload's; off)"),
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


def from_python(args) -> argparse.Namespace:
    """run_study(noise_scale=False) and the like: an on/off flag given as a bool takes the value the command line
    would have stored ("off" here), so that True and False mean on and off whatever a flag stores."""
    for name, settings in FLAGS.items():
        if settings.get("action") is OnOff and isinstance(getattr(args, name, None), bool):
            setattr(args, name, settings.get("on", True) if getattr(args, name) else settings.get("off", False))
    return args


def check(args) -> None:
    """The table's ranges and no repeated grid value, for every table flag args holds (None: not set, skipped)."""
    for name, (low, high, low_open, high_open) in RANGES.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            if math.isinf(high) and math.isfinite(v) and not (v > low if low_open else v >= low):
                raise StudyError(f"{flag(name)} must be {'>' if low_open else '>='} {low:g}, got {v}")
            checks.check_number(flag(name), v, low, high, low_open=low_open, high_open=high_open)
    for name in LISTS:
        if isinstance(getattr(args, name, None), (list, tuple)):  # (a paper may keep --seeds as a count)
            checks.check_unique(flag(name), getattr(args, name))
