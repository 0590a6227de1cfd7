"""The trial of a steps-to-result study (`python -m study steps`): `train_steps(config, data)` as Tune runs it, and
`run_steps_trial`, the same trial without Ray (the tests call it directly).

The run trial's workload trial (study.engine.run_workload.WorkloadTrial: the model, the splits on the device or streamed
from memory maps, the workload's prepare_train or prepare and augment, channels_last, AMP, the memory cap) in the
one loop (study.engine.loop.fit) with its evaluations placed on training steps: at step 0 and on the fine grid
study.engine.steps.eval_steps(budget), counted across epochs, as study.engine.eval_schedule places them (a coarse
subset, evaluated back at the goal; each evaluation screened, every fine step once the goal is near). Each
evaluation row carries the step, the examples seen, the training seconds (evaluations left out), the mean training
loss and the gradient noise scale over the steps since the previous evaluation, and the workload's metrics with
their split prefix (NaN on a screened row). The trial ends on its own rows
(study.engine.steps.TrialLimits: the strictest goal, the budget, divergence, chance level); its last row's status says
which. A trial restarted from a checkpoint at step s skips the epoch's first batches and goes on as an
uninterrupted one would.
"""

import math

import torch

from study import metrics as M
from study.engine import steps as S
from study.engine.bridge import load_start, reporter, trial_device, trial_entry
from study.engine.config import TrainConfig
from study.engine.eval_schedule import SCREEN_PARTS, coarse_steps, near
from study.engine.run_workload import InMemory, WorkloadTrial
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL
from study.workload import Goal, Workload, resolve

# Every goal of the study (its stored form): the screen stops an evaluation only where none can be reached, so a
# laxer goal's crossing keeps its value too. Configs stored before it lack it; their trials are never screened.
GOALS = "goals"
STEP_KEYS = (BUDGET, GOAL, CHANCE, CONFIG, GOALS)
COARSE_FACTOR = 2.0  # evaluations about this far apart, the fine grid's in between evaluated back at the goal
CHECKPOINT_SECONDS = 60.0  # a checkpoint at most this often (and at the end): the state is written, not free


def split_config(config: dict) -> tuple[TrainConfig, dict]:
    extra = {k: config[k] for k in STEP_KEYS if k in config}
    return TrainConfig.from_dict({k: v for k, v in config.items() if k not in STEP_KEYS}), extra


def limits_of(extra: dict, warmup_steps: int = 0) -> S.TrialLimits:
    return S.TrialLimits(goal=Goal.from_dict(extra[GOAL]), budget_steps=extra[BUDGET], chance=extra[CHANCE],
                         warmup_steps=warmup_steps)


@trial_entry
def train_steps(config: dict, data: dict | None) -> None:
    """One trial of a steps-to-result study, as Tune runs it. A memory-mapped workload's files are opened by the
    trial itself (as a run trial's are), whatever data holds."""
    cfg, extra = split_config(config)
    workload = resolve(cfg.workload)
    trial = trial_device(tf32=cfg.tf32, benchmark=False)  # benchmark off: an epoch's last batch is smaller
    run_steps_trial(cfg, extra, workload, None if workload.memory_mapped else data, trial.device,
              reporter(trial.placement, seconds=CHECKPOINT_SECONDS), load_start(),
              memory_budget=trial.memory_budget, packed=trial.packed)


def screening(limits: S.TrialLimits, goals: list[Goal]):
    """The statuses a screen must rule out: the trial's own (limits.status), and any goal of the study reached."""
    def status(row: dict) -> str | None:
        return limits.status(row) or (S.REACHED if any(g.reached(float(row[g.metric])) for g in goals) else None)
    return status


def run_steps_trial(cfg: TrainConfig, extra: dict, workload: Workload, splits: dict | None, device: torch.device,
                    report, start: dict | None = None, *, memory_budget: int | None = None, packed: bool = False,
                    coarse: float | None = COARSE_FACTOR, screen: bool = True, refine: bool = True) -> dict:
    """Train until the trial's limits end it; report(row, state) at every evaluation. Returns the last row.
    splits None: a memory-mapped workload's, opened here; memory_budget, packed: as for a run trial
    (study.engine.run_workload.WorkloadTrial, which sets up everything the two trials share). coarse: evaluate about this
    factor apart and evaluate back through the fine grid's kept weights at the goal (study.engine.eval_schedule); None:
    evaluate every step of the fine grid. screen: stop an evaluation early once it cannot reach any of the study's
    goals (extra[GOALS]; none listed: no screen), where the goal's metric declares bounds; refine: then evaluate
    every fine step once the goal is near."""
    trial = WorkloadTrial(cfg, workload, splits, device, memory_budget=memory_budget, packed=packed,
                          scored=("val",))
    limits = limits_of(extra, warmup_steps=round(cfg.warmup_epochs * len(trial.batches)))
    fine = S.eval_steps(limits.budget_steps)
    at = coarse_steps(fine, coarse) if coarse else fine
    val = trial.held["val"]
    goals = [Goal.from_dict(g) for g in extra.get(GOALS, [])]
    screen = screen and bool(goals) and workload.metric(limits.goal.metric).bounds is not None
    if screen and isinstance(val, InMemory):  # every evaluation in the same chunks: the same outputs, screened or not
        val.batch_size = min(val.batch_size, math.ceil(len(val.x) / SCREEN_PARTS))
    last = {}

    def report_row(row, state):
        row[M.STEPS_TO_RESULT] = float(row[S.STEP]) if row[M.STATUS] == S.REACHED else math.nan
        last.update(row=row)
        report(row, state)

    trial.fit(report_row, start, eval_steps=at, stop=limits.status, keep_steps=sorted(set(fine) - set(at)),
              rewind_on=(S.REACHED,), screen=screening(limits, goals) if screen else None,
              refine=(lambda row: near(row[M.EVAL_EXAMPLES], len(val.x))) if screen and refine else None)
    return last["row"]
