"""The benchmarks run: tiny CPU runs that check each prints its figures (never their values: timing belongs in
the benchmarks, not in tests). The CUDA figures they exist for can only be taken on a GPU machine."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow  # a benchmark subprocess: minutes on 2 shared cores
def test_mnist_trial_prints_both_ways_and_the_ratio():
    out = run("mnist_trial.py", "--train-limit", "512", "--epochs", "1", "--batch-size", "64", timeout=180)
    assert re.search(r"ratio \(classic / project\) at batch 64: \d+\.\d+x", out)
    assert "same initial weights in both ways: yes" in out


@pytest.mark.slow
def test_pcam_pipeline_prints_both_rates_and_the_ratio():
    out = run("pcam_pipeline.py", "--n", "256", "--batches", "3", "--seconds", "0", "--rounds", "1", timeout=180)
    assert re.search(r"round 1: project +\d+ images/s .* baseline +\d+ images/s .* ratio \d+\.\d+x", out)
    assert re.search(r"ratio project / baseline: \d+\.\d+x", out)


@pytest.mark.slow
def test_pcam_train_runs_both_ways_alone_and_packed():
    out = run("pcam_train.py", "--device", "cpu", "--n", "32", "--eval-n", "4", "--batch-size", "16", "--epochs", "1",
              "--packed", "1", "2", "--memory-batch", "32", timeout=600)
    for packed in (1, 2):
        line = re.search(rf"{packed} trial\(s\) at once: project +(\d+) images/s \(([\d, ]+)\) \| baseline .* "
                         rf"(\d+) images/s \(([\d, ]+)\) \| ratio (\d+\.\d+)x", out)
        assert line, out
        assert len(line.group(2).split(",")) == packed and len(line.group(4).split(",")) == packed
        assert int(line.group(1)) > 0 and int(line.group(3)) > 0
    assert "peak GPU memory at batch 32: not measured on cpu" in out


def test_pcam_train_refuses_bad_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pcam_train.py"), "--packed", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--packed must be at least 1" in done.stderr


@pytest.mark.slow
def test_noise_cost_prints_both_steps_and_the_overhead_per_batch_size():
    out = run("noise_cost.py", "--rounds", "1", "--mnist-batch-sizes", "16", "64", "--pcam-batch-sizes", "4",
              timeout=300)
    for study, batch in (("mnist", 16), ("mnist", 64), ("pcam", 4)):
        assert re.search(rf"{study} +{batch} +\d+\.\d+ ms +\d+\.\d+ ms +\d+\.\d+x +-?\d+\.\d+%", out), out
    assert re.search(r"largest extra training time with noise on: -?\d+\.\d+%", out)


def test_noise_cost_refuses_bad_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "noise_cost.py"), "--mnist-batch-sizes", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "batch sizes must be >= 2" in done.stderr


@pytest.mark.slow
def test_tune_overhead_prints_both_grids_and_the_baseline():
    out = run("tune_overhead.py", "--trials", "10", "--rows", "2", "--num-cpus", "2", timeout=600)
    for trials in (1, 10):
        assert re.search(rf"grid of +{trials} trials: +\d+\.\d+ s wall = +\d+\.\d+ ms per trial", out), out
    assert re.search(r"marginal cost per trial between the two grids: -?\d+\.\d+ ms", out)
    assert re.search(r"baseline, the same 10 trials in-process: \d+\.\d+ s = +\d+\.\d+ us per trial", out)
    assert re.search(r"ratio Tune / in-process per trial: \d+x", out)
