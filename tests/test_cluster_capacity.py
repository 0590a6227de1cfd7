"""study.commands.cluster: a trial runs now, waits for a node type the autoscaler can start, or is refused in one line.

`python -m pytest tests/test_cluster_capacity.py -q` (seconds, no Ray). The node types are cluster.yaml's own;
the end-to-end check with a real autoscaler is tests/test_autoscaler.py.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_procs import free_port
from study.commands import cluster

REPO = Path(__file__).resolve().parents[1]
TYPES = cluster._types_from_file(REPO / "cluster.yaml")


def node(cpus, gpus, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_cluster_yaml_types_are_read_with_their_resources():
    assert TYPES["head"] == {"resources": {"CPU": 0}, "max_workers": 0}
    assert TYPES["gpu-1x"]["resources"] == {"CPU": 4, "GPU": 1}
    assert TYPES["gpu-4x"]["resources"] == {"CPU": 48, "GPU": 4}


@pytest.mark.parametrize("cpus, gpus, nodes, expected", [
    (1, 1, [node(0, 0), node(4, 1)], "now"),  # a node up now holds it
    (1, 1, [node(0, 0)], "gpu-1x"),  # no worker up: the first worker type that holds it
    (4, 2, [node(0, 0), node(4, 1)], "gpu-4x"),  # up now: 1 GPU; gpu-4x has 4
    (8, 1, [node(0, 0)], "gpu-4x"),  # gpu-1x has the GPU but only 4 CPUs
    (1, 1, [node(0, 0), node(4, 1, alive=False)], "gpu-1x"),  # a dead node holds nothing
])
def test_a_trial_runs_now_or_waits_for_a_type_that_can_hold_it(cpus, gpus, nodes, expected):
    assert cluster.trial_placement(cpus, gpus, nodes, TYPES) == expected


@pytest.mark.parametrize("cpus, gpus", [(1, 8), (64, 1), (49, 4)])
def test_a_trial_no_type_can_hold_is_refused_naming_the_offer(cpus, gpus):
    with pytest.raises(ValueError) as err:
        cluster.trial_placement(cpus, gpus, [node(0, 0), node(4, 1)], TYPES)
    line = str(err.value)
    assert "\n" not in line and f"--gpus-per-trial {gpus} --cpus-per-trial {cpus}:" in line
    assert "gpu-1x: 4 CPUs, 1 GPUs" in line and "gpu-4x: 48 CPUs, 4 GPUs" in line and "head: 0 CPUs, 0 GPUs" in line


def test_unknown_types_refuse_nothing_and_types_of_unknown_size_may_hold_anything():
    assert cluster.trial_placement(1, 8, [node(0, 0)], None) is None
    assert cluster.trial_placement(1, 8, [node(0, 0)], {"any": {"resources": None, "max_workers": 2}}) == "any"
    with pytest.raises(ValueError):  # a type that may never be started holds nothing
        cluster.trial_placement(1, 1, [node(0, 0)], {"off": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 0}})


def test_the_autoscaler_config_is_found_from_its_process(tmp_path):
    port = free_port()
    config = tmp_path / "bootstrap.yaml"
    config.write_text((REPO / "cluster.yaml").read_text())
    # A process whose command line is the autoscaler's, as `ray start --head --autoscaling-config` starts it.
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             f"/x/ray/{cluster.MONITOR}", f"--gcs-address=127.0.0.1:{port}",
                             f"--autoscaling-config={config}"])
    try:
        # Until the child has exec'd, /proc shows the parent's command line: wait for it (a loaded machine is slow).
        deadline = time.monotonic() + 30
        while cluster.MONITOR not in Path(f"/proc/{fake.pid}/cmdline").read_bytes().decode(errors="replace"):
            assert time.monotonic() < deadline, "the stand-in autoscaler process never started"
            time.sleep(0.05)
        assert cluster.autoscaling_config_path(f"10.0.0.1:{port}") == config
        assert cluster.autoscaling_config_path(f"127.0.0.1:{free_port()}") is None
        assert cluster._types_from_file(cluster.autoscaling_config_path(f"127.0.0.1:{port}")) == TYPES
    finally:
        fake.kill()
        fake.wait(30)
