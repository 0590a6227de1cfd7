"""Multi-node Ray: a real two-node cluster on this machine runs the MNIST study through its CLI (`--address`).

`ray.cluster_utils.Cluster` starts a head and a second node, separate raylets in this process tree, each declaring
one GPU and four CPUs; no real GPU is needed (the trials train on CPU, Ray still hands out GPU ids and shares). Both
nodes share one IP, so trials are told apart by the Ray node id every report carries (metrics.NODE_ID).
Everything is checked from what the study stored: result.json rows, params.json, checkpoints and Tune's
experiment_state records. Run: `python -m pytest tests/test_multinode.py -q` (about 90 s on two cores).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from study import metrics as M

pytestmark = pytest.mark.slow

GPU_SHARE = 0.25  # four trials fit on each node's one GPU
NODE = dict(num_cpus=4, num_gpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
# 4 CPUs at 0.5 per trial would fit 8 trials on a node: the GPU share, not the CPUs, is what limits a node to 4.
STUDY = ["--smoke", "--lr", "1e-3", "--epochs", "2", "--gpus-per-trial", str(GPU_SHARE), "--cpus-per-trial", "0.5"]
BATCH_SIZES, RUNS, TARGETS = (16, 32), 4, 2  # the smoke study's two targets: 16 trials for 8 places at once


@pytest.fixture(scope="module")
def cluster():
    """A head node plus a second node; every Ray process of both is killed afterwards, whatever the tests did."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a Ray left initialised in this process by another test module would be joined instead
    cluster = Cluster()
    try:
        for _ in range(2):
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def run_study(cluster, storage: str, name: str, batch_sizes, runs: int) -> str:
    """`python -m study.mnist` in its own process, as a user runs it against the cluster; returns its output."""
    argv = [sys.executable, "-m", "study.mnist", *STUDY, "--batch-sizes", *map(str, batch_sizes), "--runs", str(runs),
            "--address", cluster.address, "--storage-path", storage, "--name", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def stored_trials(stage_dir: Path) -> list[dict]:
    """Every trial of a stored Tune experiment: Tune's own record of it (experiment_state: status, start_time, last
    result), its folder, its params and its result rows."""
    (state_file,) = stage_dir.glob("experiment_state-*.json")
    out = []
    for trial_json, run_json in json.loads(state_file.read_text())["trial_data"]:
        trial, run = json.loads(trial_json), json.loads(run_json)
        folder = stage_dir / trial["relative_logdir"]
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        out.append({"id": trial["trial_id"], "status": trial["status"], "start_time": run["start_time"],
                    "error": run["error_filename"], "last_result": run["last_result"], "dir": folder,
                    "config": json.loads((folder / "params.json").read_text()), "rows": rows})
    return out


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant; intervals that only touch do not overlap."""
    events = sorted([(start, 1) for start, end in intervals if end > start] +
                    [(end, -1) for start, end in intervals if end > start])  # at equal times, -1 sorts first
    peak = open_now = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


@pytest.fixture(scope="module")
def sweep(cluster, tmp_path_factory):
    """The study on a plain folder, the storage both nodes share here."""
    store = tmp_path_factory.mktemp("shared")
    run_study(cluster, str(store), "mn", BATCH_SIZES, RUNS)
    return stored_trials(store / "mn" / "batch_sweep")


def node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.list_all_nodes()}


def test_every_result_reached_shared_storage(sweep):
    assert len(sweep) == TARGETS * len(BATCH_SIZES) * RUNS
    assert {(t["config"]["target"], t["config"]["batch_size"], t["config"]["run"]) for t in sweep} == {
        (target, b, r) for target in ("mean", "std") for b in BATCH_SIZES for r in range(RUNS)}
    for trial in sweep:
        assert trial["status"] == "TERMINATED" and trial["error"] is None, trial["dir"]
        assert [r[M.EPOCH] for r in trial["rows"]] == [0, 1, 2], trial["dir"]
        assert trial["rows"][-1][M.STATUS] == M.STATUS_DONE
        assert trial["rows"][-1][M.TEST_MSE] == trial["last_result"][M.TEST_MSE]  # Tune's record agrees
        checkpoints = sorted(trial["dir"].glob("checkpoint_*"))
        assert checkpoints and (checkpoints[-1] / M.STATE_FILE).is_file(), trial["dir"]


def test_trials_ran_on_both_nodes(cluster, sweep):
    for trial in sweep:
        assert len({r[M.NODE_ID] for r in trial["rows"]}) == 1, f"{trial['dir']} moved between nodes"
    assert {t["rows"][0][M.NODE_ID] for t in sweep} == node_ids(cluster)
    # A worker process lives on one node: the same pid under two node ids would mean the node id is not genuine.
    by_pid = {}
    for trial in sweep:
        by_pid.setdefault(trial["rows"][0]["pid"], set()).add(trial["rows"][0][M.NODE_ID])
    assert all(len(nodes) == 1 for nodes in by_pid.values()), by_pid


def test_every_trial_had_a_quarter_of_one_gpu(sweep):
    for trial in sweep:
        for row in trial["rows"]:
            assert row[M.GPU_SHARE] == GPU_SHARE, trial["dir"]
            assert len(row[M.GPU_IDS].split(",")) == 1 and row[M.GPU_IDS] != "", trial["dir"]
            assert row[M.CUDA_VISIBLE] == row[M.GPU_IDS], trial["dir"]  # the process sees its GPU and no other
        assert len({r[M.GPU_IDS] for r in trial["rows"]}) == 1, trial["dir"]


def test_no_gpu_ever_held_more_than_four_trials(sweep):
    # A trial holds its GPU share from the moment Ray grants its actor the resources until Tune stops it after the
    # last report. Inside that span, and so never inventing an overlap, lies [start, end]:
    #   start: Tune's start_time (experiment_state, float seconds), set once the trial's actor has started or been
    #          reused, i.e. after its resources were granted;
    #   end:   the last row's timestamp: the time of the last report, floored to a whole second by Tune, so no
    #          later than the report itself, which comes before the share is released.
    # Every overlap among these intervals really happened, so more than 1 / GPU_SHARE open at once is a GPU that
    # was given out more than whole. The same host and clock serve driver and trials, so the two times compare.
    per_gpu = {}
    for trial in sweep:
        assert trial["start_time"] is not None, trial["dir"]
        gpu = (trial["rows"][0][M.NODE_ID], trial["rows"][0][M.GPU_IDS])
        per_gpu.setdefault(gpu, []).append((trial["start_time"], trial["rows"][-1]["timestamp"]))
    assert len(per_gpu) == 2, per_gpu.keys()  # one GPU on each node
    peaks = {gpu: peak_concurrency(intervals) for gpu, intervals in per_gpu.items()}
    assert max(peaks.values()) <= round(1 / GPU_SHARE), peaks
    assert max(peaks.values()) >= 2, peaks  # trials did share a GPU, so the bound above was really tested


def test_storage_uri_reaches_every_node(cluster, tmp_path):
    uri = tmp_path.resolve().as_uri()  # file:///..., which pyarrow and Tune read as a filesystem URI
    assert uri.startswith("file:///")
    out = run_study(cluster, uri, "mn-uri", [16], 1)
    assert f"{uri}/mn-uri" in out
    assert (tmp_path / "mn-uri" / "study.json").is_file()
    trials = stored_trials(tmp_path / "mn-uri" / "batch_sweep")
    assert len(trials) == TARGETS
    for trial in trials:
        assert trial["status"] == "TERMINATED" and [r[M.EPOCH] for r in trial["rows"]] == [0, 1, 2]
        assert trial["rows"][0][M.NODE_ID] in node_ids(cluster)
        assert (sorted(trial["dir"].glob("checkpoint_*"))[-1] / M.STATE_FILE).is_file()
