"""A trial's own errors (study.engine.trial_errors): a bug ends its trial at once, unretried; an error another try may pass
is retried until it comes again at the same place; the stage ends with one line per distinct error; and a trial
whose primary metric is NaN at its end shows as "no result" on the console, in TensorBoard and in the report.

The fast tests drive the pieces with fake trials and results; the slow one runs a study of a workload that passes
the preflight and then breaks inside its trials (`pytest tests/test_trial_errors.py -m slow`, about a minute)."""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from tensorboard.plugins.hparams import api_pb2

from analysis.load import open_study
from analysis.trials import Trial as StoredTrial, _read_trial
from analysis.report import main as report_main
from study import metrics as M
from study.__main__ import main
from study.commands.console import StudyConsole
from study.commands.tensorboard import StudyTensorBoard
from study.engine.trial_errors import line_of, summary
from test_tensorboard import end_status, epoch, fake_trial, read


def raise_here():
    raise ValueError("shapes (4, 3) and (2, 2) do not match\nsecond line")


def test_an_exception_is_its_type_first_line_and_place():
    try:
        raise_here()
    except ValueError as err:
        line = line_of(err)
    lineno = raise_here.__code__.co_firstlineno + 1
    assert line == f"ValueError: shapes (4, 3) and (2, 2) do not match at test_trial_errors.py:{lineno} in raise_here"


def test_one_line_per_distinct_error_with_its_count_and_traceback():
    def result(name, error=None, **last):
        return SimpleNamespace(path=f"/s/sweep/{name}", error=error, metrics=last)

    bug = "ValueError: no such layer at net.py:9 in forward"
    results = [result("a", status=M.STATUS_ERROR, message=bug), result("b", status=M.STATUS_DONE),
               result("c", status=M.STATUS_ERROR, message=bug),
               result("d", error=RuntimeError("ray::train()\nTraceback ...\nOSError: disk gone")),
               result("e", status=M.STATUS_OOM, message="CUDA out of memory at batch size 512: ...")]
    assert summary(results) == [
        f"error in 2 trials: {bug}; traceback: /s/sweep/a/traceback.txt",
        "error in 1 trial: OSError: disk gone; traceback: /s/sweep/d/error.txt",
        "error in 1 trial: CUDA out of memory at batch size 512: ..."]
    assert summary([results[1]]) == []


def test_an_ended_trial_is_an_error_and_a_nan_primary_no_result(tmp_path):
    """On the console and in TensorBoard: "error" and a failed session for a trial its own error ended (reported,
    not raised); "no result" and status unknown for one that finished with its primary metric NaN."""
    writer = StudyTensorBoard("digits", "sweep", {"val_error": "val/error"}, primary="val_error")
    console = StudyConsole("sweep", ["batch_size"], ["val_error"], primary="val_error")
    trials = {name: fake_trial(tmp_path / name, {"batch_size": b, "epochs": 2})
              for name, b in (("ok", 16), ("nan", 32), ("bug", 64))}
    last = {"ok": epoch(2, val_error=0.1, status=M.STATUS_DONE), "nan": epoch(2, val_error=math.nan,
                                                                               status=M.STATUS_DONE),
            "bug": {M.EPOCH: 2, M.STATUS: M.STATUS_ERROR, M.MESSAGE: "ValueError: x", M.DIVERGED: False}}
    for name, trial in trials.items():
        writer.log_trial_start(trial)
        console.on_trial_start(0, list(trials.values()), trial)
        writer.log_trial_result(1, trial, epoch(1, val_error=0.5))
        console.on_trial_result(0, list(trials.values()), trial, epoch(1, val_error=0.5))
        trial.last_result = last[name]
        writer.log_trial_result(2, trial, trial.last_result)
        console.on_trial_result(0, list(trials.values()), trial, trial.last_result)
        writer.log_trial_end(trial)
        console.on_trial_complete(0, list(trials.values()), trial)
    assert [line.split()[1:3] for line in console.table()[1:]] == [["done", "0.1"], ["no", "result"],
                                                                  ["error", "0.5"]]
    assert "3/3 trials finished" in console.progress()
    statuses = {name: end_status(read(trial.local_path)) for name, trial in trials.items()}
    assert statuses == {"ok": api_pb2.STATUS_SUCCESS, "nan": api_pb2.STATUS_UNKNOWN, "bug": api_pb2.STATUS_FAILURE}


