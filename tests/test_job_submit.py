"""docs/cluster.md's cluster path on one machine: a token-authenticated Ray head as cluster.yaml starts it, a worker
with a fake GPU, and the study submitted with that document's own `ray job submit` command.

`python -m pytest tests/test_job_submit.py -q` (2-3 min on two cores). The head declares 0 CPUs and serves
its dashboard and job server on 127.0.0.1; a second raylet joins it with 2 CPUs and 1 (fake) GPU. Every process
runs with RAY_AUTH_MODE=token and one token file (RAY_AUTH_TOKEN_PATH stands in for ~/.ray/auth_token, which
cluster.yaml copies to every node), and the CLI is shown to be refused without it. The smoke study is submitted
with `--no-wait`, followed with `ray job logs --follow`, must end SUCCEEDED with every trial complete on the
worker, and a second job with `--resume` continues the stored study without re-running a finished trial.
Every process started here is SIGKILLed by pid at the end (cluster_procs), pass or fail.
"""

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from cluster_procs import free_port, new_tag, running, stop_tagged, tagged_env, wait_for
from tensorboard_checks import stored_steps
from analysis.load import open_study
from study import metrics as M

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
# What docs/cluster.md submits, cut to two trials of two epochs on the synthetic digits.
EXCLUDES = ["results/", "report/", ".git/"]
STUDY = ["python", "-m", "study.mnist", "--smoke", "--lr", "1e-3", "--targets", "mean", "--batch-sizes", "64",
         "--runs", "2", "--address", "auto", "--gpus-per-trial", "0.5", "--cpus-per-trial", "1"]


