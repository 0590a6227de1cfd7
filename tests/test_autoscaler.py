"""An autoscaling cluster with cluster.yaml's node types, on one machine: Ray's fake multi-node provider.

`python -m pytest tests/test_autoscaler.py -q` (about 3 min on two cores). The head starts with the autoscaler
(`--autoscaling-config`, `RAY_FAKE_CLUSTER=1`) and a config whose node types are cluster.yaml's own: the head with
0 CPUs, the GPU worker types with their CPUs and GPUs (fake: no CUDA is needed, Ray still hands out GPU ids), all
from `min_workers: 0`. Instead of EC2 instances the provider starts raylets on this machine. The MNIST study starts
with no worker up; the autoscaler adds workers for its waiting trials; mid-study the node of a running trial is
killed, as a spot reclaim would, and that trial continues from its checkpoint on another node. A
--cpus-per-trial that no node type has ends the study with one line before any trial. Every process started
here, the autoscaler's raylets included, is SIGKILLed by pid at the end (cluster_procs).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster_procs import free_port, new_tag, running, stop_tagged, tagged_env, tagged_pids, wait_for
from study import metrics as M

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
FAKE_HEAD_TYPE = "ray.head.default"  # the name Ray's fake provider gives the head it runs in
FAKE_WORKER_CAP = 2  # per type: each fake node is a raylet on this 2-core machine
OBJECT_STORE = 80 * 2**20  # bytes per fake node; Ray would take 30 % of the machine's memory for each
# Long enough epochs (batch 16 on 6000 synthetic digits, a few seconds each) to kill a node inside a trial.
EPOCHS = 3  # a kill after epoch 1 still leaves an epoch or two to continue on another node
STUDY = ["--smoke", "--val-size", str(6000 - 512), "--lr", "1e-3", "--targets", "mean", "--batch-sizes", "16",
         "--runs", "2", "--epochs", str(EPOCHS), "--cpus-per-trial", "1", "--max-failures", "3"]


def fake_config(gcs_address: str) -> dict:
    """cluster.yaml with its provider swapped for Ray's fake multi-node one; node types, resources and limits are
    cluster.yaml's (worker counts capped for this machine), everything AWS-specific is dropped."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = {FAKE_HEAD_TYPE: {"resources": real["available_node_types"][real["head_node_type"]]["resources"],
                              "node_config": {}, "max_workers": 0}}
    for name, node in real["available_node_types"].items():
        if name != real["head_node_type"]:
            types[name] = {"resources": {**node["resources"], "object_store_memory": OBJECT_STORE},
                           "node_config": {}, "min_workers": node["min_workers"],
                           "max_workers": min(node["max_workers"], FAKE_WORKER_CAP)}
    return {
        "cluster_name": "fake-" + real["cluster_name"],
        "max_workers": real["max_workers"],
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": real["idle_timeout_minutes"],
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {},
        "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    def __init__(self, tmp: Path):
        self.tag, self.port = new_tag(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = fake_config(self.address)
        self.config_file = tmp / "fake-cluster.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        # Fake nodes declare many CPUs (gpu-4x: 48): no worker processes are started ahead of demand.
        self.env = tagged_env(self.tag, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                              RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0",
                              RAY_USAGE_STATS_ENABLED="0")
        self.temp_dir = tempfile.mkdtemp(prefix="rayauto", dir="/tmp")

    def start(self) -> None:
        head = self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        subprocess.run([*RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                        f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
                        f"--autoscaling-config={self.config_file}", "--include-dashboard=false",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={self.temp_dir}",
                        "--disable-usage-stats"], env=self.env, check=True, capture_output=True, timeout=120)

    def node_pids(self, node_id: str) -> list[int]:
        """The processes of one fake node: its raylet and everything under it carry its node id."""
        needle, pids = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode(), []
        for pid in tagged_pids(self.tag):
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    pids.append(pid)
            except OSError:  # ended meanwhile
                pass
        return pids

    def study(self, tmp: Path, *argv: str) -> tuple[subprocess.Popen, Path]:
        """`python -m study.mnist` joined to this cluster, as a user on the head runs it; output to a log."""
        log = tmp / f"study-{new_tag()}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "study.mnist", *STUDY, "--address", self.address, *argv],
                                    cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return proc, log

    def stop(self) -> list[int]:
        left = stop_tagged(self.tag)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


FAKE_NODE_ID = re.compile(r"^f{51}\d{5}$")  # the ids Ray's fake provider gives the nodes it starts


def rows(stage: Path) -> dict[str, list[dict]]:
    return {f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(stage.glob("*/result.json"))}


def running_trial_past_epoch_0(stage: Path):
    """(trial, node id, epoch) of a trial that has reported epoch 1 or later and is not done, or None."""
    for name, trial in rows(stage).items():
        if trial and trial[-1][M.EPOCH] >= 1 and trial[-1][M.STATUS] != M.STATUS_DONE:
            return name, trial[-1][M.NODE_ID], trial[-1][M.EPOCH]
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(FakeCluster(tmp_path_factory.mktemp("fake"))) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sweep(cluster, tmp_path_factory):
    """The study from no worker up; once a trial has an epoch behind it, the node it runs on is killed."""
    tmp = tmp_path_factory.mktemp("sweep")
    stage = tmp / "results" / "auto" / "batch_sweep"
    proc, log = cluster.study(tmp, "--gpus-per-trial", "1", "--storage-path", str(tmp / "results"), "--name", "auto")
    try:
        victim = wait_for(lambda: running_trial_past_epoch_0(stage) or proc.poll() is not None, 400,
                          "a trial past its first epoch")
        assert victim is not True, f"the study ended before a node could be killed:\n{log.read_text()[-3000:]}"
        name, node, epoch = victim
        pids = cluster.node_pids(node)
        assert pids, f"no process of node {node} found"
        for pid in pids:  # a spot reclaim: the machine is gone at once, nothing shuts down cleanly
            os.kill(pid, signal.SIGKILL)
        code = proc.wait(600)
    finally:
        proc.kill()
        proc.wait(30)
    return {"code": code, "log": log.read_text(errors="replace"), "trials": rows(stage), "victim": name,
            "node": node, "epoch": epoch}


def test_the_autoscaler_starts_workers_for_a_study_that_found_none(sweep):
    assert sweep["code"] == 0, sweep["log"][-3000:]
    assert "trials wait for the autoscaler to start a" in sweep["log"]  # no node was up to hold a trial
    assert len(sweep["trials"]) == 2
    nodes = {r[M.NODE_ID] for trial in sweep["trials"].values() for r in trial}
    assert all(FAKE_NODE_ID.match(n) for n in nodes), nodes  # every epoch ran on a worker the autoscaler added
    assert len(nodes) >= 2, nodes  # at least the killed one and its replacement
    for name, trial in sweep["trials"].items():
        assert trial[-1][M.STATUS] == M.STATUS_DONE, name
        assert {r[M.GPU_SHARE] for r in trial} == {1.0}, name


def test_a_reclaimed_nodes_trial_continues_from_its_checkpoint_on_another_node(sweep):
    trial = sweep["trials"][sweep["victim"]]
    assert [r[M.EPOCH] for r in trial] == list(range(EPOCHS + 1))  # no epoch missing or repeated
    nodes = [r[M.NODE_ID] for r in trial]
    before = nodes.index(next(n for n in nodes if n != sweep["node"]))  # first epoch after the kill
    assert set(nodes[:before]) == {sweep["node"]} and before > sweep["epoch"], nodes
    assert sweep["node"] not in nodes[before:], nodes
    assert len(set(nodes[before:])) == 1, nodes  # one restart, then on one node to the end


def test_a_trial_no_node_type_can_hold_ends_the_study_with_one_line(cluster, tmp_path):
    # 64 CPUs: more than any node type offers (gpu-4x: 48). GPUs above 1 per trial are refused before Ray starts.
    proc, log = cluster.study(tmp_path, "--gpus-per-trial", "1", "--cpus-per-trial", "64", "--storage-path",
                              str(tmp_path / "results"), "--name", "never")
    try:
        code = proc.wait(300)
    finally:
        proc.kill()
        proc.wait(30)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, log.read_text()[-3000:]
    largest = max(t["resources"].get("CPU", 0) for t in cluster.config["available_node_types"].values())
    assert "--cpus-per-trial 64:" in errors[0] and f"{largest} CPUs" in errors[0], errors
    assert not (tmp_path / "results" / "never").exists()