def test_the_report_reads_an_ended_trial_as_an_error_and_a_nan_primary_as_no_result(tmp_path):
    rows = [epoch(0, val_error=0.9), epoch(1, val_error=0.5),
            {M.EPOCH: 2, M.STATUS: M.STATUS_ERROR, M.MESSAGE: "ValueError: x at net.py:9 in forward"}]
    folder = tmp_path / "trial"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"batch_size": 16}))
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trial = _read_trial(pafs.LocalFileSystem(), str(folder), "sweep", "trial", None, [])
    assert trial.outcome == "error" and trial.error == "ValueError: x at net.py:9 in forward"
    assert [r[M.EPOCH] for r in trial.rows] == [0, 1]  # the error's row trained nothing

    finished = [epoch(0, val_error=0.9), epoch(1, val_error=math.nan, status=M.STATUS_DONE)]
    assert StoredTrial("sweep", "t", "t", {}, rows=finished, primary="val_error").outcome == "no result"
    assert StoredTrial("sweep", "t", "t", {}, rows=finished).outcome == "done"  # no primary known (mnist, pcam)
    finished[-1]["val_error"] = 0.2
    assert StoredTrial("sweep", "t", "t", {}, rows=finished, primary="val_error").outcome == "done"


def test_tune_traceback_of_a_failed_trial_is_kept_off_the_console_unless_verbose():
    import logging

    from study.commands.console import TRIAL_FAILURE_LOGGER, tune_console

    # A handler of our own on the logger (the filter sits on the logger, so it sees what Ray's handlers would):
    # pytest's caplog does not see a logger that does not propagate on every pytest release.
    logger, records = logging.getLogger(TRIAL_FAILURE_LOGGER), []
    handler, level = logging.Handler(logging.ERROR), logger.level
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    try:
        with tune_console(verbose=False):
            logger.error("Trial task failed for trial a_00000", exc_info=ValueError("x"))
            logger.error("Could not re-use actor for trial a_00001")
        with tune_console(verbose=True):
            logger.error("Trial task failed for trial a_00002")
        logger.error("Trial task failed for trial a_00003")  # outside a stage: left alone
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage()[-7:] for r in records] == ["a_00001", "a_00002", "a_00003"]


# Passes the preflight (study.commands.preflight: a few examples, one training step), then breaks inside its trials, each
# seed in its own way: the trial's process is seeded with the trial's seed (study.engine.train.seed_everything).
BREAKS_IN_TRIALS = '''
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from study.workload import Metric, Workload


def load(options):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return {"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # in the checkpoint: a restart goes on

    def forward(self, x):
        if self.training:
            self.steps += 1
            broken = self.steps > 13 and not Path(__file__).with_name("fixed").exists()  # in epoch 2 (13 batches)
            if broken and torch.initial_seed() == 0:
                raise ValueError("the second epoch breaks this model")
            if broken and torch.initial_seed() == 1:
                raise OSError("the disk went away")
        return self.linear(x)


def evaluate(outputs, y):
    error = (outputs.argmax(1) != y).float().mean().item()
    return {"error": math.nan if len(y) > 50 and torch.initial_seed() == 2 else error}  # undefined on the split


workload = Workload(name="breaks", summary="breaks in its trials", load=load, model=lambda options: Net(),
                    loss=nn.functional.cross_entropy, evaluate=evaluate, metrics=(Metric("error", False),),
                    primary="val_error", defaults=dict(batch_sizes=[16], lrs=[0.1], epochs=3))
'''


@pytest.fixture
def no_ray_left():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()  # the study started its own


