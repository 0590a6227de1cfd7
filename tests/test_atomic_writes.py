"""Writes that cannot be half done (study.atomic): a driver killed, or a disk filled, at any step of writing
study.json or errored_trials.json, of a --resume's trimming of a trial's files or its edit of Tune's snapshot, or
of emptying a stage Tune cannot resume, leaves a study folder that resumes and reports.

Each writer runs on a filesystem that dies at its k-th operation (an open, a write, a close, a move, a delete:
that one and all after it raise, cleanup included, as in a killed process), for every k up to the number of
operations it makes; afterwards every file holds its old contents or its new, and a second run (the next
--resume) finishes the job as an uninterrupted one does. A real SIGKILL of a process rewriting a file in a loop
checks the same against the operating system."""

import argparse
import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from analysis.load import open_study
from study import metrics as M
from study.atomic import TEMP_PREFIX, replace_file
from study.commands.resume import mark_out_of_memory_errored, start_over, trim_trial_folder
from study.commands.study_folder import RESOURCE_FLAGS, StudyFolder, restore_args
from study.commands.tuning import never_snapshotted

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "data" / "mnist-v1"  # a real stored study (tests/data/README.md)
LOCAL = pafs.LocalFileSystem()


class Killed(BaseException):
    """The process died here: nothing after it runs, not even an `except Exception` cleanup."""


class Dying:
    """A pyarrow filesystem that dies at its `at`-th operation: that operation and every later one raise Killed.
    With `full`, it is a full disk instead: every write raises ENOSPC, and the rest works. `type_name` lets it
    pass for another filesystem (an object store)."""

    def __init__(self, fs, at=None, *, full=False, type_name="local"):
        self.fs, self.at, self.full, self.type_name, self.ops = fs, at, full, type_name, []

    def step(self, name):
        self.ops.append(name)
        if self.full and name == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.at is not None and len(self.ops) >= self.at:
            raise Killed(f"killed at {name}")

    def __getattr__(self, name):
        method = getattr(self.fs, name)

        def call(*args, **kwargs):
            self.step(name)
            result = method(*args, **kwargs)
            return Stream(self, result) if name == "open_output_stream" else result

        return call


class Stream:
    def __init__(self, fs, stream):
        self.fs, self.stream = fs, stream

    def write(self, data):
        self.fs.step("write")
        return self.stream.write(data)

    def close(self):
        self.fs.step("close")
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            self.close()
        elif not isinstance(error, Killed):  # a killed process closes nothing
            self.stream.close()


def steps_of(write) -> int:
    """How many filesystem operations write(fs) makes, uninterrupted (on a throwaway copy)."""
    counting = Dying(LOCAL)
    write(counting)
    return len(counting.ops)


def killed_at_each_step(write, fresh):
    """For k = 1..steps: fresh() makes a new folder, write(fs) runs on a filesystem that dies at step k. Yields k
    after each interrupted write; the last k is the uninterrupted write."""
    fresh()
    n = steps_of(write)
    assert n >= 3
    for k in range(1, n + 2):
        fresh()
        try:
            write(Dying(LOCAL, k))
            assert k == n + 1, f"a write of {n} steps survived its step {k}"
        except Killed:
            assert k <= n
        yield k


def test_a_file_holds_its_old_or_its_new_contents_wherever_its_write_is_killed(tmp_path):
    path = tmp_path / "study.json"
    contents = []
    for k in killed_at_each_step(lambda fs: replace_file(fs, str(path), b'{"new": 1}'),
                                 lambda: path.write_bytes(b'{"old": 1}')):
        contents.append(path.read_bytes())
    assert set(contents[:-1]) == {b'{"old": 1}'} and contents[-1] == b'{"new": 1}'
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "study.json"]
    assert all(name.startswith(TEMP_PREFIX) for name in leftovers)  # hidden, never read


def test_a_full_disk_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "errored_trials.json"
    path.write_text("[]")
    with pytest.raises(OSError, match="No space left"):
        replace_file(Dying(LOCAL, full=True), str(path), b'["t1"]')
    assert path.read_text() == "[]" and [p.name for p in tmp_path.iterdir()] == ["errored_trials.json"]


