"""The steps-to-result trial honours what a workload declares as the run trial does (they share
study.engine.run_workload.WorkloadTrial and the one loop): augmentation in prepare_train, and memory-mapped splits
streamed from their files. Without Ray: run_steps_trial directly, on small data."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from study import metrics as M
from study.engine import run_workload
from study.engine import steps as S
from study.engine.config import TrainConfig
from study.pcam import writer as pcam_writer
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL
from study.engine.eval_schedule import coarse_steps
from study.engine.steps_trial import COARSE_FACTOR, GOALS, run_steps_trial
from study.workload import resolve

DIGITS = str(Path(__file__).resolve().parents[1] / "examples" / "digits_workload.py")
CPU = torch.device("cpu")


def steps_trial(workload, splits, cfg: TrainConfig, goal: dict, budget: int) -> tuple[list[dict], dict]:
    rows = []
    last = run_steps_trial(cfg, {GOAL: goal, BUDGET: budget, CHANCE: None, CONFIG: 0}, workload, splits, CPU,
                     lambda row, state: rows.append(row))
    return rows, last


def test_a_steps_trial_trains_on_the_batches_prepare_train_makes():
    """Each training batch goes through the workload's prepare_train with the epoch's generator; evaluation does
    not. Mirrored images train another model than plain ones: the augmentation reaches the optimizer."""
    plain = resolve(DIGITS)
    calls = []

    def mirrored(x, generator, options):
        calls.append((x.dtype, generator.device, options["width"]))
        return plain.prepare(x).flip(-1)

    cfg = TrainConfig(workload=DIGITS, batch_size=64, optimizer="nesterov", lr=0.2, momentum=0.9, noise_scale=False)
    goal = {"metric": "val_error", "value": 0.0, "higher_is_better": False}  # never reached: runs to its budget
    splits = plain.load(plain.option_values())
    rows, last = steps_trial(dataclasses.replace(plain, prepare_train=mirrored), splits, cfg, goal, budget=21)
    assert last[S.STEP] == 21 and last[M.STATUS] == S.CENSORED  # 19 steps per epoch: into the second epoch
    assert calls == [(torch.uint8, CPU, 16)] * 21  # once per training step, on the raw batch, with the options
    plain_rows, _ = steps_trial(plain, splits, cfg, goal, budget=21)
    assert rows[0]["val_error"] == plain_rows[0]["val_error"]  # the same initial model, evaluated without it
    assert rows[-1][M.TRAIN_LOSS] != plain_rows[-1][M.TRAIN_LOSS]


def test_a_steps_trial_streams_memory_mapped_pcam_splits_and_augments_them(tmp_path, monkeypatch):
    """PCam's splits are memory maps: the trial opens them itself (splits None, as train_steps passes for a
    memory-mapped workload) and reads its batches from the files (PatchBatches), augmented by PCam's prepare_train;
    the test split is not touched."""
    pcam_writer.make_synthetic(tmp_path, n_train=8, n_valid=4, n_test=4)
    workload = resolve("pcam")
    streamed, augmented = [], []

    class Recorded(run_workload.PatchBatches):
        def __init__(self, x, *args, **kwargs):
            super().__init__(x, *args, **kwargs)
            streamed.append((len(x), isinstance(x, np.memmap), self.shuffle, self.on_device))

    def recorded(x, generator, options):
        augmented.append(x.dtype)
        return workload.prepare_train(x, generator, options)

    monkeypatch.setattr(run_workload, "PatchBatches", Recorded)
    options = {"data_dir": str(tmp_path), "weights": "none", "freeze_blocks": 4}
    cfg = TrainConfig(workload="pcam", options=options, batch_size=4, eval_batch_size=4, optimizer="sgd", lr=0.01,
                      noise_scale=False)
    goal = {"metric": "val_loss", "value": 0.0, "higher_is_better": False}
    rows, last = steps_trial(dataclasses.replace(workload, prepare_train=recorded), None, cfg, goal, budget=3)
    assert [r[S.STEP] for r in rows] == [0, *S.eval_steps(3)] and last[M.STATUS] == S.CENSORED
    # train (shuffled) and val (in order) read from their memory maps; on CPU nothing is uploaded whole.
    assert streamed == [(8, True, True, False), (4, True, False, False)]
    assert augmented == [torch.uint8] * 3
    assert all(math.isfinite(r["val_loss"]) for r in rows) and not any(k.startswith("test_") for k in last)


def test_the_steps_trainable_caps_memory_and_lets_a_memory_mapped_workload_open_its_files(monkeypatch):
    """train_steps as Tune runs it, up to run_steps_trial: its device and memory cap come from the trial bridge (as a
    run trial's), and a memory-mapped workload's splits are opened by the trial, not taken from the object store."""
    from types import SimpleNamespace

    import ray

    from study.engine import bridge

    from study.engine import steps_trial

    resources = {"CPU": torch.get_num_threads(), "GPU": 0}
    context = SimpleNamespace(get_trial_resources=lambda: SimpleNamespace(required_resources=resources))
    monkeypatch.setattr(bridge.tune, "get_context", lambda: context)
    monkeypatch.setattr(bridge.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    budgets = []
    monkeypatch.setattr(bridge, "cuda_budget", lambda device, share: budgets.append(share) or (123, True))
    runs, reported = [], []
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    monkeypatch.setattr(steps_trial, "run_steps_trial", lambda cfg, extra, workload, splits, device, report, start, **kw:
                        runs.append(dict(splits=splits, device=device, **kw)))
    steps = {GOAL: {"metric": "val_auc", "value": 0.9, "higher_is_better": True}, BUDGET: 10, CHANCE: 0.5,
             CONFIG: 0}
    for name, data in (("pcam", {"train": "memory maps that travelled"}), (DIGITS, {"train": "arrays"})):
        steps_trial.train_steps({**TrainConfig(workload=name).to_dict(), **steps}, data)
    assert budgets == [0.0, 0.0] and reported == []  # no error row: both went on to train
    assert runs == [dict(splits=None, device=CPU, memory_budget=123, packed=True),
                    dict(splits={"train": "arrays"}, device=CPU, memory_budget=123, packed=True)]


def test_one_loop_takes_the_lr_one_way():
    """The run trial and the steps trial set the same learning rate on the same step: warmup, then the decay
    schedule down to its last evaluation (the run trial's last epoch, the steps trial's budget)."""
    from study.engine.lr_scaling import lr_at, scaled_lr

    workload = resolve(DIGITS)
    splits = workload.load(workload.option_values())
    cfg = TrainConfig(workload=DIGITS, batch_size=256, lr=0.1, lr_scaling="linear", warmup_epochs=1.0,
                      schedule="cosine", final_lr_factor=0.1, epochs=2, noise_scale=False)
    by_epoch = []
    run_workload.run_workload(cfg, workload, splits, CPU, lambda row, state, files=None: by_epoch.append(row))
    by_step, _ = steps_trial(workload, splits, cfg, {"metric": "val_error", "value": 0.0, "higher_is_better": False},
                             budget=10)
    base = scaled_lr(0.1, 256, 32, "linear")  # 1200 examples at 256: 5 steps per epoch, 5 of warmup
    for rows in (by_epoch, by_step):
        assert [r[M.LR] for r in rows] == [lr_at(max(0, r[S.STEP] - 1), base, 5, 10, "cosine", 0.1) for r in rows]
    assert [r[S.STEP] for r in by_epoch] == [0, 5, 10] and [r[S.STEP] for r in by_step] == [0, *coarse_steps(S.eval_steps(10), COARSE_FACTOR)]


def test_every_row_of_a_steps_trial_rests_on_probes_of_its_own_interval():
    """noise_every far above the budget: the probe that opens each interval of the fine grid (at evaluated and at
    kept steps, and an epoch's first step) gives B_simple, and every row after step 0 has one per fine interval."""
    workload = resolve(DIGITS)
    cfg = TrainConfig(workload=DIGITS, batch_size=64, optimizer="sgd", lr=0.05, noise_every=10_000)
    goal = {"metric": "val_error", "value": 0.0, "higher_is_better": False}
    rows, _ = steps_trial(workload, workload.load(workload.option_values()), cfg, goal, budget=40)
    assert [r[S.STEP] for r in rows] == [0, *coarse_steps(S.eval_steps(40), COARSE_FACTOR)]
    fine = S.eval_steps(40)
    for before, row in zip(rows, rows[1:]):  # one probe for each fine interval the row covers (kept steps between)
        intervals = len([s for s in fine if before[S.STEP] < s <= row[S.STEP]])
        assert row[M.NOISE_PROBES] >= intervals >= 1 and math.isfinite(row[M.NOISE_TRACE]), (row[S.STEP], intervals)


def test_a_screened_trial_gives_the_full_grids_steps_to_result_and_stores_no_made_up_value():
    """least-squares (val_loss, terms >= 0) at two batch sizes: every fine step evaluated whole against the default
    schedule (coarse, screened, refined near the goal). The same steps to result, interpolated by the analysis
    between the same two values; the screened rows carry NaN and the examples their screen scored, and each was
    above every goal of the study."""
    from analysis.steps import steps_to_result
    from study.workload import Goal

    workload = resolve("least-squares")
    options = workload.option_values({"train_size": 4096, "val_size": 512})
    splits = workload.load(options)
    goal = {"metric": "val_loss", "value": 0.2, "higher_is_better": False}
    laxer = {**goal, "value": 0.3}  # a second goal of the study: the screen must not hide its crossing either
    extra = {GOAL: goal, BUDGET: 400, CHANCE: None, CONFIG: 0, GOALS: [goal, laxer]}
    for batch in (8, 64):
        cfg = TrainConfig(workload="least-squares", batch_size=batch, optimizer="sgd", lr=0.3, momentum=0.0,
                          noise_every=8, options=options)
        full, screened = [], []
        run_steps_trial(cfg, extra, workload, splits, CPU, lambda r, s: full.append(r), coarse=None, screen=False)
        run_steps_trial(cfg, extra, workload, splits, CPU, lambda r, s: screened.append(r))
        assert full[-1][S.STEP] == screened[-1][S.STEP] and screened[-1][M.STATUS] == S.REACHED
        assert steps_to_result(full, Goal.from_dict(goal))[0] == steps_to_result(screened, Goal.from_dict(goal))[0]
        by_step = {r[S.STEP]: r for r in full}
        assert screened[-2][S.STEP] in by_step and screened[-2]["val_loss"] == by_step[screened[-2][S.STEP]]["val_loss"]
        cut = [r for r in screened if r[M.SCREENED]]
        assert len(cut) >= len(screened) / 2 and all(math.isnan(r["val_loss"]) for r in cut)
        assert all(r[M.EVAL_EXAMPLES] < 512 and by_step[r[S.STEP]]["val_loss"] > 0.3 for r in cut)
        assert [r[S.STEP] for r in screened] == sorted({r[S.STEP] for r in screened})


def test_a_reused_worker_keeps_one_studys_data_on_its_device():
    """A second trial in the same process (Tune's reused worker) takes the splits' tensors up again; another
    study's data (other options, or other contents) replaces them, and the cache never holds two."""
    workload = resolve("least-squares")
    options = workload.option_values({"train_size": 512, "val_size": 128})
    cfg = TrainConfig(workload="least-squares", batch_size=16, optimizer="sgd", lr=0.1, options=options)
    first = run_workload.WorkloadTrial(cfg, workload, workload.load(options), CPU, scored=("val",))
    again = run_workload.WorkloadTrial(cfg, workload, workload.load(options), CPU, scored=("val",))
    assert again.batches.x is first.batches.x and again.held["val"].x is first.held["val"].x
    other = workload.option_values({**options, "data_seed": 1})
    moved = run_workload.WorkloadTrial(dataclasses.replace(cfg, options=other), workload, workload.load(other), CPU,
                                       scored=("val",))
    assert moved.batches.x is not first.batches.x and len(run_workload._ON_DEVICE) == 1
    splits = workload.load(other)
    splits["train"][0][-1] += 1.0  # the same options, other contents: the checksum tells them apart
    changed = run_workload.WorkloadTrial(dataclasses.replace(cfg, options=other), workload, splits, CPU,
                                         scored=("val",))
    assert changed.batches.x is not moved.batches.x and len(run_workload._ON_DEVICE) == 1


def test_a_held_screened_row_is_evaluated_whole_when_the_next_reaches_the_goal():
    """The loop on a scripted evaluation (values by call): steps 0 and 1 screened, step 2 at the goal; the row at
    step 1, held until then, is evaluated again whole and stored with its value, unflagged, before step 2."""
    from study.engine.loop import fit
    from study.engine.train import DeviceBatches
    from study.workload import Goal

    values = iter([0.9, 0.5, 0.04, 0.5])  # steps 0, 1, 2, then step 1 again, whole

    def evaluate(model, settles=None):
        v = next(values)
        if settles is not None and settles({"val_error": 0.9 * v}, {"val_error": min(1.0, 1.1 * v)}):
            return {"val_error": math.nan, M.SCREENED: True, M.EVAL_EXAMPLES: 10}
        return {"val_error": v, **({M.SCREENED: False, M.EVAL_EXAMPLES: 100} if settles else {})}  # as WorkloadTrial

    limits = S.TrialLimits(goal=Goal("val_error", 0.05, False), budget_steps=8)
    model = torch.nn.Linear(2, 2)
    rows = []
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), DeviceBatches(torch.randn(64, 2), torch.randint(0, 2, (64,)), 8),
        torch.nn.functional.cross_entropy, evaluate, lambda row, state: rows.append(row),
        cfg=TrainConfig(workload=DIGITS, batch_size=8, noise_scale=False), device=CPU, eval_steps=list(range(1, 9)),
        stop=limits.status, rewind_on=(S.REACHED,), screen=limits.status)
    assert [(r[S.STEP], r[M.SCREENED], r[M.EVAL_EXAMPLES]) for r in rows] == [(0, True, 10), (1, False, 100),
                                                                              (2, False, 100)]
    assert math.isnan(rows[0]["val_error"]) and rows[1]["val_error"] == 0.5 and rows[2][M.STATUS] == S.REACHED
