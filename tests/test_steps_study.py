"""The steps-to-result study end to end: the trial's step grid and limits without Ray (study.engine.steps_trial), bad
input refused before anything is written, and `python -m study steps` on the example digits workload through Tune
(stops at the goal, the rule's stops, the report's tables and figures, TensorBoard, --resume changing nothing)."""

import json
import math
from pathlib import Path

import pytest
import torch

from study import metrics as M
from study.engine import steps as S
from study.__main__ import main
from study.engine.config import TrainConfig
from study.errors import StudyError
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL
from study.engine.eval_schedule import coarse_steps
from study.engine.steps_trial import COARSE_FACTOR, run_steps_trial
from study.workload import Goal, resolve
from tensorboard_checks import session_groups

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "examples" / "digits_workload.py")
GOAL_03 = {"metric": "val_error", "value": 0.3, "higher_is_better": False}


def trial(goal: dict, budget: int, batch_size: int = 64, lr: float = 0.2, chance: float | None = None,
          coarse: float | None = None):
    workload = resolve(DIGITS)
    cfg = TrainConfig(workload=DIGITS, batch_size=batch_size, optimizer="nesterov", lr=lr, momentum=0.9,
                      noise_every=4)
    extra = {GOAL: goal, BUDGET: budget, CHANCE: chance, CONFIG: 0}
    rows = []
    last = run_steps_trial(cfg, extra, workload, workload.load(workload.option_values()), torch.device("cpu"),
                     lambda row, state: rows.append(row), coarse=coarse)
    return rows, last