def test_on_an_object_store_a_file_is_one_upload_and_never_deleted_first(tmp_path):
    trial = tmp_path / "trial"
    shutil.copytree(next((V1 / "batch_sweep").glob("mean_*run=0_00000")), trial)
    store = Dying(LOCAL, type_name="s3")
    trim_trial_folder(store, str(trial), 1.0)
    assert "delete_file" not in store.ops and store.ops.count("move") == 0
    assert [json.loads(line)["epoch"] for line in (trial / "result.json").read_text().splitlines()] == [0, 1]
    assert not [p for p in trial.iterdir() if p.name.startswith(TEMP_PREFIX)]


def resume_args(storage: Path, name: str) -> argparse.Namespace:
    return argparse.Namespace(**{**{k: None for k in RESOURCE_FLAGS}, "storage_path": str(storage), "name": name,
                                 "resume": True})


def test_study_json_killed_at_each_step_leaves_a_study_that_resumes_and_reports(tmp_path):
    study = tmp_path / "store" / "mnist-v1"
    meta = json.loads((V1 / "study.json").read_text())

    def write(fs):
        folder = StudyFolder(str(study.parent), study.name)
        folder.fs = fs
        folder.write_json(M.STUDY_FILE, dict(meta, code_version="rewritten"))

    def fresh():
        shutil.rmtree(study, ignore_errors=True)
        shutil.copytree(V1, study)

    for _ in killed_at_each_step(write, fresh):
        assert restore_args(resume_args(study.parent, study.name), None, "mnist").epochs == meta["args"]["epochs"]
        loaded = open_study(str(study))
        assert loaded.unreadable == [] and loaded.meta["code_version"] in (meta["code_version"], "rewritten")


def test_a_first_study_json_killed_before_it_lands_leaves_a_folder_a_new_start_takes(tmp_path):
    study = tmp_path / "store" / "new"

    def write(fs):
        folder = StudyFolder(str(study.parent), study.name)
        folder.prepare(resume=False)
        folder.fs = fs
        folder.write_json(M.STUDY_FILE, {"study": "mnist", "args": {}})

    landed = []
    for _ in killed_at_each_step(write, lambda: shutil.rmtree(study, ignore_errors=True)):
        landed.append((study / M.STUDY_FILE).exists())
        if not landed[-1]:  # nothing of the study was written: starting it again goes ahead, as into a new folder
            assert StudyFolder(str(study.parent), study.name).prepare(resume=False) is True
    assert landed[-1] and not any(landed[:-1])


def test_errored_trials_killed_at_each_step_leaves_a_stage_that_resumes_and_reports(tmp_path):
    study = tmp_path / "store" / "mnist-v1"
    errored = f"batch_sweep/{M.ERRORED_FILE}"
    named = sorted(p.name for p in (V1 / "batch_sweep").iterdir() if p.is_dir())[:1]

    def write(fs):
        folder = StudyFolder(str(study.parent), study.name)
        folder.fs = fs
        folder.write_json(errored, named)

    def fresh():
        shutil.rmtree(study, ignore_errors=True)
        shutil.copytree(V1, study)

    for _ in killed_at_each_step(write, fresh):
        assert StudyFolder(str(study.parent), study.name).read_json(errored) in ([], named)
        assert open_study(str(study)).unreadable == []


def trial_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(TEMP_PREFIX)}


def test_trimming_killed_at_each_step_is_finished_by_the_next_resume(tmp_path):
    source = next((V1 / "batch_sweep").glob("mean_*run=0_00000"))
    done = tmp_path / "done"
    shutil.copytree(source, done)
    trim_trial_folder(LOCAL, str(done), 1.0)
    before, after = trial_files(source), trial_files(done)
    assert before["result.json"] != after["result.json"] and before["progress.csv"] != after["progress.csv"]
    trial = tmp_path / "trial"

    def fresh():
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(source, trial)

    for _ in killed_at_each_step(lambda fs: trim_trial_folder(fs, str(trial), 1.0), fresh):
        now = trial_files(trial)
        assert now.keys() == before.keys()
        assert all(now[name] in (before[name], after[name]) for name in now)  # each file whole, old or trimmed
        trim_trial_folder(LOCAL, str(trial), 1.0)  # the next --resume trims again
        assert trial_files(trial) == after


