"""A study folder is data: `python -m analysis.report` runs no code found in it. A copied-down study can hold a
pickled payload in Tune's experiment snapshot (its encoder embeds cloudpickle blobs, which Tune's own reader
unpickles) and a Python file next to a workload.json whose "report" names it. Each payload here only creates a
marker folder; the report must leave the marker absent and still report the study. A workload's own section runs
only with --workload-section: from an installed module (never the current folder), or from a file the user names."""

import json
import os
import sys

import pytest
from ray import cloudpickle

from analysis import report
from analysis.load import open_study
from tests.test_analysis_load import row, write_state, write_trial


class Payload:
    """Unpickling it creates `marker` (a folder): proof that stored bytes ran as code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickled(marker) -> dict:
    """A value as Tune's TuneFunctionEncoder stores an object JSON cannot hold."""
    return {"_type": "CLOUDPICKLE_FALLBACK", "value": cloudpickle.dumps(Payload(marker)).hex()}


def plant_snapshot_payloads(stage, marker) -> None:
    """Put the payload everywhere Tune's reader unpickles: a config value, a trial field Tune stores as a pickle's
    hex, the run metadata, and the snapshot's own top level."""
    (snapshot,) = stage.glob("experiment_state-*.json")
    state = json.loads(snapshot.read_text())
    for entry in state["trial_data"]:
        trial, run = json.loads(entry[0]), json.loads(entry[1])
        trial["config"]["extra"] = pickled(marker)
        trial["placement_group_factory"] = cloudpickle.dumps(Payload(marker)).hex()
        run["checkpoint_manager"] = pickled(marker)
        entry[0], entry[1] = json.dumps(trial), json.dumps(run)
    state["runner_data"] = pickled(marker)
    snapshot.write_text(json.dumps(state))


HOOK = "import os\nos.mkdir({marker!r})\n\ndef section(report, study):\n    os.mkdir({marker!r} + '-called')\n"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A workload study copied down into ./results/toy, the report run from the folder above it as
    `python -m analysis.report results/toy` is (the current folder first on the import path)."""
    work = tmp_path / "work"
    root = work / "results" / "toy"
    stage = root / "sweep"
    root.mkdir(parents=True)
    marker = tmp_path / "ran"
    (root / "study.json").write_text(json.dumps({"study": "toy", "kind": "workload", "stages": ["sweep"],
                                                 "args": {"epochs": 2}}))
    (root / "workload.json").write_text(json.dumps({
        "name": "toy", "metrics": [{"name": "test_mse", "higher_is_better": False}], "primary": "test_mse",
        "axes": {"batch_size": [16, 64]}, "report": "results.toy.section:section"}))
    (root / "section.py").write_text(HOOK.format(marker=str(marker)))
    cfg = lambda b: {"batch_size": b, "lr": 1e-3, "epochs": 2}  # noqa: E731
    write_trial(stage, "t0", cfg(16), [row(0, 50.0), row(1, 9.0), row(2, 4.0, "done")])
    write_trial(stage, "t1", cfg(64), [row(0, 60.0), row(1, 8.0), row(2, 5.0, "done")])
    write_state(stage, [("t0", "a_00000", "TERMINATED", cfg(16), 0), ("t1", "a_00001", "RUNNING", cfg(64), 2)])
    plant_snapshot_payloads(stage, marker)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # what `python -m` does with the current folder
    monkeypatch.delitem(sys.modules, "results", raising=False)
    return root, marker


def test_the_snapshot_is_read_as_data(planted):
    root, marker = planted
    trials = {t.trial_id: t for t in open_study(str(root)).trials()}
    assert not marker.exists()
    assert trials["a_00001"].tune_status == "PENDING" and trials["a_00001"].failures == 2  # as Tune's reader says
    assert trials["a_00000"].outcome == "done" and trials["a_00000"].config == {"batch_size": 16, "lr": 1e-3,
                                                                                "epochs": 2}  # params.json


def test_the_report_runs_neither_payload_and_reports_the_study(planted, tmp_path, capsys):
    root, marker = planted
    assert report.main(["results/toy", "--out", str(tmp_path / "out")]) == 0
    assert not marker.exists() and not (tmp_path / "ran-called").exists()
    assert "results.toy.section" not in sys.modules
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Workload study toy: report" in text and "Primary metric: test_mse" in text
    assert "`results.toy.section:section` was not run" in text and "--workload-section" in text
    err = capsys.readouterr().err
    assert "results.toy.section:section" in err and "--workload-section" in err and err.count("\n") == 1


def test_asked_for_the_stored_section_is_imported_only_from_installed_modules(planted, tmp_path, capsys):
    root, marker = planted
    assert report.main(["results/toy", "--out", str(tmp_path / "out"), "--workload-section"]) == 0
    assert not marker.exists() and "results.toy.section" not in sys.modules
    text = (tmp_path / "out" / "report.md").read_text()
    assert "`results.toy.section:section` failed: ModuleNotFoundError" in text


def test_a_section_installed_as_a_package_runs_when_asked(planted, tmp_path, monkeypatch):
    root, _ = planted
    site = tmp_path / "site"
    (site / "toy_sections").mkdir(parents=True)
    (site / "toy_sections" / "__init__.py").write_text(
        "def section(report, study):\n    report.heading('toy section of ' + study.meta['study'])\n")
    monkeypatch.syspath_prepend(str(site))
    workload = json.loads((root / "workload.json").read_text())
    (root / "workload.json").write_text(json.dumps({**workload, "report": "toy_sections:section"}))
    out = tmp_path / "out"
    assert report.main(["results/toy", "--out", str(out)]) == 0
    assert "## toy section of toy" not in (out / "report.md").read_text()
    assert report.main(["results/toy", "--out", str(out), "--workload-section"]) == 0
    assert "## toy section of toy" in (out / "report.md").read_text()


def test_a_section_file_the_user_names_runs(planted, tmp_path):
    root, marker = planted
    mine = tmp_path / "mine.py"
    mine.write_text("def section(report, study):\n    report.heading('my section: ' + study.meta['study'])\n")
    out = tmp_path / "out"
    assert report.main(["results/toy", "--out", str(out), "--workload-section", f"{mine}:section"]) == 0
    assert "## my section: toy" in (out / "report.md").read_text() and not marker.exists()


def test_a_named_section_file_that_is_not_there_is_refused(planted, tmp_path, capsys):
    code = report.main(["results/toy", "--out", str(tmp_path / "out"), "--workload-section",
                        str(tmp_path / "absent.py") + ":section"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --workload-section") and "absent.py" in err and err.count("\n") == 1


def test_python_m_analysis_report_from_the_folder_above_runs_neither(planted, tmp_path):
    """The documented flow itself: `python -m analysis.report results/toy` in the folder the study was copied into."""
    import subprocess
    from pathlib import Path

    root, marker = planted
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-m", "analysis.report", "results/toy", "--out", str(tmp_path / "out")],
                          cwd=root.parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "ran-called").exists()
    assert "Workload study toy: report" in (tmp_path / "out" / "report.md").read_text()
