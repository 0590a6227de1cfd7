"""The MNIST regression study as a workload (study/mnist/workload.py): listed, run through
`python -m study run mnist-regression`, its declared learning-rate search (--lr-search) choosing what the original
study chose, and its splits equal to the ones the original trainable built."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import report
from study.__main__ import main
from study.commands.run_command import parser
from study.data import mnist as mnist_data
from study.mnist import targets as regression_targets
from study.workload import resolve
from study.mnist import workload as mnist_regression

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "data" / "mnist-v1"
OPTIONS = dict(mnist_regression.workload.option_values(), val_size=100)


def test_listed_and_resolved_by_name(capsys):
    assert main(["list"]) == 0
    assert "mnist-regression" in capsys.readouterr().out
    assert resolve("mnist-regression") is mnist_regression.workload


def test_splits_hold_out_the_same_images_and_scale_like_the_original():
    data = mnist_data.synthetic(400, 50)
    targets = (regression_targets.targets(data.train_x, "var"), regression_targets.targets(data.test_x, "var"))
    raw = mnist_regression.splits(data.train_x, data.test_x, targets, dict(OPTIONS, target="var"))
    assert raw["train"][0].dtype == np.uint8 and len(raw["train"][0]) == 300 and len(raw["val"][0]) == 100
    order = np.random.default_rng(0).permutation(400)  # the hold-out every study before the rebuild used
    assert np.array_equal(raw["val"][0], data.train_x[np.sort(order[:100])])
    unit = mnist_regression.splits(data.train_x, data.test_x, targets,
                                   dict(OPTIONS, target="var", input_scale="unit", target_scale="unit"))
    assert unit["train"][0].dtype == np.float32 and float(unit["train"][0].max()) <= 1 + 1e-6
    np.testing.assert_array_equal(unit["test"][1], targets[1] * np.float32(1 / 255**2))
    # splits takes checked options: the workload's options refuse a scale or target it does not know
    with pytest.raises(Exception, match="option target_scale must be one of raw, unit, got 'big'"):
        mnist_regression.workload.option_values(dict(OPTIONS, target_scale="big"))
    with pytest.raises(Exception, match="option target must be one of mean, median, std, var, got 'mode'"):
        mnist_regression.workload.option_values(dict(OPTIONS, target="mode"))


def test_lr_search_flag_only_for_a_workload_that_declares_it(capsys):
    assert "--lr-search" in parser(mnist_regression.workload).format_help()
    assert "--lr-search" not in parser(resolve("mnist-cnn")).format_help()
    assert main(["run", "mnist-regression", "--smoke", "--lr-search", "--optimizers", "adam", "sgd"]) == 2
    assert "pass one --optimizers value" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_lr_search_chooses_the_original_rate(tmp_path):
    """The smoke study of the workload, its search first: the same rate as mnist-v1's search on the same held-out
    images and seed, its val_mse within tests/test_mnist_v1.py's RTOL (measured 4.3e-7: the grid run prepares each
    batch from uint8 and keeps the contiguous memory format, another float summation order)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="local")
    done = subprocess.run([sys.executable, "-m", "study", "run", "mnist-regression", "--smoke", "--lr-search",
                           "--storage-path", str(tmp_path), "--name", "s", "--num-cpus", "2", "--gpus-per-trial", "0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    study = tmp_path / "s"
    chosen, v1 = (json.loads((root / "chosen_lr.json").read_text()) for root in (study, V1))
    assert chosen["lr"] == v1["mean"]["lr"] and chosen["coarse_lr"] == v1["mean"]["coarse_lr"]
    assert math.isclose(chosen["val_mse"], v1["mean"]["mse"], rel_tol=1e-5)
    stored = json.loads((study / "study.json").read_text())
    assert stored["stages"] == ["lr_coarse", "lr_fine", "sweep"] and stored["kind"] == "workload"
    described = json.loads((study / "workload.json").read_text())
    assert described["axes"]["lr"] == [chosen["lr"]] and described["primary"] == "test_mse"
    assert {m["name"]: m["higher_is_better"] for m in described["metrics"]} == {"val_mse": False, "test_mse": False}
    for trial in (study / "sweep").glob("*/result.json"):
        last = json.loads(trial.read_text().splitlines()[-1])
        assert last["status"] == "done" and math.isfinite(last["test_mse"]) and last["config"]["lr"] == chosen["lr"]
    assert report.main([str(study), "--out", str(tmp_path / "r")]) == 0  # in this process: the CLI is tested elsewhere
    assert "lr_fine" in (tmp_path / "r" / "report.md").read_text()


def test_a_declared_stage_is_checked_when_resolved():
    from dataclasses import replace

    from study.errors import StudyError
    from study.workload import check

    w = mnist_regression.workload
    with pytest.raises(StudyError, match="unknown stages warmup"):
        check(replace(w, stages={"warmup": {}}), "x")
    with pytest.raises(StudyError, match="lacks select"):
        check(replace(w, stages={"lr_search": {k: v for k, v in w.stages["lr_search"].items() if k != "select"}}), "x")
    with pytest.raises(StudyError, match="no declared metric"):
        check(replace(w, stages={"lr_search": dict(w.stages["lr_search"], select="val_error")}), "x")
