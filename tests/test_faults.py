"""Faults injected into real MNIST studies, each run as a user runs it: `python -m study.mnist` in its own session
(it starts its own local Ray), checked through what Tune stored.

- a trial's worker process is SIGKILLed mid-epoch: Tune restarts it from its last checkpoint and it ends exactly
  where an uninterrupted run ends (also from epoch 0's checkpoint: every epoch stored once, counted as recovered);
- the driver and its Ray are SIGKILLed mid-study: `--resume` takes over the lease the killed driver left and
  finishes the study without re-running finished trials, each epoch stored once (result.json, progress.csv,
  TensorBoard);
- starting into an existing study folder without `--resume` refuses and changes nothing;
- with `--max-failures 0` a killed worker leaves an errored trial: `--resume` keeps it errored, `--resume
  --retry-errored` completes it from its checkpoint.

Slow (eight short studies, 4-5 minutes on two busy cores): `pytest tests/test_faults.py`.
"""

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_procs import kill_until_gone
from tensorboard_checks import stored_steps
from study import metrics as M

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
STUDY_TIMEOUT = 300  # seconds one study may run before the test gives up on it (normally under a minute)
STAGE = "batch_sweep"  # with --lr the study has only this stage
SWEEP = ["--targets", "mean", "--lr", "1e-3", "--num-cpus", "2", "--epochs", "3"]


def data_args(n_train: int) -> list[str]:
    """Real MNIST when the shared copy is there; else as many built-in synthetic digits (--smoke makes 512 plus
    --val-size of them, and with --lr every one of them trains)."""
    if SHARED_MNIST.is_dir():
        return ["--data-dir", str(SHARED_MNIST), "--train-limit", str(n_train), "--test-limit", "1000"]
    return ["--smoke", "--val-size", str(n_train - 512)]


# Ray Tune 2.60 (seen with reuse_actors=True, as run_stage sets): when a worker's death is handled before its
# failed task, the trial is set to ERROR but not queued for the next experiment snapshot; if a snapshot was taken
# since its last result, the saved state keeps it RUNNING and a plain Tuner.restore resumes it (tune_controller.py:
# _schedule_trial_stop returns at "Will not STOP trial actor as it is not live" before _mark_trial_to_checkpoint).
TUNE_STALE_ERROR = ("Ray Tune saved the killed trial as RUNNING, so --resume without --retry-errored resumed it "
                    "(Tune's _schedule_trial_stop skips _mark_trial_to_checkpoint for a dead actor)")

# Epochs of a few seconds (batch 16, one thread), long enough to land a kill inside one.
LONG_EPOCHS = data_args(6000) + SWEEP + ["--batch-sizes", "16", "--runs", "1"]
ERRORED = LONG_EPOCHS + ["--runs", "2", "--max-failures", "0"]  # run 0 is the LONG_EPOCHS trial (seed 16 + 0)


# ---- processes -------------------------------------------------------------------------------------------------

