"""End to end: real (tiny) Ray Tune studies on CPU, checked through what they stored."""

import json
import math
from pathlib import Path

import pytest

from study import metrics as M
from study.mnist import command as cli
from tests.tensorboard_checks import check_study

pytestmark = pytest.mark.slow


def trials(stage_dir: Path) -> list[dict]:
    """Every trial of one stored Tune experiment: its params and its reported rows."""
    out = []
    for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        out.append({"dir": folder, "config": json.loads((folder / "params.json").read_text()), "rows": rows})
    return out


@pytest.fixture
def smoke(mnist_smoke):
    """`python -m study.mnist --smoke`, as a user runs it, in its own process (it starts its own Ray): conftest's
    session fixture, run once for this module and tests/test_report_mnist.py."""
    return mnist_smoke


def test_smoke_stores_both_stages(smoke):
    folder, stdout = smoke
    coarse, fine, sweep = (trials(folder / s) for s in ("lr_coarse", "lr_fine", "batch_sweep"))
    smoke_grid = cli.SMOKE
    assert len(coarse) == len(smoke_grid["targets"]) * len(smoke_grid["lr_grid"])
    assert len(fine) == len(smoke_grid["targets"]) * len(smoke_grid["fine_factors"])
    assert len(sweep) == len(smoke_grid["targets"]) * len(smoke_grid["batch_sizes"]) * smoke_grid["runs"]
    for trial in fine + sweep:
        assert [r[M.EPOCH] for r in trial["rows"]] == list(range(smoke_grid["epochs"] + 1))
        assert all(math.isfinite(r[M.TEST_MSE]) for r in trial["rows"])
        assert trial["rows"][-1][M.STATUS] == M.STATUS_DONE
    for trial in sweep:  # seed = batch size + run index, as the original; full config stored
        cfg = trial["config"]
        assert all(M.NOISE_SCALE in r for r in trial["rows"])
        assert cfg["seed"] == cfg["batch_size"] + cfg["run"] and cfg["val_size"] == 0
        assert {"code_version", "eval_batch_size", "input_scale", "lr_scaling"} <= set(cfg)
    assert "learning rate for mean" in stdout
    # B_simple is NaN where its |G|^2 estimate is <= 0 (noise dominates); epochs of the sweep must have one.
    scales = [r[M.NOISE_SCALE] for t in sweep for r in t["rows"]]
    assert any(math.isfinite(v) and v > 0 for v in scales)
    assert all(r[M.NOISE_PROBES] >= 1 for t in sweep for r in t["rows"][1:])  # every epoch probes its step 0


def test_diverged_trials_are_marked_and_never_chosen(smoke):
    folder, _ = smoke
    coarse = trials(folder / "lr_coarse")
    diverged = [t for t in coarse if t["rows"][-1][M.DIVERGED]]
    assert {t["config"]["lr"] for t in diverged} == {1e3}  # the smoke grid's deliberately huge rate
    assert all(t["rows"][-1][M.STATUS] == M.STATUS_DIVERGED for t in diverged)
    chosen = json.loads((folder / "chosen_lr.json").read_text())
    # recompute the choice from the stored fine stage: lowest final validation MSE per target
    for target in cli.SMOKE["targets"]:
        fine = [t for t in trials(folder / "lr_fine") if t["config"]["target"] == target]
        best = min(fine, key=lambda t: t["rows"][-1][M.VAL_MSE])
        assert chosen[target]["lr"] == pytest.approx(best["config"]["lr"])
        assert chosen[target]["lr"] != 1e3
        sweep = [t for t in trials(folder / "batch_sweep") if t["config"]["target"] == target]
        assert {t["config"]["lr"] for t in sweep} == {chosen[target]["lr"]}


def test_tensorboard_shows_the_grid_and_outcomes(smoke, tensorboard_api):
    folder, stdout = smoke
    groups = check_study(tensorboard_api(folder), folder, "mnist", expect_diverged=True)
    assert {g["hparams"]["stage"] for g in groups.values()} == {"lr_coarse", "lr_fine", "batch_sweep"}
    # the console: one table per stage, the right TensorBoard command once, none of Tune's per-trial boxes
    assert stdout.count(f"tensorboard --logdir {folder}") == 1 and "driver_artifacts" not in stdout
    assert "Trial status" not in stdout and "Trial train_mnist" not in stdout and len(stdout.splitlines()) < 80


def test_study_records_and_checkpoints(smoke):
    folder, _ = smoke
    study = json.loads((folder / "study.json").read_text())
    assert study["study"] == "mnist" and study["data"]["n_train"] == 512 + cli.SMOKE["val_size"]
    stats = json.loads((folder / "target_stats.json").read_text())
    assert set(stats) == {"mean", "median", "std", "var"}
    for trial in trials(folder / "batch_sweep"):
        checkpoints = sorted(trial["dir"].glob("checkpoint_*"))
        assert 1 <= len(checkpoints) <= 2 and (checkpoints[-1] / M.STATE_FILE).is_file()


def test_real_mnist_mean_mse_falls(mnist_dir, tmp_path, local_ray):
    code = cli.main(["--data-dir", str(mnist_dir), "--train-limit", "3000", "--test-limit", "1000",
                     "--targets", "mean", "--lr", "1e-3", "--batch-sizes", "32", "--runs", "1", "--epochs", "3",
                     "--storage-path", str(tmp_path), "--name", "real"])
    assert code == 0
    (trial,) = trials(tmp_path / "real" / "batch_sweep")
    mse = [r[M.TEST_MSE] for r in trial["rows"]]
    assert len(mse) == 4 and mse[3] < mse[1] < mse[0]
    assert trial["config"]["seed"] == 32
