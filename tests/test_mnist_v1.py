"""A study stored by the version before the workload redesign (tests/data/mnist-v1, see tests/data/README.md) still
reports and resumes with today's code, and today's smoke study stores the same metrics as it did.

Tolerance of the before/after comparison: measured on CPU, the learning-rate stages (noise scale off) come out bit
for bit the same, and today's code reproduces the version just before this rebuild bit for bit in every stage. The
batch sweep differs from mnist-v1 by at most 6.4e-7 relative (test_mse, train_loss after two epochs): the noise
probe now splits its batch into other micro-batches, so float32 gradients are summed in another order (a few ulps
per step, eps = 1.2e-7), amplified over the steps. RTOL = 1e-5 allows ~15x that; a real change (another lr, target
scale, seed or data order) moves these numbers by percent, not ppm. The noise scale itself is an estimate whose
micro-batches changed, so it is not compared (it differs by 14-29 % between the versions).

The studies run through study.mnist's main() in this process, on the module's one small Ray: the trials run in
Ray's workers either way, so their numbers are those of `python -m study.mnist` (which tests/test_mnist_study.py
runs in a subprocess).
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from analysis import report
from study.mnist import command as cli

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "data" / "mnist-v1"
RTOL = 1e-5
STAGES = ("lr_coarse", "lr_fine", "batch_sweep")
# Metrics added after mnist-v1: the noise probes' share of an epoch (before the redesign), and the step and examples
# seen that every row of the one training loop carries (study.engine.loop).
ADDED = {"probe_seconds", "step", "examples"}
RAY_KEYS = {"timestamp", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "node_id",
            "time_since_restore", "iterations_since_restore", "trial_id", "checkpoint_dir_name"}


@pytest.fixture
def ray_here(local_ray, monkeypatch):
    """The module's Ray (2 CPUs), which study.mnist's main() reuses; RAY_ADDRESS=local as before, when each study
    started a Ray of its own: never another Ray running on this machine."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    return local_ray


def trials(study: Path, stage: str) -> dict[str, Path]:
    """A stage's trial folders by name without Tune's running number (mean_lr=0.002_batch=16_run=0)."""
    return {p.name.rsplit("_", 1)[0]: p for p in sorted((study / stage).iterdir()) if (p / "result.json").exists()}


def rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL)


@pytest.mark.slow
def test_v1_study_reports_and_resumes_its_batch_sweep(ray_here, tmp_path):
    study = tmp_path / "mnist-v1"
    shutil.copytree(V1, study)
    out = tmp_path / "report"
    assert report.main([str(study), "--out", str(out)]) == 0  # in this process: the CLI's own test is elsewhere
    assert (out / "report.md").exists() and list(out.glob("*.png"))

    shutil.rmtree(study / "batch_sweep")
    stages_before = {s: sorted(p.name for p in (study / s).iterdir()) for s in ("lr_coarse", "lr_fine")}
    assert cli.main(["--storage-path", str(tmp_path), "--name", "mnist-v1", "--resume", "--num-cpus", "2",
                     "--gpus-per-trial", "0"]) == 0
    # The search is not run again: its stages and its choice are the stored ones.
    assert {s: sorted(p.name for p in (study / s).iterdir()) for s in stages_before} == stages_before
    assert json.loads((study / "chosen_lr.json").read_text()) == json.loads((V1 / "chosen_lr.json").read_text())
    old, new = trials(V1, "batch_sweep"), trials(study, "batch_sweep")
    assert sorted(new) == sorted(old) == ["mean_lr=0.002_batch=16_run=0", "mean_lr=0.002_batch=64_run=0"]
    for name in old:
        stored = json.loads((old[name] / "params.json").read_text())
        params = json.loads((new[name] / "params.json").read_text())
        assert params.keys() == stored.keys() and params["code_version"] != stored["code_version"]  # today's code
        assert {k: v for k, v in params.items() if k != "code_version"} == \
               {k: v for k, v in stored.items() if k != "code_version"}  # from study.json's args and chosen_lr.json
        old_rows, new_rows = rows(old[name]), rows(new[name])
        assert [r["epoch"] for r in new_rows] == [r["epoch"] for r in old_rows] == [0, 1, 2]
        assert new_rows[0].keys() - RAY_KEYS == old_rows[0].keys() - RAY_KEYS | ADDED
        assert all(close(a["test_mse"], b["test_mse"]) for a, b in zip(old_rows, new_rows))
    assert report.main([str(study), "--out", str(tmp_path / "report-resumed")]) == 0


@pytest.mark.slow
def test_smoke_study_stores_the_metrics_of_v1(ray_here, tmp_path):
    """tests/data/README.md's command, run with today's code; every stage's metrics compared epoch by epoch."""
    assert cli.main(["--smoke", "--targets", "mean", "--runs", "1", "--storage-path", str(tmp_path),
                     "--name", "mnist-v1", "--num-cpus", "2", "--gpus-per-trial", "0"]) == 0
    study = tmp_path / "mnist-v1"
    assert json.loads((study / "chosen_lr.json").read_text())["mean"]["lr"] == 0.002
    assert json.loads((study / "target_stats.json").read_text()) == json.loads((V1 / "target_stats.json").read_text())
    compared = 0
    for stage in STAGES:
        old, new = trials(V1, stage), trials(study, stage)
        assert sorted(new) == sorted(old), stage
        for name in old:
            old_rows, new_rows = rows(old[name]), rows(new[name])
            assert len(new_rows) == len(old_rows)
            assert new_rows[0].keys() - RAY_KEYS == old_rows[0].keys() - RAY_KEYS | ADDED
            for a, b in zip(old_rows, new_rows):
                for metric in ("train_loss", "val_mse", "test_mse"):
                    assert close(a[metric], b[metric]), (stage, name, a["epoch"], metric, a[metric], b[metric])
                    compared += not math.isnan(a[metric])
                assert a["diverged"] == b["diverged"] and a["status"] == b["status"]
    assert compared >= 20  # finite numbers, not only NaN == NaN