@pytest.mark.slow
def test_a_bug_in_a_trial_is_tried_once_and_summed_up_in_one_line(tmp_path, capsys, no_ray_left):
    path = tmp_path / "breaks.py"
    path.write_text(BREAKS_IN_TRIALS)
    started = time.monotonic()
    code = main(["run", str(path), "--seeds", "0", "1", "2", "--storage-path", str(tmp_path), "--name", "s",
                 "--num-cpus", "2", "--gpus-per-trial", "0", "--max-failures", "3", "--noise-scale", "off"])
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 1, out + err
    trials = {json.loads((p / "params.json").read_text())["seed"]: p for p in (tmp_path / "s" / "sweep").iterdir()
              if (p / "params.json").is_file()}
    assert sorted(trials) == [0, 1, 2]

    def rows(seed):
        return [json.loads(line) for line in (trials[seed] / "result.json").read_text().splitlines()]

    # The bug: tried once (Tune never saw an exception), ended at its first step of epoch 2, its traceback kept.
    bug = rows(0)
    assert [r[M.EPOCH] for r in bug] == [0, 1, 2] and bug[-1][M.STATUS] == M.STATUS_ERROR
    assert bug[-1][M.MESSAGE].startswith("ValueError: the second epoch breaks this model at breaks.py:")
    assert not (trials[0] / "error.txt").exists()
    assert "Traceback" in (trials[0] / M.TRACEBACK_FILE).read_text()
    # An OSError may pass on another try: retried once from the epoch-1 checkpoint, then the same again ends it.
    retried = rows(1)
    assert retried[-1][M.STATUS] == M.STATUS_ERROR and retried[-1][M.MESSAGE].startswith("OSError: the disk")
    assert (trials[1] / "error.txt").read_text().count("Failure # ") == 1
    # NaN at the end without diverging: no result.
    assert rows(2)[-1][M.STATUS] == M.STATUS_DONE and math.isnan(rows(2)[-1]["val_error"])

    lines = out.splitlines()
    summary_lines = [line for line in lines if line.startswith("error in ")]
    assert len(summary_lines) == 2, out
    assert summary_lines[0].startswith("error in 1 trial: ValueError: the second epoch breaks this model at breaks")
    assert summary_lines[0].endswith(f"; traceback: {trials[0]}/{M.TRACEBACK_FILE}")
    assert summary_lines[1].startswith("error in 1 trial: OSError: the disk went away")
    table = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "status"])
    assert [" ".join(line.split()[1:-1]) for line in lines[table + 1:table + 4]] == ["error", "error", "no result"]
    assert "Traceback" not in out + err, (out + err)[-3000:]  # Ray's tracebacks stay in the trial folders
    assert seconds < 240

    study = open_study(str(tmp_path / "s"))
    outcomes = {t.config["seed"]: t.outcome for t in study.trials("sweep")}
    assert outcomes == {0: "error", 1: "error", 2: "no result"}
    assert json.loads((tmp_path / "s" / "sweep" / M.ERRORED_FILE).read_text()) == sorted(
        p.name for p in (trials[0], trials[1]))
    assert report_main([str(tmp_path / "s"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| sweep | 3 | 0 | 1 | 0 | 2 |" in report  # done, no result, diverged, error
    assert "finished, but its val_error is NaN at the end: no result" in report

    # Fixed, the errored trials go on from their last checkpoints; the finished one is not run again.
    (tmp_path / "fixed").touch()
    kept = (trials[2] / "result.json").read_bytes()
    assert main(["run", str(path), "--storage-path", str(tmp_path), "--name", "s", "--resume",
                 "--retry-errored"]) == 0, capsys.readouterr()
    for seed in (0, 1):
        assert [r[M.EPOCH] for r in rows(seed)] == [0, 1, 2, 3] and rows(seed)[-1][M.STATUS] == M.STATUS_DONE
    assert (trials[2] / "result.json").read_bytes() == kept
    assert {t.config["seed"]: t.outcome for t in open_study(str(tmp_path / "s")).trials("sweep")} == {
        0: "done", 1: "done", 2: "no result"}