def test_trial_evaluates_on_the_step_grid_across_epochs_and_stops_at_the_goal():
    rows, last = trial(GOAL_03, budget=200, coarse=None)  # 1200 examples at 64: 19 steps per epoch
    steps = [r["step"] for r in rows]
    assert steps == [0] + S.eval_steps(200)[:len(steps) - 1]
    assert last is rows[-1] and last["status"] == S.REACHED and last[M.STEPS_TO_RESULT] == last["step"]
    assert all(not Goal.from_dict(GOAL_03).reached(r["val_error"]) for r in rows[:-1]) and last["val_error"] <= 0.3
    assert last["step"] > 19, "should cross an epoch boundary before the goal"
    assert last["examples"] == (last["step"] // 19) * 1200 + (last["step"] % 19) * 64
    assert all(b["train_seconds"] > a["train_seconds"] for a, b in zip(rows[1:], rows[2:]))
    assert math.isnan(rows[0]["train_loss"]) and all(math.isfinite(r["train_loss"]) for r in rows[1:])
    assert any(math.isfinite(r["noise_scale"]) and r["noise_probes"] > 0 for r in rows[1:])
    return rows


def test_the_coarse_schedule_evaluates_back_to_the_fine_grids_answer():
    """Evaluations about 2x apart (the default), the fine grid's weights kept in between and evaluated back when one
    reaches the goal: the same first fine step at the goal, the same weights there, fewer evaluations; the rows
    evaluated back carry the training of their own interval (their losses and examples add up)."""
    fine = test_trial_evaluates_on_the_step_grid_across_epochs_and_stops_at_the_goal()
    rows, last = trial(GOAL_03, budget=200, coarse=2.0)
    coarse = coarse_steps(S.eval_steps(200), 2.0)
    before = [r["step"] for r in rows if r["step"] in (0, *coarse) and r["step"] < last["step"]]
    assert before == [0] + coarse[:len(before) - 1] and len(before) > 2
    back = [r["step"] for r in rows[len(before):]]
    assert back == [s for s in S.eval_steps(200) if before[-1] < s <= last["step"]]  # evaluated in order
    same = ["step", "examples", "val_error", "val_loss", "status", M.STEPS_TO_RESULT]
    assert [last[k] for k in same] == [fine[-1][k] for k in same] and len(rows) < len(fine)
    by_step = {r["step"]: r for r in fine}
    for r in rows[len(before):]:  # the fine rows' training parts: their own intervals, as the full grid's
        assert r["train_loss"] == pytest.approx(by_step[r["step"]]["train_loss"], rel=1e-6)
        assert r["noise_probes"] == by_step[r["step"]]["noise_probes"]
    assert all(b["train_seconds"] > a["train_seconds"] for a, b in zip(rows[1:], rows[2:]))


def test_trial_is_censored_at_its_budget_and_infeasible_at_chance():
    rows, last = trial({**GOAL_03, "value": 0.0}, budget=13, coarse=None)
    assert [r["step"] for r in rows] == list(range(14)) and last["status"] == S.CENSORED  # every step to 10
    assert math.isnan(last[M.STEPS_TO_RESULT])
    rows, last = trial(GOAL_03, budget=120, lr=1e-7, chance=0.9, coarse=None)  # learns nothing: ends 50 steps in (the floor)
    assert last["status"] == S.INFEASIBLE and [r["step"] for r in rows] == [0] + S.eval_steps(120)[:31]
    assert rows[-1]["step"] == 50


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    base = ["steps", DIGITS, "--storage-path", str(tmp_path), "--name", "x"]
    assert main(base + ["--goal", "val_nothing=0.1"]) == 2
    assert main(base + ["--goal", "val_error"]) == 2
    assert main(base + ["--optimizer", "adam", "--momentum-range", "0.1", "0.2"]) == 2
    assert main(base + ["--lr-range", "0.5", "0.1"]) == 2
    assert main(base + ["--batch-sizes", "4096"]) == 2
    assert main(base + ["--goal", "val_error=0.9"]) == 2  # the chance level: a model that learned nothing reaches it
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 6 and all(e.startswith("error: ") for e in errors), errors
    assert "val_nothing" in errors[0] and "METRIC=VALUE" in errors[1] and "momentum" in errors[2]
    assert "lr" in errors[3] and "4096" in errors[4] and "chance" in errors[5]
    assert not any(tmp_path.iterdir())


def test_one_momentum_for_every_configuration_instead_of_sampling_it(tmp_path, capsys):
    from study.commands.steps_args import fill
    from study.commands.steps_study import parser

    workload = resolve(DIGITS)
    args = fill(parser(workload).parse_args([DIGITS, "--optimizer", "sgd", "--momentum", "0"]), workload, 1000)
    assert args.momentum_range is None and all(p["momentum"] is None for p in args.points)  # not sampled
    base = ["steps", DIGITS, "--storage-path", str(tmp_path), "--name", "x"]
    assert main(base + ["--optimizer", "sgd", "--momentum", "0.5", "--momentum-range", "0.1", "0.2"]) == 2
    assert main(base + ["--optimizer", "nesterov", "--momentum", "0"]) == 2
    assert main(base + ["--optimizer", "adam", "--momentum", "0.9"]) == 2
    assert main(base + ["--optimizer", "sgd", "--momentum", "1"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(e.startswith("error: --momentum") for e in errors), errors
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--schedule", "bogus"], ["--warmup-epochs", "-3"], ["--weight-decay", "-1"]])
def test_bad_training_flag_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, flags):
    assert main(["steps", DIGITS, "--storage-path", str(tmp_path), "--name", "x"] + flags) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert not any(tmp_path.iterdir())


def test_too_few_training_examples_for_the_default_batch_sizes_suggests_batch_sizes():
    from study.errors import StudyError
    from study.commands.steps_args import fill
    from study.commands.steps_study import parser

    workload = resolve(DIGITS)
    args = parser(workload).parse_args([DIGITS])
    with pytest.raises(StudyError, match="--batch-sizes"):
        fill(args, workload, 10)


def test_a_declared_goal_on_a_test_metric_is_refused():
    import dataclasses

    from study.errors import StudyError
    from study.workload import Goal, check

    workload = dataclasses.replace(resolve(DIGITS), goals=(Goal("test_error", 0.1),))
    with pytest.raises(StudyError, match="validation metric"):
        check(workload, DIGITS)


def stored(study: Path) -> dict:
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in study.glob("steps/*/result.json")}


REPORT_FILES = ["steps_per_batch.csv", "steps_fit.csv", "steps_best_of_k.csv", "steps_trials.csv",
                "steps_to_result.png", "examples_to_result.png", "best_of_k.png", "b_crit_vs_b_simple.png",
                "best_lr.png", "lr_map.png", "seconds_to_result.png"]


@pytest.mark.slow
def test_steps_study_through_tune(local_ray, tmp_path, monkeypatch, tensorboard_api, capsys):
    from analysis.report import main as report_main
    from study.commands import steps_study

    # A laxer rule than the study's default, so that three configurations already let it stop one (m = 2 of 3).
    monkeypatch.setattr(steps_study, "LEVEL", 0.5)
    monkeypatch.setattr(steps_study, "SAFETY", 1.0)
    argv = ["steps", DIGITS, "--goal", "val_error=0.3", "--goal", "val_error=0.4", "--configs", "3",
            "--batch-sizes", "16", "32", "64", "--optimizer", "nesterov", "--lr-range", "0.05", "0.4",
            "--momentum-range", "0.05", "0.3", "--budget-epochs", "3", "--storage-path", str(tmp_path),
            "--name", "digits", "--gpus-per-trial", "0"]
    capsys.readouterr()
    assert main(argv) == 0
    console = capsys.readouterr().out
    study = tmp_path / "digits"
    saved = json.loads((study / "study.json").read_text())
    # Epochs at the smallest batch size, steps shrinking as 1 / sqrt(B) (study.engine.steps.step_budgets).
    assert saved["budget_steps"] == {"16": 225, "32": 160, "64": 113}
    assert saved["kind"] == "steps" and saved["level"] == 0.5 and saved["safety"] == 1.0
    assert saved["ranges"] == {"lr": [0.05, 0.4], "one_minus_momentum": [0.05, 0.3]}
    assert [g["value"] for g in saved["goals"]] == [0.3, 0.4]
    assert json.loads((study / "workload.json").read_text())["axes"] == {"batch_size": [16, 32, 64],
                                                                       "config": [0, 1, 2]}
    rows = stored(study)
    assert len(rows) == 9
    lrs = {r[0]["config"]["config"]: r[0]["config"]["lr"] for r in rows.values()}
    assert sorted(lrs.values()) == sorted(p["lr"] for p in saved["configs"])  # the same points at every batch size
    # Each configuration its own seed (initialisation and data order), the same at every batch size.
    seeds = {(r[0]["config"]["batch_size"], r[0]["config"]["config"]): r[0]["config"]["seed"] for r in rows.values()}
    assert seeds == {(b, c): S.config_seed(0, c) for b in (16, 32, 64) for c in range(3)}
    assert len(set(seeds.values())) == 3 and [p["seed"] for p in saved["configs"]] == [seeds[16, c] for c in range(3)]
    stopped = json.loads((study / "steps" / "stopped_by_rule.json").read_text())
    first = {}  # batch size -> first reaching steps of its trials
    for name, trial_rows in rows.items():
        steps = [r["step"] for r in trial_rows]
        budget = trial_rows[0]["config"]["budget_steps"]
        # The coarse schedule's steps, then where one reached the goal the fine grid's steps evaluated back to it.
        fine, coarse = S.eval_steps(budget), coarse_steps(S.eval_steps(budget), COARSE_FACTOR)
        k = 1
        while k < len(steps) and steps[k] in coarse:
            k += 1
        last_coarse = steps[k - 1]
        assert steps == [0, *(c for c in coarse if c <= last_coarse),
                         *(f for f in fine if last_coarse < f <= steps[-1])], name
        hits = [k for k, r in enumerate(trial_rows) if r["val_error"] <= 0.3]
        end = trial_rows[-1]["status"]
        if hits:  # the last stored evaluation is the first to reach the strictest goal
            assert hits == [len(trial_rows) - 1] and end == S.REACHED, name
            first.setdefault(trial_rows[0]["config"]["batch_size"], []).append(steps[-1])
        else:
            assert end in (S.CENSORED, S.INFEASIBLE, S.DIVERGED) or name in stopped, name
    assert sum(len(v) for v in first.values()) >= 3, "the easy goal should be reached by several trials"
    for name, step in stopped.items():  # stopped only past the 2nd fastest reaching step of its batch size
        batch = rows[name][0]["config"]["batch_size"]
        assert step > sorted(first[batch])[1] and rows[name][-1]["status"] == "running"
    # The console's last table: each trial's outcome, from its last row, and its steps to result.
    table = console[console.rindex("batch_size  config"):].splitlines()[1:10]
    words = {S.REACHED: "reached", S.CENSORED: "censored (budget)", S.INFEASIBLE: "infeasible",
             S.DIVERGED: "diverged"}
    shown = {tuple(map(int, line.split()[:2])): line.split(None, 2)[2] for line in table}
    for name, trial_rows in rows.items():
        c, last = trial_rows[0]["config"], trial_rows[-1]
        word = "stopped by rule" if name in stopped else words[last["status"]]
        to_result = f"{last['step']:.4g}" if last["status"] == S.REACHED else "-"
        error = "-" if math.isnan(last["val_error"]) else f"{last['val_error']:.4g}"
        assert shown[c["batch_size"], c["config"]].split() == [*word.split(), error,
                                                               str(last["step"]), to_result], (name, table)

    assert report_main([str(study)]) == 0
    report = (study / "report" / "report.md").read_text()
    for name in REPORT_FILES:
        assert (study / "report" / name).stat().st_size > 0 and f"({name})" in report, name
    per_batch = (study / "report" / "steps_per_batch.csv").read_text()
    assert "val_error <= 0.3" in per_batch and "val_error <= 0.4" in per_batch
    assert "the workload's own options: `width` 16" in report  # the example's option, where the grid is

    api = tensorboard_api(study)
    groups = session_groups(api, 9)
    experiment = api("/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"batch_size", "lr", "momentum", "config", "width"} <= {h["name"] for h in experiment["hparamInfos"]}
    assert all(g["hparams"]["width"] == 16 for g in groups)
    to_result = [float(m["value"]) for g in groups for m in g["metricValues"] if m["name"]["tag"] == "steps/to_result"]
    assert len(to_result) == sum(len(v) for v in first.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name, trial_rows = next(iter(rows.items()))
    events = EventAccumulator(str(study / "steps" / name))
    events.Reload()
    assert [e.step for e in events.Scalars("val/error")] == [r["step"] for r in trial_rows]  # the training step

    before = {p: p.read_bytes() for p in study.glob("steps/*/result.json")}
    stopped_before = (study / "steps" / "stopped_by_rule.json").read_text()
    assert main(["steps", DIGITS, "--storage-path", str(tmp_path), "--name", "digits", "--resume"]) == 0
    assert {p: p.read_bytes() for p in study.glob("steps/*/result.json")} == before
    assert (study / "steps" / "stopped_by_rule.json").read_text() == stopped_before


@pytest.mark.slow
@pytest.mark.parametrize("workload", [DIGITS, "mnist-cnn"])
def test_run_steps_from_python_gives_a_tune_callback_every_result(local_ray, tmp_path, result_recorder, workload):
    """Also the screen through Tune: mnist-cnn's val_error declares its bounds, so its smoke trial (a goal of 1 %,
    out of reach on the smoke data) stores screened rows, NaN and the examples they scored, and a whole last row."""
    import study

    seen = result_recorder()
    uri = study.run_steps(workload, smoke=True, configs=1, batch_sizes=[16], budget_epochs=1.0, gpus_per_trial=0,
                          storage_path=str(tmp_path), name="s", callbacks=[seen])
    rows = [r for trial_rows in stored(Path(uri)).values() for r in trial_rows]
    assert len(rows) >= 2 and rows[-1]["step"] > 0
    key = lambda r: (r["trial_id"], r["training_iteration"], r["step"], str(r["val_error"]))  # noqa: E731 (NaN)
    assert sorted(map(key, seen.results)) == sorted(map(key, rows))
    screened = [r for r in rows if r.get(M.SCREENED)]
    if workload == DIGITS:  # declares no bounds: never screened
        assert screened == []
    else:
        val = json.loads((Path(uri) / M.STUDY_FILE).read_text())["data"]["val"]  # the split's size, as stored
        assert screened and all(math.isnan(r["val_error"]) and 0 < r[M.EVAL_EXAMPLES] < val for r in screened)
        assert not rows[-1].get(M.SCREENED) and math.isfinite(rows[-1]["val_error"]), rows[-1]
    with pytest.raises(StudyError, match="callbacks must be a list of ray.tune.Callback"):
        study.run_steps(DIGITS, smoke=True, storage_path=str(tmp_path), name="t", callbacks=[print])
    assert not (tmp_path / "t").exists()


def test_resume_rebuilds_the_rule_from_stored_rows_and_keeps_earlier_stops(tmp_path):
    from types import SimpleNamespace

    from study.commands import steps_stopped
    from study.commands.study_folder import StudyFolder

    folder = StudyFolder(str(tmp_path), "s")
    limits = S.TrialLimits(goal=Goal.from_dict(GOAL_03), budget_steps=100)
    for name, trial_id, batch, errors in (("a", "t_a", 16, [0.9, 0.5, 0.25]), ("b", "t_b", 16, [0.9, 0.2]),
                                          ("c", "t_c", 16, [0.9, 0.6, 0.5, 0.4]), ("d", "t_d", 32, [0.9, 0.1])):
        trial_dir = tmp_path / "s" / "steps" / name
        trial_dir.mkdir(parents=True)
        rows = [{"step": 10 * k, "val_error": e, "trial_id": trial_id, "config": {"batch_size": batch}}
                for k, e in enumerate(errors)]
        (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sh')
    (tmp_path / "s" / "steps" / M.STOPPED_FILE).write_text('{"e": 70}')
    stopper = S.tune_stopper(S.ResultRule(configs=2, level=0.5, safety=1.0), limits)  # m = 1 of 2
    steps_stopped.prime(stopper, folder, limits)
    assert stopper.rule.steps == {16: {"t_a": 20, "t_b": 10}, 32: {"t_d": 10}}
    assert stopper("t_c", {"step": 20, "val_error": 0.5, "config": {"batch_size": 16}})  # past step 10, not there
    assert not stopper("t_x", {"step": 20, "val_error": 0.5, "config": {"batch_size": 64}})
    results = [SimpleNamespace(metrics={"trial_id": "t_c"}, path=str(tmp_path / "s" / "steps" / "c"))]
    steps_stopped.save_stopped(folder, stopper, results)
    assert json.loads((tmp_path / "s" / "steps" / M.STOPPED_FILE).read_text()) == {"c": 20, "e": 70}


def test_report_section_of_a_study_where_nothing_reached_the_goal(tmp_path):
    from analysis.steps_figures import write_section

    trials = [{"trial_id": f"t{b}_{c}", "batch_size": b, "config": c, "lr": 0.1 * (c + 1), "momentum": 0.9,
               "status": S.CENSORED, "rows": [{"step": s, "val_error": 0.5, "train_seconds": s / 10}
                                              for s in (0, 10, 11, 12)]}
              for b in (16, 32) for c in range(2)]
    text = write_section(trials, [Goal.from_dict(GOAL_03)], tmp_path)
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0 and f"({name})" in text, name


def noisy(x, generator):
    """A batched augmentation that draws from the epoch's generator (as random crops and flips do)."""
    return x + 0.5 * torch.randn(x.shape, generator=generator, device=x.device)


@pytest.mark.parametrize("augment", [None, noisy])
def test_trial_restarted_from_a_mid_epoch_checkpoint_goes_on_exactly(augment):
    """With augmentation too: the restart does not draw for the batches it skips, so the checkpoint carries the
    augmentation generator's state."""
    import copy
    import dataclasses

    workload = dataclasses.replace(resolve(DIGITS), augment=augment)
    splits = workload.load(workload.option_values())
    cfg = TrainConfig(workload=DIGITS, batch_size=64, optimizer="nesterov", lr=0.1, momentum=0.9, noise_every=4)
    extra = {GOAL: {**GOAL_03, "value": 0.0}, BUDGET: 45, CHANCE: None, CONFIG: 0}  # 19 steps per epoch
    rows, saved = [], {}

    def report(row, state):
        rows.append(row)
        if 19 < row["step"] < 38 and not saved:  # the first evaluation inside the second epoch
            saved.update(copy.deepcopy(state))

    run_steps_trial(cfg, extra, workload, splits, torch.device("cpu"), report)
    again = []
    run_steps_trial(cfg, extra, workload, splits, torch.device("cpu"), lambda row, state: again.append(row), saved)
    after = [r for r in rows if r["step"] > saved["step"]]
    keys = ["step", "examples", "train_loss", "val_error", "val_loss", "noise_scale", "status"]
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in after] and after


def test_regime_is_undetermined_where_the_doubled_batch_never_reached_the_goal():
    import numpy as np

    from analysis import steps as A

    table = [{"batch_size": 16, "steps": 100.0, "replicates": np.full(10, 100.0)},
             {"batch_size": 32, "steps": math.inf, "replicates": np.full(10, math.inf)}]
    assert A.regimes(table)[0]["regime"] == A.UNDETERMINED and math.isnan(A.regimes(table)[0]["ratio"])
