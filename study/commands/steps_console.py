"""What a steps-to-result study (`python -m study steps`) shows while it runs: its console table, one row per trial
with how the trial ended and its steps to result, and its TensorBoard writer, whose step axis is the training step.

Imported by study.commands.steps_study when the study starts (it imports Ray); nothing runs at import.
"""

from study import metrics as M
from study.engine import steps as S
from study.commands.console import FINISHED, StudyConsole
from study.engine.steps import BUDGET, CONFIG
from study.commands.tensorboard import StudyTensorBoard

STOPPED = "stopped by rule"
# A trial's last row's status (study.engine.steps.TrialLimits) as the table shows it.
WORDS = {S.REACHED: "reached", S.CENSORED: "censored (budget)", S.INFEASIBLE: "infeasible", S.DIVERGED: "diverged"}


class StepsConsole(StudyConsole):
    """Rows: batch size and configuration; the trial's outcome (reached, censored at its budget, infeasible,
    diverged, stopped by the rule; step s/budget while it runs), the goal metric, the step and the steps to result
    (its first evaluation at the strictest goal). The time left counts every trial's whole budget, which most trials
    never use: an upper bound."""

    finished_words = (*FINISHED, *WORDS.values(), STOPPED)

    def __init__(self, stage: str, goal_metric: str):
        super().__init__(stage, ["batch_size", CONFIG], [goal_metric, S.STEP, M.STEPS_TO_RESULT])

    def outcome(self, last: dict) -> str:
        status = last.get(M.STATUS)
        if status in WORDS:
            return WORDS[status]
        if status == M.STATUS_RUNNING:
            # The trainable returns only at a final status, so a trial that Tune ended while running was ended by
            # the study's stopper (study.engine.steps.tune_stopper), the one stopper a steps study has.
            return STOPPED
        return super().outcome(last)  # out of memory, error

    def _row(self, trial) -> dict:
        new = trial not in self.trials
        row = super()._row(trial)
        if new and getattr(trial, "status", None) == "TERMINATED":  # finished before a --resume: say how
            last = trial.last_result or {}
            row.update(status=self.outcome(last), **{m: last[m] for m in self.metrics if m in last})
        return row

    def on_experiment_end(self, trials, **info):
        for trial in trials:  # a resumed study that had nothing left to run gets no step: its trials come here
            self._row(trial)
        super().on_experiment_end(trials, **info)

    def status_text(self, members: list[dict]) -> str:
        if len(members) == 1 and members[0]["status"] == "running":
            m = members[0]
            return f"step {m.get(S.STEP, 0)}/{m['config'].get(BUDGET, '?')}"
        return super().status_text(members)

    def progress(self) -> str:
        return super().progress().replace(" about ", " at most ")


class StepsTensorBoard(StudyTensorBoard):
    """TensorBoard's step is the training step (the rows' epoch is fractional here)."""

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, {**result, M.EPOCH: result.get(S.STEP, iteration)})
