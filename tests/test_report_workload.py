"""`python -m analysis.report` on a real workload study: a tiny Tune study on CPU whose plain-function trainable
reports the rows a workload trial stores (epoch, step, examples, train_seconds, train_loss, noise_scale, status,
diverged, val_/test_ metrics) from a closed formula, with study.json and workload.json beside it, as the engine
stores them. Three batch sizes x two optimizers x two seeds; one trial diverges, one raises. Every checked number is
recomputed here from the formula, not read back through analysis/."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import report

BATCHES, OPTIMIZERS, SEEDS, EPOCHS, N_TRAIN = [8, 32, 64], ["sgd", "adam"], [0, 1], 3, 256
DIVERGES = ("sgd", 64, 1)  # its loss becomes NaN in epoch 2
RAISES = ("adam", 32, 1)  # raises in epoch 2, after epoch 1's row
GPU_SHARE = 0.25


def val_error(opt, batch, seed, epoch) -> float:
    """Falls with epochs (faster for small batches), adam better; batch 8 gets worse in its last epoch, so its best
    epoch is not its last."""
    value = (0.5 / (1 + epoch * 8 / batch) + 0.01 * seed) * (0.8 if opt == "adam" else 1.0)
    return value + (0.05 if batch == 8 and epoch == EPOCHS else 0.0)


def seconds_per_epoch(batch) -> float:
    return 0.1 + 0.4 * 8 / batch


def noise(batch, seed) -> float:
    return 40.0 + batch / 8 + seed


def trainable(config):
    from ray import tune

    opt, batch, seed = config["optimizer"], config["batch_size"], config["seed"]
    for epoch in range(EPOCHS + 1):
        trained = epoch >= 1
        diverged = (opt, batch, seed) == DIVERGES and epoch == 2
        if (opt, batch, seed) == RAISES and epoch == 2:
            raise RuntimeError("boom in epoch 2")
        err = math.nan if diverged else val_error(opt, batch, seed, epoch)
        row = {"epoch": epoch, "step": epoch * (N_TRAIN // batch), "examples": epoch * N_TRAIN,
               "train_seconds": epoch * seconds_per_epoch(batch), "train_loss": 2 * err if trained else math.nan,
               "noise_scale": noise(batch, seed) if trained and not diverged else math.nan,
               "val_error": err, "diverged": diverged, "gpu_share": GPU_SHARE, "device": "cpu",
               "status": "diverged" if diverged else ("done" if epoch == EPOCHS else "running")}
        if epoch == EPOCHS:
            row["test_error"] = err + 0.001
        tune.report(row)
        if diverged:
            return


@pytest.fixture(scope="module")
def workload_study(local_ray, tmp_path_factory):
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    root = tmp_path_factory.mktemp("store") / "toy-study"
    root.mkdir()
    axes = {"batch_size": BATCHES, "optimizer": OPTIMIZERS, "seed": SEEDS}
    (root / "study.json").write_text(json.dumps({"study": "toy", "kind": "workload", "stages": ["sweep"],
                                                 "args": {"epochs": EPOCHS}, "code_version": "test"}))
    (root / "workload.json").write_text(json.dumps({
        "name": "toy", "summary": "a closed formula standing in for training",
        "metrics": [{"name": "val_error", "higher_is_better": False},
                    {"name": "test_error", "higher_is_better": False}],
        "primary": "val_error", "goals": [{"metric": "val_error", "value": 0.2, "higher_is_better": False}],
        "chance": {"val_error": 0.9}, "axes": axes}))
    tuner = tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in axes.items()},
                       run_config=tune.RunConfig(name="sweep", storage_path=str(root), verbose=0))
    tuner.fit()
    out = root / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    return root, out


def csv(out, name) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv")


def finished_runs(opt, batch) -> list:
    return [s for s in SEEDS if (opt, batch, s) not in (DIVERGES, RAISES)]


@pytest.mark.slow
def test_primary_metric_tables_hold_the_reported_values(workload_study):
    _, out = workload_study
    configs = csv(out, "configurations").set_index(["batch_size", "optimizer"])
    assert len(configs) == len(BATCHES) * len(OPTIMIZERS)
    for opt in OPTIMIZERS:
        for batch in BATCHES:
            row = configs.loc[(batch, opt)]
            seeds = finished_runs(opt, batch)
            finals = np.array([val_error(opt, batch, s, EPOCHS) for s in seeds])
            bests = np.array([min(val_error(opt, batch, s, e) for e in range(1, EPOCHS + 1)) for s in seeds])
            assert (row["runs"], row["finished"]) == (2, len(seeds))
            assert row["final_val_error"] == pytest.approx(finals.mean())
            assert row["best_val_error"] == pytest.approx(bests.mean())
            if len(seeds) == 2:
                half = scipy_stats.t.ppf(0.975, 1) * finals.std(ddof=1) / math.sqrt(2)
                assert row["final_val_error_low"] == pytest.approx(finals.mean() - half)
                assert row["final_val_error_high"] == pytest.approx(finals.mean() + half)
            else:
                assert math.isnan(row["final_val_error_low"]) and row["interval"] == "one run"
    assert configs.loc[(8, "sgd"), "best_val_error"] < configs.loc[(8, "sgd"), "final_val_error"]
    # Per axis: at each value the best configuration (lower is better) over the other axis.
    by_batch = csv(out, "axis_batch_size").set_index("batch_size")
    for batch in BATCHES:
        assert by_batch.loc[batch, "best_configuration"] == "optimizer adam"
        assert by_batch.loc[batch, "configurations"] == 2
    by_opt = csv(out, "axis_optimizer").set_index("optimizer")
    for opt in OPTIMIZERS:
        means = {b: np.mean([val_error(opt, b, s, EPOCHS) for s in finished_runs(opt, b)]) for b in BATCHES}
        best = min(means, key=means.get)
        assert by_opt.loc[opt, "best_configuration"] == f"batch_size {best}"
        assert by_opt.loc[opt, "final_val_error"] == pytest.approx(means[best])
    trials = csv(out, "trials")
    done = trials[trials["outcome"] == "done"]
    assert len(done) == 10 and set(trials["outcome"]) == {"done", "diverged", "error"}
    for row in done.itertuples():
        assert row.final_test_error == pytest.approx(val_error(row.optimizer, row.batch_size, row.seed, EPOCHS) + 0.001)
    assert trials[trials["outcome"] != "done"]["final_val_error"].isna().all()  # never a number


@pytest.mark.slow
def test_curves_spread_speed_and_noise_match_the_formula(workload_study):
    _, out = workload_study
    curves = csv(out, "curves").set_index(["batch_size", "optimizer", "epoch"])
    for opt in OPTIMIZERS:
        for batch in BATCHES:
            for epoch in range(EPOCHS + 1):
                alive = [s for s in SEEDS if not ((opt, batch, s) == DIVERGES and epoch >= 2)
                         and not ((opt, batch, s) == RAISES and epoch >= 2)]
                row = curves.loc[(batch, opt, epoch)]
                assert row["runs"] == len(alive)
                assert row["val_error_mean"] == pytest.approx(np.mean([val_error(opt, batch, s, epoch) for s in alive]))
                assert row["examples"] == epoch * N_TRAIN and row["step"] == epoch * (N_TRAIN // batch)
                if epoch:
                    assert row["train_loss_mean"] == pytest.approx(2 * row["val_error_mean"])
    spread = csv(out, "spread").set_index(["batch_size", "optimizer"])
    finals = [val_error("adam", 8, s, EPOCHS) for s in SEEDS]
    assert spread.loc[(8, "adam"), ["min", "mean", "max"]].tolist() == pytest.approx(
        [min(finals), np.mean(finals), max(finals)])
    assert spread.loc[(64, "sgd"), "finished"] == 1 and math.isnan(spread.loc[(64, "sgd"), "std"])
    speed = csv(out, "speed").set_index("batch_size")
    timing = csv(out, "timing")
    for batch in BATCHES:
        assert speed.loc[batch, "seconds_per_epoch"] == pytest.approx(seconds_per_epoch(batch))
        assert speed.loc[batch, "images_per_second"] == pytest.approx(N_TRAIN / seconds_per_epoch(batch))
        assert speed.loc[batch, "mean_train_seconds"] == pytest.approx(EPOCHS * seconds_per_epoch(batch))
        assert speed.loc[batch, "gpu_share"] == GPU_SHARE
        walls = timing[timing["batch_size"] == batch]["wall_seconds"]
        assert speed.loc[batch, "gpu_seconds"] == pytest.approx(GPU_SHARE * walls.sum())
    noise_table = csv(out, "noise_scale").set_index("batch_size")
    for batch in BATCHES:  # every trial measured one in epoch 1, the diverged and the errored one included
        values = [noise(batch, s) for _ in OPTIMIZERS for s in SEEDS]
        assert noise_table.loc[batch, "trials"] == 4
        assert noise_table.loc[batch, "median"] == pytest.approx(np.median(values))


@pytest.mark.slow
def test_report_names_every_section_and_lists_the_failed_trials(workload_study):
    root, out = workload_study
    text = (out / "report.md").read_text()
    for heading in ("# Workload study toy: report", "## Workload: toy", "## Primary metric: val_error",
                    "## Curves per batch size", "## Run-to-run spread", "## Training speed per batch size",
                    "## Gradient noise scale", "## Timing and cost", "## Errored, diverged and unfinished trials"):
        assert heading in text, heading
    assert "`val_error` (lower is better)" in text and "goals: `val_error` ≤ 0.2" in text
    for figure in ("curves", "sensitivity", "speed", "noise_over_training", "timeline"):
        assert (out / f"{figure}.png").read_bytes().startswith(b"\x89PNG"), figure
    failures = csv(out, "failures").set_index(["optimizer", "batch_size", "seed"])
    assert len(failures) == 2
    assert failures.loc[DIVERGES, "outcome"] == "diverged" and "epoch 2" in failures.loc[DIVERGES, "reason"]
    assert failures.loc[RAISES, "outcome"] == "error" and "boom in epoch 2" in failures.loc[RAISES, "reason"]
    stages = csv(out, "stages")
    assert stages.to_dict("records")[0] == {"stage": "sweep", "trials": 12, "done": 10, "no result": 0,
                                                "diverged": 1, "error": 1, "incomplete": 0, "running": 0,
                                                "pending": 0}
    again = root / "again"
    assert report.main([str(root), "--out", str(again)]) == 0  # a pure function of stored results
    for name in ("configurations.csv", "curves.csv", "speed.csv", "report.md"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
