"""The benchmarks run: tiny CPU runs that check each prints its figures (never their values: timing belongs in
the benchmarks, not in tests). The CUDA figures they exist for can only be taken on a GPU machine. The benchmarks
the device check runs (mnist_trial, tf32_effect, tune_packing, pcam_train, checkpoint_cost) are run by its dry run,
which checks their output lines: tests/test_gpu_check.py."""

import importlib
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


def refusal(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the benchmark's main(argv), in this process: the parser refuses before any work,
    so a subprocess would only add its start-up (seconds of imports)."""
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.slow
def test_pcam_pipeline_prints_both_rates_and_the_ratio():
    out = run("pcam_pipeline.py", "--n", "32", "--batch-size", "8", "--batches", "2", "--seconds", "0", "--rounds",
              "1", timeout=180)
    assert re.search(r"round 1: project +\d+ images/s .* baseline +\d+ images/s .* ratio \d+\.\d+x", out)
    assert re.search(r"ratio project / baseline: \d+\.\d+x", out)


def test_pcam_train_refuses_bad_arguments(capsys):
    code, err = refusal("pcam_train", ["--packed", "0"], capsys)
    assert code == 2 and "--packed must be at least 1" in err


@pytest.mark.slow
def test_noise_cost_prints_both_steps_and_the_overhead_per_batch_size():
    out = run("noise_cost.py", "--rounds", "1", "--mnist-batch-sizes", "16", "64", "--pcam-batch-sizes", "2",
              timeout=300)
    for study, batch in (("mnist", 16), ("mnist", 64), ("pcam", 2)):
        assert re.search(rf"{study} +{batch} +\d+\.\d+ ms +\d+\.\d+ ms +\d+\.\d+x +-?\d+\.\d+%", out), out
    assert re.search(r"largest extra training time with noise on: -?\d+\.\d+%", out)


def test_noise_cost_refuses_bad_arguments(capsys):
    code, err = refusal("noise_cost", ["--mnist-batch-sizes", "1"], capsys)
    assert code == 2 and "batch sizes must be >= 2" in err


@pytest.mark.slow
def test_tune_overhead_prints_both_grids_and_the_baseline():
    out = run("tune_overhead.py", "--trials", "10", "--rows", "1", "--num-cpus", "2", timeout=600)
    for trials in (1, 10):
        assert re.search(rf"grid of +{trials} trials: +\d+\.\d+ s wall = +\d+\.\d+ ms per trial", out), out
    assert re.search(r"marginal cost per trial between the two grids: -?\d+\.\d+ ms", out)
    assert re.search(r"baseline, the same 10 trials in-process: \d+\.\d+ s = +\d+\.\d+ us per trial", out)
    assert re.search(r"ratio Tune / in-process per trial: \d+x", out)