def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`: the study's driver and every Ray process it started. Ray puts each worker
    in a process group of its own, so the session, not the driver's group, holds them all. Zombies are dead."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended while we looked
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state not in "ZX":
            pids.append(int(entry))
    return pids


class Study:
    """`python -m study.mnist ARGS` in a new session, output to a log file; on exit every process of that session
    (driver, GCS, raylet, workers) is killed and checked gone."""

    def __init__(self, tmp: Path, *args: str):
        self.log = tmp / f"study-{time.monotonic_ns()}.log"
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "study.mnist", *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid  # the session leader

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = STUDY_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"study still running after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def owns(self, pid: int) -> bool:
        return pid in session_pids(self.sid)

    def kill(self) -> None:
        """SIGKILL the driver's process group (driver, GCS, raylet), then the workers, which sit in groups of their
        own and would only exit a few seconds later by themselves; wait until all are gone."""
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        left = kill_until_gone(lambda: session_pids(self.sid), 30, poll=0.1)
        assert not left, f"processes of the killed study survive: {left}"


def run_study(tmp: Path, *args: str, timeout: float = STUDY_TIMEOUT) -> tuple[int, str]:
    with Study(tmp, *args) as study:
        code = study.wait(timeout)
        return code, study.output()


def wait_for(condition, study: Study, what: str, timeout: float = STUDY_TIMEOUT):
    """Poll condition() until it returns something truthy; fail if the study ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not study.alive():
            pytest.fail(f"the study ended (exit {study.proc.returncode}) before {what}:\n{study.output()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n{study.output()[-3000:]}")


# ---- stored results --------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    """result.json rows written so far; a last line still being written is left for the next look."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def trials(stage_dir: Path) -> dict[str, dict]:
    """Every trial of one Tune experiment by folder name: its folder, config and rows (as far as written)."""
    out = {}
    for folder in sorted(p for p in stage_dir.glob("*") if p.is_dir() and (p / "params.json").is_file()):
        try:
            config = json.loads((folder / "params.json").read_text())
        except json.JSONDecodeError:  # being written (Tune creates it, then writes it): not a trial yet
            continue
        out[folder.name] = {"dir": folder, "config": config, "rows": read_rows(folder / "result.json")}
    return out


def finished(trial: dict) -> bool:
    return bool(trial["rows"]) and trial["rows"][-1][M.STATUS] == M.STATUS_DONE


def listing(folder: Path) -> dict[str, tuple]:
    """Every file and folder below `folder` with its size, mtime and content hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


def same(a: float, b: float) -> bool:
    """Bit-for-bit equal, NaN included (epoch 0 has no training loss; noise scale may be NaN)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_run(rows: list[dict], reference: list[dict]) -> None:
    """rows (possibly restarted) reached the same numbers as the uninterrupted reference, every epoch."""
    by_epoch = {r[M.EPOCH]: r for r in rows}  # a restarted epoch's later row is the one that counts
    assert sorted(by_epoch) == [r[M.EPOCH] for r in reference]
    for ref in reference:
        row = by_epoch[ref[M.EPOCH]]
        for key in (M.TRAIN_LOSS, M.TEST_MSE, M.NOISE_SCALE):
            assert same(row[key], ref[key]), f"epoch {ref[M.EPOCH]} {key}: {row[key]!r} != {ref[key]!r}"


def assert_restarted_once(rows: list[dict], killed_pid: int, epochs: int) -> int:
    """The rows show one restart: the first ones from the killed worker, the rest from another process that
    continued after the last checkpointed epoch; every epoch reported exactly once. Returns the restart epoch."""
    pids = [r["pid"] for r in rows]
    assert pids[-1] != killed_pid, f"no restart recorded: {pids}"
    before = pids.index(next(p for p in pids if p != killed_pid))
    assert set(pids[:before]) == {killed_pid} and killed_pid not in pids[before:], pids
    assert len(set(pids[before:])) == 1
    assert [r[M.EPOCH] for r in rows] == list(range(epochs + 1)), "an epoch was lost or repeated"
    assert rows[-1][M.STATUS] == M.STATUS_DONE
    return rows[before][M.EPOCH]


# ---- a worker killed mid-epoch ---------------------------------------------------------------------------------

class Reference:
    """An uninterrupted run of the LONG_EPOCHS study, started in the background when first asked for (it runs
    beside the first killed study): the numbers a restarted trial must reproduce."""

    def __init__(self, study: Study, folder: Path):
        self.study, self._folder, self.code = study, folder, None

    @property
    def folder(self) -> Path:
        if self.code is None:
            self.code = self.study.wait()
        assert self.code == 0, self.study.output()[-3000:]
        return self._folder

    def rows(self) -> list[dict]:
        (trial,) = trials(self.folder / STAGE).values()
        return trial["rows"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    with Study(tmp, *LONG_EPOCHS, "--storage-path", str(tmp), "--name", "ref") as study:
        yield Reference(study, tmp / "ref")


def kill_worker_mid_epoch(study: Study, result_file: Path, after_epoch: int = 1) -> tuple[int, list[dict]]:
    """Once `after_epoch` is reported (its checkpoint saved), SIGKILL the trial's worker a third of an epoch into
    the next one. Returns the killed pid and the rows reported before the kill."""
    rows = wait_for(lambda: (r := read_rows(result_file)) and r[-1][M.EPOCH] >= after_epoch and r, study,
                    f"epoch {after_epoch} in {result_file}")
    pid = rows[-1]["pid"]
    assert study.owns(pid), f"pid {pid} of {result_file} is not a process of this study"
    time.sleep(rows[-1][M.EPOCH_SECONDS] / 3)
    rows = read_rows(result_file)
    os.kill(pid, signal.SIGKILL)
    return pid, rows


def trial_worker(study: Study) -> tuple[int, Path] | None:
    """(pid, working directory) of the study's one running trial: Tune starts a trial in a working directory of
    its own, <session>/artifacts/<time>/<stage>/working_dirs/<trial folder name>."""
    for pid in session_pids(study.sid):
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:  # ended meanwhile
            continue
        if cwd.parent.name == "working_dirs":
            return pid, cwd
    return None


def test_worker_killed_mid_epoch_resumes_from_checkpoint_exactly(tmp_path, reference):
    with Study(tmp_path, *LONG_EPOCHS, "--storage-path", str(tmp_path), "--name", "killed") as study:
        stage = tmp_path / "killed" / STAGE
        result_file = wait_for(lambda: next(stage.glob("*/result.json"), None), study, "a trial folder")
        pid, before = kill_worker_mid_epoch(study, result_file)
        code = study.wait()
    assert code == 0, study.output()[-3000:]
    (trial,) = trials(stage).values()
    rows = trial["rows"]
    assert_restarted_once(rows, pid, epochs=3)
    assert rows[:len(before)] == before  # what was stored before the kill stays as it was
    ref = reference.rows()
    assert (rows[-1][M.TEST_MSE], rows[-1][M.TRAIN_LOSS]) == (ref[-1][M.TEST_MSE], ref[-1][M.TRAIN_LOSS])
    assert_same_run(rows, ref)


def test_worker_killed_after_epoch_0_reports_each_epoch_once_and_counts_as_recovered(tmp_path):
    """Restarted from the checkpoint of epoch 0 (the untrained network), the trial stores every epoch once, Tune's
    step (TensorBoard's x axis) stays epoch + 1, and the report counts it done, recovered after one failure."""
    from analysis.load import open_study

    cmd = [*LONG_EPOCHS, "--epochs", "2"]
    with Study(tmp_path, *cmd, "--storage-path", str(tmp_path), "--name", "killed0") as study:
        stage = tmp_path / "killed0" / STAGE
        pid, working_dir = wait_for(lambda: trial_worker(study), study, "the trial's worker")
        # The rows as the driver writes them, before Tune lets the trial go on: the study folder gets them only
        # at Tune's next snapshot, which can come after the next epoch's checkpoint.
        staged = working_dir.parents[1] / "driver_artifacts" / working_dir.name / "result.json"

        def in_epoch_1():  # epoch 0 stored (its checkpoint with it), epoch 1's checkpoint not yet written
            rows = read_rows(staged)
            done_1 = (stage / working_dir.name / "checkpoint_000001").exists()
            return rows if rows and rows[-1][M.EPOCH] == 0 and not done_1 else None

        assert wait_for(in_epoch_1, study, f"epoch 0 alone in {staged}")[-1]["pid"] == pid
        os.kill(pid, signal.SIGKILL)
        code = study.wait()
    assert code == 0, study.output()[-3000:]
    (trial,) = trials(stage).values()
    rows = trial["rows"]
    assert assert_restarted_once(rows, pid, epochs=2) == 1
    assert [r["training_iteration"] for r in rows] == [r[M.EPOCH] + 1 for r in rows]
    progress = (trial["dir"] / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + len(rows)  # a header and each epoch once
    (stored,) = open_study(str(tmp_path / "killed0")).trials()
    assert stored.outcome == "done" and stored.recovered == "recovered after 1 failure"


# ---- the driver killed mid-study, then --resume ----------------------------------------------------------------

def saved_statuses(stage_dir: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest experiment snapshot: what Tuner.restore starts from. Tune writes it
    every few checkpoints, so a trial can report its last epoch a moment before its end is recorded here."""
    snapshots = sorted(stage_dir.glob("experiment_state-*.json"))  # named by start time: the newest sorts last
    try:
        state = json.loads(snapshots[-1].read_text()) if snapshots else {"trial_data": []}
    except json.JSONDecodeError:  # being rewritten; look again
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _meta in state["trial_data"])}


def newest_snapshot(stage_dir: Path) -> tuple[Path, str] | None:
    """Tune's newest experiment snapshot (what Tuner.restore starts from) and its text; None while being written."""
    snapshots = sorted(stage_dir.glob("experiment_state-*.json"))  # named by start time: the newest sorts last
    if not snapshots:
        return None
    text = snapshots[-1].read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return None
    return snapshots[-1], text


def snapshot_epochs(text: str) -> dict[str, int]:
    """Trial id -> the last epoch a snapshot recorded for the trial (-1: none yet)."""
    out = {}
    for data, meta in json.loads(text)["trial_data"]:
        epoch = (json.loads(meta).get("last_result") or {}).get(M.EPOCH)
        out[json.loads(data)["trial_id"]] = -1 if epoch is None else epoch
    return out


def assert_stored_once(before: list[dict], trial: dict, epochs: int) -> None:
    """After a resume a trial holds every epoch once, in result.json, progress.csv and TensorBoard: the rows up
    to the checkpoint it went on from as they were stored, the rest (including any stored after Tune's last
    experiment snapshot, which the resumed trial trained again) written once, by the resumed run."""
    after = trial["rows"]
    assert [r[M.EPOCH] for r in after] == list(range(epochs + 1)), "an epoch was lost or stored twice"
    kept = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    assert {r["pid"] for r in after[kept:]}.isdisjoint(r["pid"] for r in before), "stored before, not trimmed"
    assert after[-1][M.STATUS] == M.STATUS_DONE
    with (trial["dir"] / "progress.csv").open(newline="") as f:
        assert [int(r[M.EPOCH]) for r in csv.DictReader(f)] == list(range(epochs + 1))
    steps = stored_steps(trial["dir"])
    assert steps["test/mse"] == list(range(epochs + 1)) and steps["train/loss"] == list(range(1, epochs + 1))


def test_driver_killed_mid_study_then_resume_keeps_finished_trials(tmp_path):
    cmd = [*data_args(2000), *SWEEP, "--batch-sizes", "16", "64", "--runs", "3",
           "--storage-path", str(tmp_path), "--name", "study"]
    grid = sorted((b, r) for b in (16, 64) for r in range(3))
    stage = tmp_path / "study" / STAGE

    def some_finished_some_not():
        found, saved = trials(stage), saved_statuses(stage)
        done = [t for t in found.values() if finished(t) and saved.get(t["rows"][-1]["trial_id"]) == "TERMINATED"]
        return done and sum(finished(t) for t in found.values()) < len(grid)

    taken = {}

    def snapshot_with_a_finished_trial():
        found = some_finished_some_not() and newest_snapshot(stage)
        statuses = [json.loads(data)["status"] for data, _meta in json.loads(found[1])["trial_data"]] if found else []
        if len(statuses) == len(grid) and "TERMINATED" in statuses:
            taken["path"], taken["text"] = found
            taken["epochs"] = snapshot_epochs(found[1])
            # Its checkpoints as well: Tune keeps two per trial and may delete the one it names before the kill.
            taken["checkpoints"] = tmp_path / "checkpoints"
            for folder in stage.glob("*/checkpoint_*"):
                try:
                    shutil.copytree(folder, taken["checkpoints"] / folder.relative_to(stage))
                except (FileNotFoundError, shutil.Error):  # deleted while copied: not the snapshot's, as it is newer
                    pass
        return bool(taken)

    def stored_after_snapshot():  # trial folders holding an epoch the taken snapshot does not know of
        return [name for name, t in trials(stage).items()
                if t["rows"] and t["rows"][-1][M.EPOCH] > taken["epochs"].get(t["rows"][-1]["trial_id"], 3)]

    with Study(tmp_path, *cmd) as study:
        wait_for(snapshot_with_a_finished_trial, study, "a finished trial while others run")
        wait_for(stored_after_snapshot, study, "an epoch stored after that snapshot")
        study.kill()  # driver, GCS, raylet and workers at once; checks they are all gone
    # Where the kill lands between a stored epoch and Tune's next snapshot (timing the test cannot choose), the
    # resume starts from an older snapshot than the stored rows: that snapshot, put back, makes it so every time.
    taken["path"].write_text(taken["text"])
    for folder in taken["checkpoints"].glob("*/checkpoint_*"):
        if not (stage / folder.relative_to(taken["checkpoints"])).exists():
            shutil.copytree(folder, stage / folder.relative_to(taken["checkpoints"]))
    ahead = stored_after_snapshot()
    saved = saved_statuses(stage)
    before = trials(stage)
    kept = {name: (t["dir"] / "result.json").read_bytes() for name, t in before.items()
            if finished(t) and saved.get(t["rows"][-1]["trial_id"]) == "TERMINATED"}
    assert 0 < len(kept) < len(grid)

    code, out = run_study(tmp_path, *cmd, "--resume")
    assert code == 0, out[-3000:]
    assert "resuming" in out
    assert "took over the lease of" in out and "(exited)" in out  # the killed driver's, left in the folder
    assert not (tmp_path / "study" / M.LEASE_FILE).exists()  # given back at the end
    after = trials(stage)
    assert sorted((t["config"]["batch_size"], t["config"]["run"]) for t in after.values()) == grid  # none twice
    for name, stored in kept.items():
        assert (stage / name / "result.json").read_bytes() == stored, f"finished trial {name} was run again"
    for name, trial in after.items():
        assert_stored_once(before[name]["rows"] if name in before else [], trial, epochs=3)
    for name in ahead:  # the epochs stored after the snapshot were replaced by the resumed run's, not added to
        assert after[name]["rows"][:len(before[name]["rows"])] != before[name]["rows"], name


# ---- an existing study folder without --resume -----------------------------------------------------------------

def test_existing_study_without_resume_refuses_and_changes_nothing(tmp_path, reference):
    folder = reference.folder
    before = listing(folder)
    code, out = run_study(tmp_path, *LONG_EPOCHS, "--storage-path", str(folder.parent), "--name", folder.name)
    assert code == 2, out[-3000:]
    assert "already holds a study" in out and "--resume" in out
    assert listing(folder) == before


# ---- an errored trial: --resume keeps it, --resume --retry-errored completes it ---------------------------------

@pytest.fixture(scope="module")
def errored_study(tmp_path_factory) -> dict:
    """A two-trial study with --max-failures 0 whose run-0 worker is SIGKILLed mid-epoch: that trial errors, the
    other finishes, the study exits 1."""
    tmp = tmp_path_factory.mktemp("errored")
    cmd = [*ERRORED, "--storage-path", str(tmp), "--name", "study"]
    stage = tmp / "study" / STAGE

    def run0_result():
        found = [t for t in trials(stage).values() if t["config"]["run"] == 0]
        return found[0]["dir"] / "result.json" if found else None

    with Study(tmp, *cmd) as study:
        result_file = wait_for(run0_result, study, "the trial of run 0")
        pid, before = kill_worker_mid_epoch(study, result_file)
        code = study.wait()
    assert code == 1, study.output()[-3000:]  # the study reports its failed trial
    stored = {t["config"]["run"]: t for t in trials(stage).values()}
    rows = stored[0]["rows"]  # a result sent just before the kill may be stored after the look in `before`
    assert (stored[0]["dir"] / "error.txt").is_file() and rows[:len(before)] == before
    assert {r["pid"] for r in rows} == {pid} and rows[-1][M.EPOCH] < 3
    assert finished(stored[1]) and stored[1]["rows"][-1][M.EPOCH] == 3
    return {"folder": tmp / "study", "pid": pid, "before": rows,
            "dirs": {run: t["dir"].name for run, t in stored.items()},
            "files": {run: (t["dir"] / "result.json").read_bytes() for run, t in stored.items()},
            "saved": saved_statuses(stage).get(rows[-1]["trial_id"])}


def copy_of(errored_study: dict, tmp: Path) -> tuple[list[str], Path]:
    """A copy of the errored study to resume (each test resumes its own), and its command pointed at the copy."""
    shutil.copytree(errored_study["folder"], tmp / "study")
    return [*ERRORED, "--storage-path", str(tmp), "--name", "study"], tmp / "study" / STAGE


def test_resume_alone_leaves_an_errored_trial_errored(tmp_path, errored_study):
    cmd, stage = copy_of(errored_study, tmp_path)
    code, out = run_study(tmp_path, *cmd, "--resume")
    rerun = (stage / errored_study["dirs"][0] / "result.json").read_bytes() != errored_study["files"][0]
    # Tune may have saved the killed trial as RUNNING (TUNE_STALE_ERROR); the study's own record keeps it errored.
    assert code == 1, out[-3000:]  # still errored: a plain --resume does not retry it
    assert not rerun
    assert (stage / errored_study["dirs"][1] / "result.json").read_bytes() == errored_study["files"][1]


def test_retry_errored_completes_a_killed_trial_from_its_checkpoint(tmp_path, errored_study, reference):
    cmd, stage = copy_of(errored_study, tmp_path)
    code, out = run_study(tmp_path, *cmd, "--resume", "--retry-errored")
    assert code == 0, out[-3000:]
    before = errored_study["before"]
    rows = read_rows(stage / errored_study["dirs"][0] / "result.json")
    assert rows[:len(before)] == before
    assert assert_restarted_once(rows, errored_study["pid"], epochs=3) == before[-1][M.EPOCH] + 1
    assert_same_run(rows, reference.rows())  # run 0 of batch 16 is the reference trial (seed 16)
    assert (stage / errored_study["dirs"][1] / "result.json").read_bytes() == errored_study["files"][1]
