"""`python -m analysis.report` on a real Tune experiment shaped like the PCam study: a small trainable defined here
reports the PCam metric keys every epoch and writes test_predictions.csv (and once submission.csv) into its last
checkpoint, as study.mnist.trainable.train_pcam does, with one diverging and some erroring configurations. Values are
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
def test_configurations_tested_against_the_one_chosen_on_validation(pcam, out):
    summary = pd.read_csv(out / "auc_summary.csv")
    ranked = summary[np.isfinite(summary["mean_test_auc"])]
    best = ranked.loc[ranked["mean_val_auc"].idxmax()]
    tests = pd.read_csv(out / "comparisons.csv")
    aucs = {(c["optimizer"], c["lr"], c["batch_size"], c["run"]): rows[-1].get("test_auc", math.nan)
            for c, rows, _ in raw(pcam)}
    predictions = {(c["optimizer"], c["lr"], c["batch_size"], c["run"]): p for c, _, p in raw(pcam) if p is not None}
    assert len(tests) == len(ranked) - 1 == 6
    key = (best.optimizer, best.lr, best.batch_size)
    for row in tests.itertuples():
        mine = (row.optimizer, row.lr, row.batch_size)
        seeds = [r for r in (0, 1) if math.isfinite(aucs.get(mine + (r,), math.nan))]
        if len(seeds) == 2:
            expected = scipy_stats.ttest_rel([aucs[mine + (r,)] for r in seeds], [aucs[key + (r,)] for r in seeds])
            assert row.test == "paired t over 2 seeds" and row.p_value == pytest.approx(expected.pvalue)
        else:
            reference, trial = predictions[key + (seeds[0],)], predictions[mine + (seeds[0],)]
            p = delong_p(reference["label"].to_numpy(), trial["probability"].to_numpy(),
                         reference["probability"].to_numpy())
            assert row.test == "DeLong" and row.p_value == pytest.approx(p, rel=1e-6)
    ordered = np.sort(tests["p_value"].to_numpy())
    holm = np.minimum(np.maximum.accumulate(ordered * (len(ordered) - np.arange(len(ordered)))), 1)
    assert np.sort(tests["p_holm"].to_numpy()) == pytest.approx(holm)
    assert (tests["significant"] == (tests["p_holm"] < 0.05)).all()
    text = (out / "report.md").read_text()
    assert f"Reference configuration: optimizer {best.optimizer}" in text and "Holm" in text


def _constructed(seed_effects: dict, val: dict, n: int = 400):
    """Trials and predictions for pcam_report.config_tests: configuration -> per-seed signal strength of its
    test predictions (the same test images and per-seed noise for every configuration), and its validation AUC."""
    from analysis import stats

    labels = np.random.default_rng(0).integers(0, 2, n)
    records, predictions = [], {}
    for (optimizer, lr), strengths in seed_effects.items():
        for run, strength in enumerate(strengths):
            noise = np.random.default_rng(100 + run).normal(size=n)
            probability = 1 / (1 + np.exp(-(strength * (2 * labels - 1) + noise)))
            trial_id = f"{optimizer}_{lr}_{run}"
            predictions[trial_id] = pd.DataFrame({"index": np.arange(n), "label": labels, "probability": probability})
            records.append({"trial_id": trial_id, "optimizer": optimizer, "lr": lr, "batch_size": 32, "run": run,
                            "outcome": "done", "best_val_auc": val[(optimizer, lr)],
                            "test_auc": stats.auc(labels, probability), "ci_low": math.nan, "ci_high": math.nan})
    return pd.DataFrame.from_records(records), predictions, labels


def test_one_bad_seed_or_a_test_chosen_winner_is_not_a_difference():
    """The old rule marked a configuration when any one of its seeds had a DeLong p < 0.05 against the same seed
    of the configuration with the best test AUC. Here "sgd" has one bad seed of three (DeLong p << 0.05 on it)
    and two better ones, and "lucky" has the best test AUC but not the best validation AUC: the reference is
    chosen on validation, and a paired t-test over seeds, Holm-corrected, marks neither."""
    from analysis import stats
    from study.pcam import report_auc as pcam_report

    trials, predictions, labels = _constructed(
        {("adam", 0.001): [1.0, 1.0, 1.0], ("sgd", 0.01): [0.4, 1.15, 1.2], ("lucky", 0.1): [1.3, 0.9, 1.1]},
        val={("adam", 0.001): 0.9, ("sgd", 0.01): 0.85, ("lucky", 0.1): 0.8})
    configs = pcam_report.config_table(trials)
    assert configs.loc[configs["mean_test_auc"].idxmax(), "optimizer"] == "lucky"  # the old rule's reference
    _, _, _, old_p = stats.delong_test(labels, predictions["sgd_0.01_0"]["probability"],
                                       predictions["adam_0.001_0"]["probability"])
    assert old_p < 0.001  # so the old rule marked sgd
    tests, best = pcam_report.config_tests(trials, configs, predictions)
    assert best == ("adam", 0.001, 32)
    assert list(tests["test"]) == ["paired t over 3 seeds"] * 2 and not tests["significant"].any()
    sgd = tests[tests["optimizer"] == "sgd"].iloc[0]
    a = trials[trials["optimizer"] == "sgd"]["test_auc"].to_numpy()
    b = trials[trials["optimizer"] == "adam"]["test_auc"].to_numpy()
    assert sgd["p_value"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue) and sgd["p_value"] > 0.05


def test_single_seeds_use_delong_and_holm_counts_every_comparison():
    """One seed per configuration: DeLong against the reference's trial on the same images; among five
    configurations one at an uncorrected p just under 0.05 is not marked after Holm, a clear one still is."""
    from analysis import stats
    from study.pcam import report_auc as pcam_report

    effects = {("adam", 0.001): [1.0], ("sgd", 0.01): [0.3], ("a", 1): [1.0], ("b", 2): [1.02], ("c", 3): [0.98],
               ("d", 4): [0.97]}
    trials, predictions, labels = _constructed(effects, val={k: 0.9 if k[0] == "adam" else 0.8 for k in effects})
    # One more configuration whose own noise makes it differ at an uncorrected p just under 0.05.
    for strength in np.linspace(0.7, 0.95, 26):
        probability = 1 / (1 + np.exp(-(strength * (2 * labels - 1) + np.random.default_rng(7).normal(size=400))))
        _, _, _, p = stats.delong_test(labels, probability, predictions["adam_0.001_0"]["probability"])
        if 0.02 < p < 0.05:
            break
    assert 0.02 < p < 0.05
    predictions["e_5_0"] = pd.DataFrame({"index": np.arange(400), "label": labels, "probability": probability})
    trials = pd.concat([trials, pd.DataFrame([{**trials.iloc[-1].to_dict(), "trial_id": "e_5_0", "optimizer": "e",
                                               "lr": 5, "test_auc": stats.auc(labels, probability)}])],
                       ignore_index=True)
    tests, best = pcam_report.config_tests(trials, pcam_report.config_table(trials), predictions)
    assert best == ("adam", 0.001, 32) and (tests["test"] == "DeLong").all() and len(tests) == 6
    e, sgd = (tests[tests["optimizer"] == name].iloc[0] for name in ("e", "sgd"))
    assert e["p_value"] == pytest.approx(p) and not e["significant"] and e["p_holm"] > 0.05
    assert sgd["significant"]


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
    # every trained epoch of the fixture measured B_simple, so the sensitivity figure draws it per batch size
    assert "measured B_simple" not in text and "Dotted, right axis" in text
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["outcome"]) == ["diverged", "diverged", "error", "error", "error"]
    assert (failures.loc[failures["outcome"] == "error", "reason"]
            == "RuntimeError: injected failure for the report test").all()
    assert report.main([str(pcam), "--out", str(tmp_path)]) == 0
    for path in sorted(out.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
