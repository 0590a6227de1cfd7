"""Shared fixtures: the real MNIST files when present, a small local Ray, a TensorBoard server, the MNIST smoke
study (run once per session, read by several modules)."""

import os
from pathlib import Path

import pytest

from cluster_procs import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
SHARED_KAGGLE = REPO.parent / "shared" / "data" / "pcam-kaggle-sample"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray for one test module, shut down after it so the next module starts clean."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def result_recorder():
    """The class of a Tune callback of a user's own (study.run_study's callbacks=) that keeps every result Tune
    gives it."""
    from ray import tune

    class Recorder(tune.Callback):
        def __init__(self):
            self.results = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results.append(dict(result))

    return Recorder


@pytest.fixture(scope="session")
def mnist_smoke(tmp_path_factory):
    """(study folder, stdout) of `python -m study.mnist --smoke`, as a user runs it, in its own process with a Ray
    of its own (RAY_ADDRESS=local: never another Ray running on this machine; "local" counts as an address, hence
    no GPU share to wait for). Run once per session: tests only READ it; one that changes a study copies it first."""
    import subprocess
    import sys

    store = tmp_path_factory.mktemp("mnist-smoke")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="local")
    done = subprocess.run([sys.executable, "-m", "study.mnist", "--smoke", "--storage-path", str(store), "--name",
                           "smoke", "--num-cpus", "2", "--gpus-per-trial", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return store / "smoke", done.stdout


@pytest.fixture
def mnist_dir():
    if not SHARED_MNIST.is_dir():
        pytest.skip("../shared/data/mnist is absent (a user's clone has no shared data)")
    return SHARED_MNIST


@pytest.fixture
def tensorboard_api():
    """start(logdir) runs a real TensorBoard on 127.0.0.1 at a free port and returns api(path, body=None) -> the
    JSON of one data API call (POST when body is given). Every server started is stopped by its pid."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    servers = []

    def start(logdir):
        port = free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                         "--host", "127.0.0.1", "--port", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def api(path, body=None):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        deadline = time.monotonic() + 60
        while True:
            try:
                api("/data/runs")
                return api
            except OSError:
                if time.monotonic() > deadline or servers[-1].poll() is not None:
                    raise
                time.sleep(0.5)

    yield start
    for server in servers:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
