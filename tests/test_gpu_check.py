"""benchmarks/gpu_check.py --dry-run: every part of the device check runs tiny on CPU, writes its log and a summary
whose figures were parsed from the benchmarks' own output (so a changed output line breaks this, not the GPU run).
The dry run is also the CPU test of the benchmarks it runs (mnist_trial, tf32_effect, tune_packing, pcam_train,
checkpoint_cost): their output lines are checked in its log; tests/test_benchmarks.py has the others."""

import argparse
import io
import json
import os
import re
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
    assert parts["pcam"]["figures"]["ratio_2"] > 0
    assert parts["checkpoint"]["figures"]["sgd"]["mb"] > 100  # VGG16 + momentum + best weights
    log = (out / "gpu_check.log").read_text()
    assert all(f"=== {name}" in log for name in parts)
    # mnist_trial: both ways ran, from the same initial weights
    assert re.search(r"ratio \(classic / project\) at batch 64: \d+\.\d+x", log)
    assert "same initial weights in both ways: yes" in log
    # pcam_train: both ways alone and packed, a rate per process, and the memory run at its own batch
    for packed in (1, 2):
        line = re.search(rf"{packed} trial\(s\) at once: project +([\d.]+) images/s \(([\d., ]+)\) \| baseline .* "
                         rf"([\d.]+) images/s \(([\d., ]+)\) \| ratio (\d+\.\d+)x", log)
        assert line, log[-4000:]
        assert len(line.group(2).split(",")) == packed and len(line.group(4).split(",")) == packed
        assert float(line.group(1)) > 0 and float(line.group(3)) > 0
    assert "peak GPU memory at batch 4: not measured on cpu" in log


def test_refuses_a_folder_that_holds_an_earlier_check(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "is not empty" in done.stderr
    assert (tmp_path / "summary.json").read_text() == "{}"


def real_parts(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    args = argparse.Namespace(dry_run=False, mnist_dir=tmp_path, wheels=str(tmp_path), site=str(tmp_path / "site"))
    return gpu_check, {p["name"]: p for p in gpu_check.parts(args)}


def test_a_real_runs_caps_fit_one_device_call_and_its_tests_cover_every_cuda_file(tmp_path):
    gpu_check, parts = real_parts(tmp_path)
    assert sum(p["cap"] for p in parts.values()) <= gpu_check.CAPS_TOTAL_S <= 600
    cmd = " ".join(parts["cuda_tests"]["cmd"])
    assert all(name in cmd for name in ("test_cuda.py", "test_augment.py", "test_noise.py")) and "-m cuda" in cmd


@pytest.mark.parametrize("output, status", [("12 passed, 39 deselected in 9.1s", "ok"),
                                            ("12 skipped, 39 deselected in 2.0s", "failed"),  # no GPU seen
                                            ("11 passed, 1 skipped, 39 deselected in 9.0s", "failed"),
                                            ("39 deselected in 1.0s", "failed")])  # nothing selected
def test_a_real_runs_cuda_tests_pass_only_when_every_selected_test_passed(tmp_path, output, status):
    gpu_check, parts = real_parts(tmp_path)
    part = {**parts["cuda_tests"], "cmd": [sys.executable, "-c", f"print({output!r})"]}  # pytest's last line
    result = gpu_check.run_part(part, dict(os.environ), io.StringIO())
    assert result["status"] == status, result
