"""analysis.load on hand-built study folders laid out exactly as Tune 2.x stores them (experiment_state-*.json with
the trial entries Tune's own Trial objects encode, one folder per trial with params.json, result.json, error.txt,
checkpoint_*/).
The end-to-end tests on real Tune output are in test_report_mnist.py and test_report_pcam.py; the report tests
here cover what those cannot produce on demand: a study still running, trials never started."""

import json
import math

import pandas as pd
import pytest

from analysis.load import epoch_table, open_study, trial_table
from analysis.trials import error_reason, parse_results
from study.errors import StudyError

TUNE_ERROR = ("Failure # 1 (occurred at 2026-01-01_10-00-00)\n"
              "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1, repr=train_mnist)\n"
              '  File "study/mnist/trainable.py", line 9, in train_mnist\n'
              "    raise RuntimeError('CUDA out of memory')\n"
              "RuntimeError: CUDA out of memory\n\n")


def row(epoch, mse, status="running", **extra):
    return {"epoch": epoch, "test_mse": mse, "val_mse": math.nan, "status": status, "diverged": status == "diverged",
            "train_seconds": 0.5 * epoch, "noise_scale": math.nan, "time_total_s": 1.0 + epoch,
            "timestamp": 100 + epoch,
            "node_ip": "10.0.0.1", "gpu_ids": "0", "gpu_share": 0.5, "config": {"ignored": True}, **extra}


def write_trial(stage_dir, name, config, rows, *, error=None, tail=""):
    folder = stage_dir / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(config))
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    (folder / "checkpoint_000000").mkdir()
    (folder / "checkpoint_000001").mkdir()
    (folder / "checkpoint_000001" / "state.pt").write_bytes(b"x")
    if error:
        (folder / "error.txt").write_text(error)


