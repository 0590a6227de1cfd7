"""benchmarks/gpu_check.py --dry-run: every part of the device check runs tiny on CPU, writes its log and a summary
whose figures were parsed from the benchmarks' own output (so a changed output line breaks this, not the GPU run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_summarises_it(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                           "--mnist-dir", str(tmp_path / "no-mnist")], capture_output=True, text=True, timeout=1500,
                          cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert done.returncode == 0, done.stdout + done.stderr + (out / "gpu_check.log").read_text()[-4000:]
    assert list(parts) == ["install", "versions", "cuda_tests", "mnist", "tf32", "packing", "pcam",
                           "checkpoint"]
    assert parts["install"]["status"] == "skipped"
    assert all(p["status"] == "ok" for name, p in parts.items() if name != "install")
    assert parts["versions"]["figures"]["torch"] and parts["versions"]["figures"]["ray"]
    assert parts["cuda_tests"]["figures"].get("skipped", 0) >= 1  # no GPU here: every cuda test skips
    assert parts["mnist"]["figures"]["mnist_ratio"] > 0
    assert parts["tf32"]["figures"]["mse_change_percent"] == 0  # CPU: no TF32, the same run twice
    assert parts["packing"]["figures"]["packed_over_alone"] > 0
    assert parts["pcam"]["figures"]["ratio_1"] > 0 and parts["pcam"]["figures"]["gflop_per_image"] > 1
    assert parts["checkpoint"]["figures"]["sgd"]["mb"] > 100  # VGG16 + momentum + best weights
    log = (out / "gpu_check.log").read_text()
    assert all(f"=== {name}" in log for name in parts)


def test_refuses_a_folder_that_holds_an_earlier_check(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "is not empty" in done.stderr
    assert (tmp_path / "summary.json").read_text() == "{}"
