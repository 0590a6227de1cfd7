"""`python -m analysis.report` on a real Tune experiment shaped like the PCam study: a small trainable defined here
reports the PCam metric keys every epoch and writes test_predictions.csv (and once submission.csv) into its last
checkpoint, as study.trainables.train_pcam does, with one diverging and some erroring configurations. Values are
checked against the raw files, recomputed here with scikit-learn, scipy and a direct O(n^2) DeLong."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from analysis import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 80


@pytest.fixture(scope="module")
def own_ray():
    """A 2-CPU Ray started for this module (address="local": never another process's instance)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pcam(own_ray, tmp_path_factory) -> Path:
    """A PCam-shaped study: sgd/adam x lr 0.01/0.001 x batch 8/16 x two seeds. adam 0.01 at batch 8 diverges in
    epoch 2 (its best-on-validation model is still tested, as the real trainable does), adam 0.001 at batch 16
    errors in both seeds and adam 0.01 at batch 16 in seed 1. Defined in here so Ray ships it by value."""
    from ray import tune

    def fake_pcam(config):
        import tempfile

        labels = np.random.default_rng(0).integers(0, 2, N_TEST)  # the same test images for every trial
        key = (config["optimizer"], config["lr"], config["batch_size"])
        strength = (1.0 if config["optimizer"] == "sgd" else 0.6) * (8 / config["batch_size"]) ** 0.5 * \
            (1.0 if config["lr"] == 0.01 else 0.6)
        noise = np.random.default_rng(config["batch_size"] * 10 + config["run"] + int(config["lr"] * 1e3)).normal(
            size=N_TEST)
        probability = 1 / (1 + np.exp(-(strength * (2 * labels - 1) + noise)))
        best_acc, best_epoch = -1.0, 0
        for epoch in range(config["epochs"] + 1):
            if key[1:] == (0.001, 16) and key[0] == "adam" or (key == ("adam", 0.01, 16) and config["run"] == 1):
                if epoch == 1:
                    raise RuntimeError("injected failure for the report test")
            diverged = key == ("adam", 0.01, 8) and epoch == 2
            val_acc = math.nan if diverged else 0.5 + 0.1 * epoch * strength / (1 + config["run"])
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
            last = diverged or epoch == config["epochs"]
            metrics = {"epoch": epoch, "train_loss": math.nan if diverged else 1 / (1 + epoch),
                       "epoch_seconds": 0.1, "train_seconds": 0.1 * epoch, "images_per_second": 500.0,
                       "noise_scale": 20.0 * config["batch_size"] if epoch else math.nan, "diverged": diverged,
                       "lr": config["lr"], "device": "cpu", "gpu_ids": "", "gpu_share": 0.0,
                       "status": "diverged" if diverged else ("done" if last else "running"),
                       "val_loss": 1.0 - 0.1 * epoch, "val_acc": val_acc, "val_auc": min(1.0, val_acc + 0.1),
                       "best_epoch": best_epoch, "best_val_acc": best_acc}
            with tempfile.TemporaryDirectory() as folder:
                if last:
                    metrics.update(test_auc=roc_auc_score(labels, probability),
                                   test_acc=float(np.mean((probability >= 0.5) == labels)))
                    pd.DataFrame({"index": np.arange(N_TEST), "label": labels, "probability": probability}).to_csv(
                        Path(folder) / "test_predictions.csv", index=False)
                    if key == ("sgd", 0.01, 8) and config["run"] == 0:
                        pd.DataFrame({"id": [f"img{i}" for i in range(N_TEST)], "label": probability}).to_csv(
                            Path(folder) / "submission.csv", index=False)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            if last:
                return

    root = tmp_path_factory.mktemp("pcam") / "study"
    root.mkdir()
    (root / "study.json").write_text(json.dumps({"study": "pcam", "args": {"seeds": 2}, "code_version": "test",
                                                 "resources_per_trial": {"cpu": 1, "gpu": 0}}))
    space = {"optimizer": tune.grid_search(["sgd", "adam"]), "lr": tune.grid_search([0.01, 0.001]),
             "batch_size": tune.grid_search([8, 16]), "run": tune.grid_search([0, 1]), "momentum": 0.9, "epochs": 2}
    tune.Tuner(tune.with_resources(fake_pcam, {"cpu": 1}), param_space=space,
               run_config=tune.RunConfig(name="grid", storage_path=str(root), verbose=0,
                                         failure_config=tune.FailureConfig(max_failures=0))).fit()
    return root


@pytest.fixture(scope="module")
def out(pcam, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    assert report.main([str(pcam), "--out", str(folder)]) == 0
    return folder


def raw(pcam: Path) -> list:
    """(config, rows, predictions or None) per trial folder, read directly."""
    trials = []
    for folder in sorted(p for p in (pcam / "grid").iterdir() if (p / "params.json").is_file()):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        checkpoints = sorted(folder.glob("checkpoint_*"))
        predictions = checkpoints[-1] / "test_predictions.csv" if checkpoints else None
        trials.append((json.loads((folder / "params.json").read_text()), rows,
                       pd.read_csv(predictions) if predictions and predictions.is_file() else None))
    return trials


def delong_p(labels, a, b) -> float:
    """DeLong et al. 1988 written out with the full pairwise kernel."""
    pos, neg = labels == 1, labels == 0

    def components(s):
        kernel = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return kernel.mean(axis=1), kernel.mean(axis=0), kernel.mean()

    v10a, v01a, auc_a = components(a)
    v10b, v01b, auc_b = components(b)
    s10, s01 = np.cov(np.vstack([v10a, v10b])), np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum() + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / neg.sum()
    return math.erfc(abs(auc_a - auc_b) / math.sqrt(var) / math.sqrt(2))


@pytest.mark.slow
def test_auc_summary_matches_raw_results(pcam, out):
    per_config = {}
    for config, rows, _ in raw(pcam):
        auc = rows[-1].get("test_auc", math.nan)
        per_config.setdefault((config["optimizer"], config["lr"], config["batch_size"]), []).append(auc)
    summary = pd.read_csv(out / "auc_summary.csv")
    assert len(summary) == len(per_config) == 8
    for row in summary.itertuples():
        values = [v for v in per_config[(row.optimizer, row.lr, row.batch_size)] if math.isfinite(v)]
        assert row.seeds == 2 and row.with_auc == len(values)
        if len(values) == 2:
            half = scipy_stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
            assert row.mean_test_auc == pytest.approx(np.mean(values))
            assert (row.ci_low, row.ci_high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
        elif len(values) == 1:  # one seed left: that trial's bootstrap interval over the test images
            assert row.mean_test_auc == pytest.approx(values[0]) and row.ci_low <= values[0] <= row.ci_high
        else:
            assert math.isnan(row.mean_test_auc) and row.outcomes == "2 error"


@pytest.mark.slow
def test_trial_intervals_come_from_stored_predictions(pcam, out):
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 16 and (trials["outcome"] == "error").sum() == 3
    assert set(trials.loc[trials["outcome"] == "diverged", "optimizer"]) == {"adam"}
    by_key = {(r.optimizer, r.lr, r.batch_size, r.run): r for r in trials.itertuples()}
    for config, rows, predictions in raw(pcam):
        row = by_key[(config["optimizer"], config["lr"], config["batch_size"], config["run"])]
        if predictions is None:
            assert row.outcome == "error" and math.isnan(row.test_auc) and math.isnan(row.ci_low)
            continue
        recomputed = roc_auc_score(predictions["label"], predictions["probability"])
        assert row.auc_from_predictions == pytest.approx(recomputed) and row.test_auc == pytest.approx(recomputed)
        assert 0 <= row.ci_low <= recomputed <= row.ci_high <= 1 and row.ci_high > row.ci_low
        assert row.test_images == N_TEST and row.best_epoch == rows[-1]["best_epoch"]


@pytest.mark.slow
def test_delong_against_the_best_configuration(pcam, out):
    summary = pd.read_csv(out / "auc_summary.csv")
    best = summary.loc[summary["mean_test_auc"].idxmax()]
    tests = pd.read_csv(out / "delong.csv")
    predictions = {(c["optimizer"], c["lr"], c["batch_size"], c["run"]): p for c, _, p in raw(pcam) if p is not None}
    assert len(tests) == len(predictions) == 13
    for row in tests.itertuples():
        reference = predictions[(best.optimizer, best.lr, best.batch_size, row.run)]
        mine = predictions[(row.optimizer, row.lr, row.batch_size, row.run)]
        if (row.optimizer, row.lr, row.batch_size) == (best.optimizer, best.lr, best.batch_size):
            assert row.note == "best configuration itself"
            continue
        p = delong_p(reference["label"].to_numpy(), mine["probability"].to_numpy(), reference["probability"].to_numpy())
        assert row.p_value == pytest.approx(p, rel=1e-6) and row.significant == (p < 0.05)
    text = (out / "report.md").read_text()
    assert f"Best configuration: optimizer {best.optimizer}" in text
    assert tests["significant"].any() and "differ from it significantly at 0.05" in text


@pytest.mark.slow
def test_tables_figures_and_submissions(pcam, out, tmp_path):
    adam = pd.read_csv(out / "auc_adam.csv").set_index(["batch_size", "lr"])  # numbers; report.md formats them
    assert adam.loc[(16, 0.001), "outcomes"] == "2 error" and math.isnan(adam.loc[(16, 0.001), "value"])
    assert "1 error" in adam.loc[(16, 0.01), "outcomes"] and "diverged" in adam.loc[(8, 0.01), "outcomes"]
    sgd = pd.read_csv(out / "auc_sgd.csv")
    assert list(zip(sgd["batch_size"], sgd["lr"])) == [(8, 0.001), (8, 0.01), (16, 0.001), (16, 0.01)]
    assert all(pd.api.types.is_float_dtype(sgd[c]) for c in ("value", "low", "high"))
    submissions = pd.read_csv(out / "submissions.csv")
    assert len(submissions) == 1 and submissions["path"].iloc[0].endswith("submission.csv")
    assert Path(submissions["path"].iloc[0]).is_file()
    text = (out / "report.md").read_text()
    for name in ("validation_val_acc.png", "validation_val_auc.png", "sensitivity.png", "noise_over_training.png",
                 "timeline.png"):
        assert (out / name).is_file()
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and f"]({png.name})" in text
        with Image.open(png) as image:
            image.verify()
    # every trained epoch of the fixture measured B_simple, so the sensitivity figure marks it and says so
    assert "No trial measured a finite gradient noise scale" not in text and "B_simple" in text
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["outcome"]) == ["diverged", "diverged", "error", "error", "error"]
    assert (failures.loc[failures["outcome"] == "error", "reason"]
            == "RuntimeError: injected failure for the report test").all()
    assert report.main([str(pcam), "--out", str(tmp_path)]) == 0
    for path in sorted(out.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
