"""`python -m study steps WORKLOAD [flags]`, and `run_steps(workload, **flags)` from Python: the steps-to-result study
(Shallue et al. 2019; McCandlish et al. 2018), run by the one driver (study.commands.driver) with this module's flags, grid
and stage.

Per batch size (powers of two by default) the same --configs metaparameter configurations, scrambled Sobol points
over log learning rate and, for momentum optimizers, log (1 - momentum); one Tune trial each. A trial evaluates on
a geometric step grid and ends at the strictest goal, its step budget, divergence or chance level
(study.engine.steps_trial); across the trials of a batch size, study.engine.steps.ResultRule stops those already slower than
enough configurations that reached the goal, a rule that cannot change the result (docs/steps-to-result.md).
study.json ("kind": "steps") holds the arguments, the ranges, the rule's level and safety and the goals;
stopped_by_rule.json the trials the rule stopped (trial folder -> step). Report: python -m analysis.report FOLDER.
"""

import argparse
import math
from pathlib import Path

from study.commands import driver
from study.commands import flags
from study.commands import run_command
from study import metrics as M
from study.engine import steps as S
from study.engine.config import TRAIN_OPTIMIZERS, TrainConfig
from study.errors import StudyError
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL, STAGE
from study.commands.steps_stopped import prime, save_stopped
from study.engine.steps_trial import GOALS, train_steps
from study.commands.steps_args import (DEFAULT_MOMENTUM_RANGE, SCALARS, budgets_of, check_trials, fill, goals_of,
                                       ranges)
from study.commands.tuning import add_common_args, check_common_args
from study.workload import Workload, describe

KIND = "steps"
LEVEL, SAFETY = 0.95, 10.0  # the bootstrap interval's level and the rule's safety factor (study.engine.steps)