class TokenCluster:
    """A head (0 CPUs, dashboard on 127.0.0.1) and one worker (2 CPUs, 1 fake GPU), token auth on."""

    def __init__(self, tmp: Path):
        self.tag = new_tag()
        token = tmp / "auth_token"
        token.write_text(uuid.uuid4().hex)
        self.env = tagged_env(self.tag, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                              RAY_USAGE_STATS_ENABLED="0")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Temp dirs of their own: the machine's /tmp/ray (its "latest session" links) belongs to other Rays. The
        # worker gets a second one, as a machine of its own would: nodes sharing one session folder share its
        # unpacked --working-dir, and the worker's cleanup then deletes the folder the job's driver runs in.
        self.temp_dirs = [tempfile.mkdtemp(prefix="rayjob", dir="/tmp") for _ in range(2)]

    def start(self) -> None:
        self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", "--num-cpus=0",
                 "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--temp-dir={self.temp_dirs[0]}", "--disable-usage-stats")
        self.ray("start", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                 "--num-gpus=1", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.temp_dirs[1]}",
                 "--disable-usage-stats")
        wait_for(lambda: len(self.nodes()) == 2, 120, "both nodes in `ray list nodes`", poll=2)

    def ray(self, *args: str, env: dict | None = None, check: bool = True, timeout: float = 300):
        done = subprocess.run([*RAY, *args], cwd=REPO, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def nodes(self) -> list[dict]:
        done = self.ray("list", "nodes", f"--address={self.dashboard}", "--format=json", check=False)
        if done.returncode != 0:
            return []
        return [n for n in json.loads(done.stdout) if n["state"] == "ALIVE"]

    def submit(self, *argv: str) -> str:
        """docs/cluster.md's `ray job submit ... --no-wait -- ...`; returns the submission id it printed."""
        done = self.ray("job", "submit", f"--address={self.dashboard}", "--working-dir", ".",
                        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait", "--", *argv)
        return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)

    def follow(self, job_id: str) -> tuple[str, str]:
        """`ray job logs --follow` until the job ends, then its end status from `ray job status`."""
        logs = self.ray("job", "logs", f"--address={self.dashboard}", "--follow", job_id).stdout
        done = self.ray("job", "status", f"--address={self.dashboard}", job_id)
        status = re.search(r"Job '\w+' (?:was )?(succeeded|failed|stopped)", done.stdout + done.stderr)
        assert status, f"no end status:\n{done.stdout}\n{done.stderr}\n{logs[-3000:]}"
        return logs, status.group(1).upper()

    def stop(self) -> list[int]:
        left = stop_tagged(self.tag)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(TokenCluster(tmp_path_factory.mktemp("token"))) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def first_job(cluster, store):
    job_id = cluster.submit(*STUDY, "--storage-path", str(store), "--name", "job")
    logs, status = cluster.follow(job_id)
    return logs, status, trials(store / "job" / "batch_sweep")


def trials(stage: Path) -> dict[str, list[dict]]:
    return {f.parent.name: [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(stage.glob("*/result.json"))}


def stored_epochs(stage: Path) -> list[int]:
    """Rows stored per trial so far, read while the driver writes (a line being written is not counted)."""
    counts = []
    for f in sorted(stage.glob("*/result.json")):
        counts.append(sum(line.endswith("}") for line in f.read_text().splitlines()))
    return counts


def test_the_job_cli_is_refused_without_the_token(cluster):
    done = cluster.ray("job", "list", f"--address={cluster.dashboard}", check=False,
                       env={**cluster.env, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode != 0
    assert "token" in (done.stdout + done.stderr).lower()


def test_the_submitted_study_succeeds_with_every_trial_on_the_worker(cluster, first_job, store):
    assert f"--runtime-env-json '{json.dumps({'excludes': EXCLUDES})}'" in (REPO / "docs" / "cluster.md").read_text()
    logs, status, rows = first_job
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"results: {store / 'job'}" in logs
    assert (store / "job" / "study.json").is_file()
    nodes = cluster.nodes()
    (worker,) = [n["node_id"] for n in nodes if not n["is_head_node"]]
    assert len(rows) == 2, sorted(rows)
    for name, trial in rows.items():
        assert [r[M.EPOCH] for r in trial] == [0, 1, 2], name
        assert trial[-1][M.STATUS] == M.STATUS_DONE, name
        assert {r[M.NODE_ID] for r in trial} == {worker}, name  # the head declares 0 CPUs: nothing runs there
        assert {r[M.GPU_SHARE] for r in trial} == {0.5}, name
        assert sorted((store / "job" / "batch_sweep" / name).glob("checkpoint_*")), name


def test_a_second_job_resumes_the_stored_study(cluster, first_job, store):
    _, status, before = first_job
    assert status == "SUCCEEDED"
    job_id = cluster.submit(*STUDY, "--storage-path", str(store), "--name", "job", "--resume")
    logs, status = cluster.follow(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"resuming {store / 'job' / 'batch_sweep'}" in logs
    assert trials(store / "job" / "batch_sweep") == before  # finished trials are kept, not run again


def test_a_job_stopped_mid_study_is_continued_by_a_second_job(cluster, store):
    """The driver's job stopped mid-run (`ray job stop`, as a lost laptop session or a cancelled job would), then
    the same command with --resume as a second job: finished rows kept, unfinished trials go on from a
    checkpoint to the end, none restarted from scratch."""
    # Long enough (0.3-0.5 s an epoch at batch 16) to stop the job while both trials run: the stop lands a few
    # epochs after both are past epoch 4. Each epoch more is one the second job trains after it.
    epochs = 30
    argv = [*STUDY, "--batch-sizes", "16", "--epochs", str(epochs), "--storage-path", str(store), "--name", "stopped"]
    stage = store / "stopped" / "batch_sweep"
    job_id = cluster.submit(*argv)
    wait_for(lambda: len(rows := stored_epochs(stage)) == 2 and min(rows) >= 5, 240, "both trials past epoch 4",
             poll=0.2)
    cluster.ray("job", "stop", f"--address={cluster.dashboard}", job_id)
    _, status = cluster.follow(job_id)
    assert status == "STOPPED"
    # The stopped driver still stores what its trials last reported as it shuts down: read once that has settled.
    settled = []
    wait_for(lambda: settled.append(stored_epochs(stage)) or settled[-3:] == [settled[-1]] * 3, 60,
             "the stopped driver's last rows", poll=1)
    before = trials(stage)
    unfinished = [name for name, rows in before.items() if rows[-1][M.STATUS] != M.STATUS_DONE]
    assert unfinished, "both trials finished before the job was stopped: the test needs more epochs"

    logs, status = cluster.follow(cluster.submit(*argv, "--resume"))
    assert status == "SUCCEEDED", logs[-3000:]
    after = trials(stage)
    assert sorted(after) == sorted(before)
    for name, rows in after.items():
        kept = before[name]
        assert [r[M.EPOCH] for r in rows] == list(range(epochs + 1)), name  # every epoch, once
        assert rows[-1][M.STATUS] == M.STATUS_DONE, name
        # What was stored stays up to the checkpoint the trial went on from; epochs trained after the last checkpoint
        # Tune's snapshot knew of were stored once more by the stopped driver and are replaced by the resumed run.
        same = next((i for i, (a, b) in enumerate(zip(kept, rows)) if a != b), min(len(kept), len(rows)))
        assert {r["pid"] for r in rows[same:]}.isdisjoint(r["pid"] for r in kept), name
        if name in unfinished:  # on from a checkpoint, never from scratch
            assert 0 < same < len(rows), (name, same)
        with (stage / name / "progress.csv").open(newline="") as f:
            assert [int(r[M.EPOCH]) for r in csv.DictReader(f)] == list(range(epochs + 1)), name
        assert stored_steps(stage / name)["test/mse"] == list(range(epochs + 1)), name
    # The report reads each epoch once.
    for trial in open_study(str(store / "stopped")).trials("batch_sweep"):
        assert [r[M.EPOCH] for r in trial.rows] == list(range(epochs + 1)), trial.dirname
        assert trial.outcome == "done"