def write_state(stage_dir, entries):
    """entries: (dirname or None, trial_id, status, config, failures): Tune's snapshot of them, encoded by Tune's own
    Trial objects as its controller does (a trial that never started has no folder)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment.trial import Trial as TuneTrial

    storage = StorageContext(storage_path=str(stage_dir.parent), experiment_dir_name=stage_dir.name)
    data = []
    for name, tid, status, config, failures in entries:
        trial = TuneTrial("train_mnist", config=config, trial_id=tid, stub=True, storage=storage)
        trial.create_placement_group_factory()
        if name:
            trial.relative_logdir = trial.storage.trial_dir_name = name
        trial.set_status(status)
        trial.run_metadata.num_failures = failures
        data.append(list(trial.get_json_state()))
    (stage_dir / "experiment_state-2026-01-01_10-00-00.json").write_text(
        json.dumps({"trial_data": data, "runner_data": {}, "stats": {}}))


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "mnist-x"
    root.mkdir()
    (root / "study.json").write_text(json.dumps({"study": "mnist", "args": {"lr": None}}))
    stage = root / "batch_sweep"
    cfg = lambda b, run: {"target": "mean", "batch_size": b, "lr": 1e-3, "run": run, "epochs": 2}  # noqa: E731
    write_trial(stage, "t0", cfg(16, 0), [row(0, 50.0), row(1, 9.0), row(2, 4.0, "done")])
    write_trial(stage, "t1", cfg(16, 1), [row(0, 60.0), row(1, math.nan, "diverged")])
    write_trial(stage, "t2", cfg(64, 0), [row(0, 70.0)], error=TUNE_ERROR)
    write_trial(stage, "t3", cfg(64, 1), [row(0, 80.0), row(1, 30.0)], tail='{"epoch": 2, "test_m')
    write_state(stage, [("t0", "a_00000", "TERMINATED", cfg(16, 0), 0),
                        ("t1", "a_00001", "TERMINATED", cfg(16, 1), 0),
                        ("t2", "a_00002", "ERROR", cfg(64, 0), 1),
                        ("t3", "a_00003", "RUNNING", cfg(64, 1), 0),
                        (None, "a_00004", "PENDING", cfg(128, 0), 0)])
    return root


def test_outcomes_read_from_results_and_experiment_state(study_dir):
    study = open_study(str(study_dir))
    assert study.kind == "mnist" and list(study.stages) == ["batch_sweep"]
    trials = {t.trial_id: t for t in study.trials()}
    assert {tid: t.outcome for tid, t in trials.items()} == {
        "a_00000": "done", "a_00001": "diverged", "a_00002": "error", "a_00003": "running", "a_00004": "pending"}
    assert trials["a_00002"].error == "RuntimeError: CUDA out of memory"
    assert trials["a_00004"].rows == [] and trials["a_00004"].config["batch_size"] == 128
    assert [r["epoch"] for r in trials["a_00003"].rows] == [0, 1]  # the cut-short line is skipped
    assert math.isnan(trials["a_00001"].last("test_mse")) and trials["a_00000"].last("test_mse") == 4.0
    assert "config" not in trials["a_00000"].rows[0]
    assert trials["a_00000"].checkpoint.endswith("checkpoint_000001")
    assert trials["a_00000"].checkpoint_files == ("state.pt",)
    assert trials["a_00001"].start_time == 100.0 and trials["a_00001"].end_time == 101.0  # result.json timestamps
    assert trials["a_00002"].failures == 1 and trials["a_00000"].failures == 0


def test_partial_study_names_what_is_missing(study_dir):
    reasons = open_study(str(study_dir)).partial_reasons()
    assert "stage lr_coarse has not started" in reasons and "stage lr_fine has not started" in reasons
    assert "2 trial(s) still running or pending" in reasons


def test_finished_study_is_not_partial(study_dir):
    (study_dir / "study.json").write_text(json.dumps({"study": "mnist", "args": {"lr": 0.001}}))
    for name in ("t3",):
        (study_dir / "batch_sweep" / name / "result.json").unlink()
    stage = study_dir / "batch_sweep"
    for f in stage.glob("experiment_state-*"):
        f.unlink()
    study = open_study(str(study_dir))  # without experiment_state: folders only, statuses unknown
    assert study.partial_reasons() == []
    assert {t.trial_id: t.outcome for t in study.trials()}["t3"] == "incomplete"


def test_file_uri_and_stage_folder_read_the_same(study_dir):
    local = open_study(str(study_dir))
    uri = open_study("file://" + str(study_dir))
    assert [(t.trial_id, t.outcome, len(t.rows)) for t in uri.trials()] == \
        [(t.trial_id, t.outcome, len(t.rows)) for t in local.trials()]
    stage = open_study("file://" + str(study_dir / "batch_sweep"))
    assert stage.only_stage == "batch_sweep" and stage.meta["study"] == "mnist"
    assert stage.expected_stages() == ["batch_sweep"] and len(stage.trials()) == 5


def test_bare_tune_experiment_without_study_json(study_dir):
    (study_dir / "study.json").unlink()
    study = open_study(str(study_dir / "batch_sweep"))
    assert study.kind == "mnist" and study.meta == {}


def test_tables_keep_failed_trials_as_missing_values(study_dir):
    study = open_study(str(study_dir))
    table = trial_table(study.trials(), ["batch_size", "run"], ["test_mse"]).set_index("trial_id")
    assert table.loc["a_00000", "test_mse"] == 4.0 and table.loc["a_00000", "epochs"] == 2
    assert math.isnan(table.loc["a_00001", "test_mse"]) and table.loc["a_00001", "outcome"] == "diverged"
    assert table.loc["a_00002", "error"] == "RuntimeError: CUDA out of memory"
    assert table.loc["a_00004", "outcome"] == "pending" and pd.isna(table.loc["a_00004", "epochs"])
    epochs = epoch_table(study.trials(), ["batch_size"], ["test_mse"])
    assert len(epochs) == 3 + 2 + 1 + 2
    assert epochs[epochs["trial_id"] == "a_00000"]["test_mse"].tolist() == [50.0, 9.0, 4.0]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "does not exist"),
    (lambda p: p, "is empty"),
    (lambda p: (p / "notes.txt").write_text("x") and p, "not a study folder"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is a file"),
    (lambda p: (p / "study.json").write_text("{broken") and p, "not valid JSON"),
    (lambda p: (p / "study.json").write_text('{"study": "cifar"}') and p, "cannot tell which study"),
])
def test_not_a_study_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(StudyError, match=message):
        open_study(str(make(tmp_path)))


def test_storage_path_instead_of_study_names_the_studies(study_dir):
    with pytest.raises(StudyError, match="It holds the studies mnist-x: pass one of them"):
        open_study(str(study_dir.parent))


def test_error_reason_and_result_parsing():
    assert error_reason(TUNE_ERROR) == "RuntimeError: CUDA out of memory"
    assert error_reason("") == "error (error.txt is empty)"
    rows = parse_results(b'{"epoch": 0, "val_mse": NaN, "x": Infinity}\n\n{"epoch": 1}\n{"epo')
    assert [r["epoch"] for r in rows] == [0, 1] and math.isnan(rows[0]["val_mse"]) and rows[0]["x"] == math.inf
    restarted = parse_results(b'{"epoch": 0, "a": 1}\n{"epoch": 1, "a": 2}\n{"epoch": 1, "a": 3}\n{"epoch": 2, "a": 4}')
    assert [(r["epoch"], r["a"]) for r in restarted] == [(0, 1), (1, 3), (2, 4)]


def test_report_on_a_partial_study(study_dir, tmp_path):
    """The report runs on what is there, says it is partial, and keeps unfinished trials visible."""
    from analysis import report

    assert report.main([str(study_dir), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "**PARTIAL RESULTS**" in text and "2 trial(s) still running or pending" in text
    failures = pd.read_csv(tmp_path / "failures.csv").set_index("trial_id")
    assert failures["outcome"].to_dict() == {"a_00001": "diverged", "a_00002": "error", "a_00003": "running",
                                             "a_00004": "pending"}
    spread = pd.read_csv(tmp_path / "spread.csv").set_index("batch_size")
    assert spread.loc[16, "finished"] == 1 and spread.loc[16, "mean"] == 4.0
    assert spread.loc[64, "finished"] == 0 and math.isnan(spread.loc[64, "mean"])
    assert spread.loc[128, "runs"] == 1 and spread.loc[128, "not_finished"] == 1


@pytest.mark.parametrize("kind, stage, config", [
    ("pcam", "grid", {"optimizer": "sgd", "lr": 0.01, "batch_size": 32, "run": 0}),
    ("mnist", "batch_sweep", {"target": "mean", "lr": 0.01, "batch_size": 32, "run": 0}),
])
def test_report_when_no_trial_has_reported_yet(tmp_path, kind, stage, config):
    from analysis import report

    root = tmp_path / "study"
    (root / stage).mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"study": kind, "args": {"lr": 0.01}}))
    write_state(root / stage, [("t0", "b_00000", "PENDING", config, 0)])
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "PARTIAL" in text and "not started yet" in text



def test_timeline_lanes_keep_nodes_that_share_an_ip_apart():
    from analysis.common import lanes

    timing = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "node_ip": ["10.0.0.1"] * 4, "node_id": ["n1aaaa", "n1aaaa", "n2bbbb", ""],
        "gpu_ids": ["0", "0", "0", ""], "start_s": [0.0, 1.0, 0.5, 0.0], "end_s": [10.0, 5.0, 8.0, 2.0]})
    assert lanes(timing) == ["10.0.0.1 (n1aaaa) · GPU 0 · slot 1", "10.0.0.1 (n1aaaa) · GPU 0 · slot 2",
                             "10.0.0.1 (n2bbbb) · GPU 0 · slot 1", "10.0.0.1 · CPU · slot 1"]
