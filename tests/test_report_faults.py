"""What the report makes of faults, on study folders laid out as Tune 2.60 stores them: a trial that failed and
recovered counts by how it ended; a corrupt result.json line is named (file and line) in the report and on
stderr; a bad EXPERIMENT_DIR or --out is one line and exit 2. The same on a real killed-and-restarted Tune trial:
tests/test_faults.py::test_worker_killed_after_epoch_0_reports_each_epoch_once_and_counts_as_recovered."""

import json

import pandas as pd
import pytest

from analysis import report
from analysis.load import open_study
from tests.test_analysis_load import TUNE_ERROR, row, write_state, write_trial

CFG = lambda b, run: {"target": "mean", "batch_size": b, "lr": 1e-3, "run": run, "epochs": 2}  # noqa: E731


@pytest.fixture
def recovered_study(tmp_path):
    """Two runs of batch 16, both finished; run 1 was killed once and restarted by Tune (error.txt stays)."""
    root = tmp_path / "mnist-r"
    stage = root / "batch_sweep"
    root.mkdir()
    (root / "study.json").write_text(json.dumps({"study": "mnist", "args": {"lr": 0.001}}))
    write_trial(stage, "t0", CFG(16, 0), [row(0, 50.0), row(1, 9.0), row(2, 4.0, "done")])
    write_trial(stage, "t1", CFG(16, 1), [row(0, 60.0), row(1, 10.0), row(2, 6.0, "done")], error=TUNE_ERROR)
    write_state(stage, [("t0", "a_00000", "TERMINATED", CFG(16, 0), 0), ("t1", "a_00001", "TERMINATED", CFG(16, 1), 1)])
    return root


def test_a_recovered_trial_counts_by_how_it_ended(recovered_study, tmp_path, capsys):
    trials = {t.trial_id: t for t in open_study(str(recovered_study)).trials()}
    assert trials["a_00001"].outcome == "done" and trials["a_00001"].recovered == "recovered after 1 failure"
    assert trials["a_00000"].recovered == ""
    out = tmp_path / "out"
    assert report.main([str(recovered_study), "--out", str(out)]) == 0
    spread = pd.read_csv(out / "spread.csv").set_index("batch_size")
    assert spread.loc[16, "finished"] == 2 and spread.loc[16, "mean"] == 5.0  # (4 + 6) / 2, both runs
    text = (out / "report.md").read_text()
    assert "a_00001: recovered after 1 failure (last error: RuntimeError: CUDA out of memory)" in text
    assert "Every trial finished normally." in text
    sweep = pd.read_csv(out / "sweep_trials.csv").set_index("trial_id")
    assert sweep.loc["a_00001", "error"] == "recovered after 1 failure (RuntimeError: CUDA out of memory)"
    assert capsys.readouterr().err == ""


def test_without_experiment_state_failures_are_counted_from_error_txt(recovered_study):
    stage = recovered_study / "batch_sweep"
    next(stage.glob("experiment_state-*")).unlink()
    (stage / "t1" / "error.txt").write_text(TUNE_ERROR + TUNE_ERROR.replace("Failure # 1", "Failure # 2"))
    trial = {t.dirname: t for t in open_study(str(recovered_study)).trials()}["t1"]
    assert trial.outcome == "done" and trial.recovered == "recovered after 2 failures"
    (stage / "t1" / "result.json").write_text(json.dumps(row(0, 60.0)) + "\n")  # stopped at its error
    trial = {t.dirname: t for t in open_study(str(recovered_study)).trials()}["t1"]
    assert trial.outcome == "error" and trial.recovered == ""


def test_the_studys_record_of_errored_trials_wins_over_a_stale_running(recovered_study):
    stage = recovered_study / "batch_sweep"
    write_trial(stage, "t2", CFG(64, 0), [row(0, 70.0)], error=TUNE_ERROR)
    write_state(stage, [("t0", "a_00000", "TERMINATED", CFG(16, 0), 0), ("t1", "a_00001", "TERMINATED", CFG(16, 1), 1),
                        ("t2", "a_00002", "RUNNING", CFG(64, 0), 1)])  # Tune's snapshot raced the worker's death
    assert {t.dirname: t.outcome for t in open_study(str(recovered_study)).trials()}["t2"] == "running"
    (stage / "errored_trials.json").write_text(json.dumps(["t2"]))
    trial = {t.dirname: t for t in open_study(str(recovered_study)).trials()}["t2"]
    assert trial.outcome == "error" and trial.recovered == ""


def test_corrupt_result_lines_are_named_and_counted(recovered_study, tmp_path, capsys):
    stage = recovered_study / "batch_sweep"
    lines = (stage / "t0" / "result.json").read_text().splitlines(keepends=True)
    (stage / "t0" / "result.json").write_text(lines[0] + '{"epoch": 1, "test_m\n' + lines[2])
    lines = (stage / "t1" / "result.json").read_text().splitlines(keepends=True)
    (stage / "t1" / "result.json").write_text("".join(lines[:2]) + "[1, 2]\n")  # the finished trial's last row
    study = open_study(str(recovered_study))
    trials = {t.dirname: t for t in study.trials()}
    assert [r["epoch"] for r in trials["t0"].rows] == [0, 2] and trials["t0"].outcome == "done"
    assert trials["t1"].outcome == "incomplete"  # its last row is gone, and the report says why
    assert [line for line, _why in trials["t0"].corrupt] == [2] and [line for line, _ in trials["t1"].corrupt] == [3]
    out = tmp_path / "out"
    assert report.main([str(recovered_study), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {stage / 't0' / 'result.json'} line 2: not a result row")
    assert err[1].startswith(f"warning: {stage / 't1' / 'result.json'} line 3: not a result row")
    assert err[2] == "warning: 2 corrupt result line(s) skipped (listed in the report)" and len(err) == 3
    text = (out / "report.md").read_text()
    assert "**2 corrupt result line(s)**" in text and f"{stage / 't1' / 'result.json'} line 3" in text


def test_a_line_still_being_written_is_not_corrupt(recovered_study, capsys):
    stage = recovered_study / "batch_sweep"
    write_trial(stage, "t2", CFG(64, 0), [row(0, 70.0)], tail='{"epoch": 1, "te')
    write_state(stage, [("t0", "a_00000", "TERMINATED", CFG(16, 0), 0), ("t1", "a_00001", "TERMINATED", CFG(16, 1), 1),
                        ("t2", "a_00002", "RUNNING", CFG(64, 0), 0)])
    assert open_study(str(recovered_study)).corrupt_lines() == []
    write_state(stage, [("t0", "a_00000", "TERMINATED", CFG(16, 0), 0), ("t1", "a_00001", "TERMINATED", CFG(16, 1), 1),
                        ("t2", "a_00002", "TERMINATED", CFG(64, 0), 0)])  # ended, so the cut line is a loss
    (bad,) = open_study(str(recovered_study)).corrupt_lines()
    assert bad.endswith("line 2: not a result row (cut short, no newline); skipped")


def test_bad_places_are_one_line_and_write_nothing(recovered_study, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    before = sorted(p.name for p in recovered_study.rglob("*"))
    for argv, message in [(["s3://"], "names no bucket"),
                          ([str(recovered_study), "--out", str(a_file)], "is a file; pass a folder"),
                          ([str(recovered_study), "--out", str(a_file / "sub")], "cannot write the report into"),
                          ([str(recovered_study), "--out", "/proc/report"], "cannot write the report into")]:
        assert report.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert a_file.read_text() == "x" and sorted(p.name for p in recovered_study.rglob("*")) == before
