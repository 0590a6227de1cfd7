"""The console table of a steps-to-result study (study.commands.steps_console): each trial's outcome and steps to result,
from the status of its last row, not "done" for every trial."""

import math

from study import metrics as M
from study.engine import steps as S
from study.commands.steps_console import StepsConsole


class FakeTrial:  # what the console reads of a Tune trial
    def __init__(self, batch, config, status="PENDING", last_result=None):
        self.config = {"batch_size": batch, "config": config, S.BUDGET: 100, "epochs": 5}
        self.status, self.last_result = status, last_result or {}


def row(step, error, status, diverged=False):
    return {M.EPOCH: step / 20, S.STEP: step, "val_error": error, M.STATUS: status, M.DIVERGED: diverged,
            M.STEPS_TO_RESULT: float(step) if status == S.REACHED else math.nan}


def test_the_table_shows_each_trials_outcome_and_steps_to_result():
    console = StepsConsole(S.STAGE, "val_error")
    ends = {(16, 0): row(12, 0.09, S.REACHED), (16, 1): row(100, 0.2, S.CENSORED),
            (32, 0): row(50, 0.89, S.INFEASIBLE), (32, 1): row(4, math.nan, S.DIVERGED, diverged=True),
            (64, 0): row(30, 0.4, M.STATUS_RUNNING)}  # Tune stopped it while running: the rule
    trials = {key: FakeTrial(*key) for key in [*ends, (64, 1), (128, 0)]}
    console.setup(total_num_samples=len(trials))
    for key, last in ends.items():
        trial = trials[key]
        console.on_trial_start(0, list(trials.values()), trial)
        console.on_trial_result(0, list(trials.values()), trial, row(1, 0.9, M.STATUS_RUNNING))
        console.on_trial_result(0, list(trials.values()), trial, last)
        trial.last_result, trial.status = last, "TERMINATED"
        console.on_trial_complete(0, list(trials.values()), trial)
    console.on_trial_start(0, list(trials.values()), trials[64, 1])
    console.on_trial_result(0, list(trials.values()), trials[64, 1], row(7, 0.7, M.STATUS_RUNNING))
    console.on_step_end(0, list(trials.values()))
    header, *body = console.table()
    assert header.split() == ["batch_size", "config", "status", "val_error", "step", "steps_to_result"]
    cells = [line.split("  ") for line in body]
    cells = [[c.strip() for c in line if c.strip()] for line in cells]
    assert cells == [["16", "0", "reached", "0.09", "12", "12"],
                     ["16", "1", "censored (budget)", "0.2", "100", "-"],
                     ["32", "0", "infeasible", "0.89", "50", "-"],
                     ["32", "1", "diverged", "-", "4", "-"],
                     ["64", "0", "stopped by rule", "0.4", "30", "-"],
                     ["64", "1", "step 7/100", "0.7", "7", "-"],
                     ["128", "0", "pending", "-", "-", "-"]]
    assert "5/7 trials finished, 1 running" in console.progress() and " at most " in console.progress()


def test_a_resumed_study_shows_how_its_earlier_trials_ended():
    """Tune restores trials that ended before --resume as TERMINATED, without a start or result this run."""
    console = StepsConsole(S.STAGE, "val_error")
    done = FakeTrial(16, 0, "TERMINATED", row(20, 0.05, S.REACHED))
    stopped = FakeTrial(16, 1, "TERMINATED", row(40, 0.3, M.STATUS_RUNNING))
    console.on_experiment_end([done, stopped])  # nothing left to run: Tune's loop ends at once
    statuses = [line.split()[2:4] for line in console.table()[1:]]
    assert statuses == [["reached", "0.05"], ["stopped", "by"]]
    assert "2/2 trials finished" in console.progress()