def test_the_snapshot_edit_killed_at_each_step_is_redone_by_the_next_resume(tmp_path):
    from ray.tune import ExperimentAnalysis  # Tune's own reader, as its restore reads the snapshot (our test data)

    source = tmp_path / "source"
    shutil.copytree(V1 / "batch_sweep", source)
    (snapshot,) = source.glob("experiment_state-*.json")
    state = json.loads(snapshot.read_text())
    run = json.loads(state["trial_data"][0][1])
    run["last_result"][M.STATUS] = M.STATUS_OOM  # ended out of memory: --retry-errored marks it errored
    state["trial_data"][0][1] = json.dumps(run)
    snapshot.write_text(json.dumps(state))
    stage = tmp_path / "batch_sweep"

    def fresh():
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(source, stage)

    for _ in killed_at_each_step(lambda fs: mark_out_of_memory_errored(fs, str(stage)), fresh):
        statuses = sorted(t.status for t in ExperimentAnalysis(str(stage)).trials)
        assert statuses in (["TERMINATED", "TERMINATED"], ["ERROR", "TERMINATED"])
        mark_out_of_memory_errored(LOCAL, str(stage))  # the next --resume --retry-errored
        assert sorted(t.status for t in ExperimentAnalysis(str(stage)).trials) == ["ERROR", "TERMINATED"]


def test_a_stage_emptied_for_a_new_start_and_killed_meanwhile_is_emptied_again(tmp_path):
    study = tmp_path / "store" / "s"
    stage = study / "batch_sweep"

    def fresh():
        shutil.rmtree(study, ignore_errors=True)
        shutil.copytree(V1 / "batch_sweep", stage)
        next(stage.glob("experiment_state-*.json")).unlink()  # stopped before Tune's first snapshot

    folder = StudyFolder(str(study.parent), study.name)
    for _ in killed_at_each_step(lambda fs: start_over(fs, str(stage)), fresh):
        left = sorted(p.name for p in stage.iterdir())
        assert left == [] or never_snapshotted(folder, "batch_sweep")  # tuner.pkl goes last: still told apart
        start_over(LOCAL, str(stage))
        assert list(stage.iterdir()) == []


WRITER = """
import itertools, sys
import pyarrow.fs as pafs
from study.atomic import replace_file
fs, path = pafs.LocalFileSystem(), sys.argv[1]
for i in itertools.count():
    replace_file(fs, path, b'{"version": %d, "pad": "%s"}' % (i, b"x" * (1 << 20)))
    if i == 1:
        print("writing", flush=True)
"""


def test_a_process_killed_while_rewriting_a_file_leaves_it_whole(tmp_path):
    path = tmp_path / "study.json"
    path.write_text('{"version": -1}')
    for delay in (0.0, 0.05, 0.13):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"writing\n"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait(30)
        assert json.loads(path.read_text())["version"] >= 1


def test_the_report_warns_of_each_unreadable_file_and_reports_the_rest(tmp_path, capsys):
    from analysis import report

    study = tmp_path / "mnist-v1"
    shutil.copytree(V1, study)
    cut = {study / "lr_coarse" / M.ERRORED_FILE: '["mean_lr', study / "chosen_lr.json": '{"mean": {"lr": 0.0',
           next((study / "lr_fine").glob("experiment_state-*.json")): '{"trial_data": [["{\\"trial_id',
           next((study / "batch_sweep").glob("*_00000")) / "params.json": '{"target": "me'}
    for path, text in cut.items():
        path.write_text(text)  # as an older version's write cut short by a kill left them
    assert report.main([str(study), "--out", str(tmp_path / "out")]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(cut) and all(w.startswith("warning: ") for w in warnings)
    for path in cut:
        assert sum(str(path) in w for w in warnings) == 1, path
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"**{len(cut)} stored file(s) could not be read**" in text
    assert "their Tune statuses unknown" in text and "its config taken from Tune's snapshot" in text
    stages = __import__("pandas").read_csv(tmp_path / "out" / "stages.csv").set_index("stage")
    assert stages["trials"].to_dict() == {"batch_sweep": 2, "lr_coarse": 3, "lr_fine": 3}