def parser(workload: Workload | None = None) -> argparse.ArgumentParser:
    p = flags.Parser(prog="python -m study steps", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", help="a shipped workload (python -m study list), path/to/file.py or module:name")
    g = p.add_argument_group("steps-to-result grid")
    g.add_argument("--goal", action="append", metavar="METRIC=VALUE",
                   help="a goal on a declared validation metric, e.g. val_error=0.01; several allowed (default: "
                        "the workload's goals); trials stop at the strictest")
    g.add_argument("--configs", type=int, default=16, help="metaparameter configurations per batch size")
    flags.add(g, "batch_sizes", help={"batch_sizes": "default: powers of two from 16 to the training set"})
    g.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="learning rates, sampled in log space (default: the workload's lrs / 10 .. x 10)")
    g.add_argument("--momentum-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help=f"1 - momentum for sgd and nesterov, sampled in log space (default "
                        f"{DEFAULT_MOMENTUM_RANGE[0]:g} {DEFAULT_MOMENTUM_RANGE[1]:g})")
    flags.add(g, "momentum", help={"momentum": "one momentum for every configuration instead of sampling it (0: "
                                               "plain SGD, e.g. for the least-squares check)"}, default=None)
    g.add_argument("--optimizer", help=f"one of {', '.join(TRAIN_OPTIMIZERS)} (default: the workload's first)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, help="training steps per trial at most (every batch size)")
    budget.add_argument("--budget-epochs", type=float,
                        help="epochs per trial at the smallest batch size (default: the workload's epochs); larger "
                             "ones per --budget-scaling")
    g.add_argument("--budget-scaling", choices=S.BUDGET_SCALINGS,
                   help=f"{S.SQRT} (default): a batch size B gets the smallest one's steps x sqrt(smallest / B), at "
                        f"least {S.BUDGET_FLOOR}; {S.EPOCHS}: --budget-epochs at every batch size (starves large "
                        f"ones past the critical batch size)")
    g.add_argument("--seed", type=int, default=0,
                   help="the study's seed: the Sobol points', and each configuration's own seed (initialisation and "
                        "data order, the same at every batch size) is drawn from it")
    flags.add(g, "smoke", help={"smoke": "the workload's smoke data, 2 batch sizes x 2 configs"})
    flags.add(p.add_argument_group("training"), *SCALARS, "noise_scale", "tf32")
    add_common_args(p, gpus_per_trial=0.25)
    if workload is not None and workload.options:
        flags.add_options(p, workload)
    return p


def trial_name(trial) -> str:
    """Trial folders, so TensorBoard's run names say what they are: batch=64_config=3_00012. A stored study's
    tuner.pkl names this function by its module and name, which a --resume imports: keep both."""
    c = trial.config
    return f"batch={c['batch_size']}_config={c[CONFIG]}_{trial.trial_id.rsplit('_', 1)[-1]}"


def run_steps(workload: str | Workload, *, callbacks: list | None = None, **flags) -> str:
    """Run (or with resume=True and name=..., continue) a steps-to-result study; returns its folder's URI. flags:
    the CLI's flags with underscores (goal=["val_error=0.02"], configs=8, batch_sizes=[32, 64], smoke=True, ...).
    callbacks: Ray Tune callbacks, given to the Tuner after the study's own (as study.run_study's)."""
    return driver.call("steps", parser, execute, workload, callbacks, flags)


def execute(args, workload: Workload, tune_callbacks: list = ()) -> tuple[int, str]:
    """The study of parsed flags: (exit status, folder URI). Exit 1 when a trial failed. tune_callbacks: the
    user's Tune callbacks (run_steps' callbacks=), after the study's own."""
    command = StepsCommand(workload)
    name = workload.name + "-steps" + ("-smoke" if args.smoke else "")
    return driver.drive(command, driver.resumed(args, command, name, workload.options_before()), tune_callbacks)


class StepsCommand(driver.Command):
    """`python -m study steps`: one stage, batch sizes x Sobol configurations, stopped by the result rule."""

    kind = KIND

    def __init__(self, workload: Workload):
        self.workload, self.study = workload, workload.name

    def prepare(self, args) -> None:
        workload = self.workload
        args.study = workload.name
        check_common_args(args)
        self.goals = goals_of(args, workload)
        goal = self.goal = S.strictest(self.goals)
        run_command.fill_options(args, workload)
        self.options = workload.option_values({o.name: getattr(args, o.name) for o in workload.options})
        self.splits = run_command.load_splits(workload, self.options)
        n_train = len(self.splits["train"][0])
        fill(args, workload, n_train)
        self.chance = workload.chance.get(goal.metric)
        try:
            S.TrialLimits(goal=goal, budget_steps=1, chance=self.chance)
        except ValueError as err:
            raise StudyError(f"--goal: {err}")
        spec = str(Path(args.workload).resolve()) if args.workload.endswith(".py") else args.workload
        self.budgets = budgets_of(args, n_train)
        self.base = dict(TrainConfig(workload=spec).to_dict(), options=self.options, stage=STAGE,
                         optimizer=args.optimizer, noise_scale=args.noise_scale == "on", tf32=args.tf32,
                         code_version="", seed=args.seed, **{k: getattr(args, k) for k in SCALARS},
                         **{GOAL: goal.to_dict(), CHANCE: self.chance, GOALS: [g.to_dict() for g in self.goals]},
                         **({"momentum": args.momentum} if getattr(args, "momentum", None) is not None else {}))
        self.steps_per_epoch = {b: math.ceil(n_train / b) for b in args.batch_sizes}
        check_trials(self.base, args.points, self.budgets, self.steps_per_epoch)

    def record(self, study) -> dict:
        args = study.args
        return {"study": self.study, "kind": KIND, "stages": [STAGE],
                "args": {k: v for k, v in vars(args).items() if k != "points"},
                "data": {s: len(split[0]) for s, split in self.splits.items()},
                "goals": [g.to_dict() for g in self.goals], "ranges": ranges(args), "level": LEVEL,
                "safety": SAFETY, "budget_steps": {str(b): s for b, s in self.budgets.items()},
                "configs": args.points}

    def begin(self, study) -> None:
        from study.commands.tensorboard import option_hparams, tag, write_experiment

        args, folder, points = study.args, study.folder, study.args.points
        axes = {"batch_size": args.batch_sizes, CONFIG: list(range(args.configs))}
        if not args.resume or not folder.has(M.WORKLOAD_FILE):  # also for a start stopped before it was written
            folder.write_json(M.WORKLOAD_FILE, dict(describe(self.workload, self.splits),
                                                    goals=[g.to_dict() for g in self.goals], axes=axes))
        if not args.resume:
            own = {name: [value] for name, value in option_hparams(self.options, {*self.base, CONFIG, BUDGET}).items()}
            write_experiment(folder, KIND, {"batch_size": args.batch_sizes, "lr": [p["lr"] for p in points],
                                            **({"momentum": [p["momentum"] for p in points]}
                                               if points[0]["momentum"] is not None else {}),
                                            CONFIG: axes[CONFIG], **own},
                             [("steps/to_result", "steps to result (first evaluation at the strictest goal)"),
                              (tag(self.goal.metric), self.goal.metric.replace("_", " "))])

    def stages(self, study):
        from ray import tune

        from study.commands.steps_console import StepsConsole, StepsTensorBoard
        from study.commands.tensorboard import tag
        from study.commands.tuning import grid_axis

        args, points, budgets, goal = study.args, study.args.points, self.budgets, self.goal
        steps_per_epoch = self.steps_per_epoch
        space = dict(self.base, code_version=study.version, batch_size=grid_axis(args.batch_sizes),
                     **{CONFIG: grid_axis(list(range(args.configs)))})
        space["lr"] = tune.sample_from(lambda c: points[c[CONFIG]]["lr"])
        # Each configuration its own initialisation and data order, the same at every batch size (steps.config_seed).
        space["seed"] = tune.sample_from(lambda c: points[c[CONFIG]]["seed"])
        if points[0]["momentum"] is not None:
            space["momentum"] = tune.sample_from(lambda c: points[c[CONFIG]]["momentum"])
        space[BUDGET] = tune.sample_from(lambda c: budgets[c["batch_size"]])
        # TrainConfig's epochs: the budget's epochs, so a warmup given in epochs is checked against them.
        space["epochs"] = tune.sample_from(lambda c: math.ceil(budgets[c["batch_size"]]
                                                               / steps_per_epoch[c["batch_size"]]))
        limits = S.TrialLimits(goal=goal, budget_steps=max(budgets.values()), chance=self.chance)
        self.stopper = S.tune_stopper(S.ResultRule(args.configs, LEVEL, SAFETY), limits)
        if args.resume:
            prime(self.stopper, study.folder, limits)
        data = None if self.workload.memory_mapped else self.splits  # memory maps: each trial opens its files
        return study.stage(STAGE, train_steps, space, data=data, run_names=trial_name, stop=self.stopper,
                           tensorboard=StepsTensorBoard(self.workload.name, STAGE, {
                               goal.metric: tag(goal.metric), M.STEPS_TO_RESULT: "steps/to_result"}),
                           console=StepsConsole(STAGE, goal.metric))

    def end(self, study, results) -> None:
        save_stopped(study.folder, self.stopper, results)
