"""Every metric a workload declares reaches the report, not only the primary one: a stored study folder built by
hand (as the engine stores one: study.json, workload.json, Tune's snapshot, a folder per trial with params.json and
result.json) whose workload declares error, AUC and loss, with a goal on the validation AUC, and its own option
`width`. Every checked number is recomputed here from the formula the rows were written with."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import report
from analysis.figures import fmt
from tests.test_analysis_load import write_state

BATCHES, SEEDS, EPOCHS = [16, 64], [0, 1, 2], 3
DIVERGES = (64, 2)  # NaN from epoch 2 on


def val_error(batch, seed, epoch) -> float:
    return 0.4 / (1 + epoch * 16 / batch) + 0.01 * seed


def val_auc(batch, seed, epoch) -> float:
    """Rises with training, except batch 64's last epoch: its best epoch is not its last."""
    return 1 - val_error(batch, seed, epoch) / 2 - (0.03 if batch == 64 and epoch == EPOCHS else 0.0)


def rows(batch, seed) -> list:
    out = []
    for epoch in range(EPOCHS + 1):
        diverged = (batch, seed) == DIVERGES and epoch >= 2
        err, auc = (math.nan, math.nan) if diverged else (val_error(batch, seed, epoch), val_auc(batch, seed, epoch))
        last = epoch == EPOCHS
        out.append({"epoch": epoch, "step": epoch * (512 // batch), "examples": epoch * 512,
                    "train_seconds": 0.5 * epoch, "train_loss": math.nan if epoch == 0 else 2 * err,
                    "val_error": err, "val_auc": auc, "val_loss": 2 * err, "noise_scale": math.nan,
                    "test_error": err + 0.002 if last else math.nan, "test_auc": auc - 0.01 if last else math.nan,
                    "test_loss": 2 * err if last else math.nan, "diverged": diverged, "gpu_share": 0.0,
                    "status": "diverged" if diverged else ("done" if last else "running")})
        if diverged:
            break
    return out


@pytest.fixture(scope="module")
def auc_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "auc-study"
    stage = root / "sweep"
    stage.mkdir(parents=True)
    names = ["val_error", "val_auc", "val_loss", "test_error", "test_auc", "test_loss"]
    (root / "study.json").write_text(json.dumps({"study": "auc-toy", "kind": "workload", "stages": ["sweep"],
                                                 "args": {"epochs": EPOCHS, "width": 24}, "code_version": "test"}))
    (root / "workload.json").write_text(json.dumps({
        "name": "auc-toy", "summary": "error, AUC and loss from a formula",
        "metrics": [{"name": n, "higher_is_better": n.endswith("auc")} for n in names], "primary": "val_error",
        "goals": [{"metric": "val_auc", "value": 0.9, "higher_is_better": True}], "chance": {"val_auc": 0.5},
        "axes": {"batch_size": BATCHES, "optimizer": ["sgd"], "lr": [0.1], "seed": SEEDS}}))
    entries = []
    for i, (batch, seed) in enumerate((b, s) for b in BATCHES for s in SEEDS):
        config = {"batch_size": batch, "seed": seed, "run": seed, "optimizer": "sgd", "lr": 0.1, "epochs": EPOCHS,
                  "workload": "auc-toy.py", "options": {"width": 24, "data": "breast-cancer"}}
        folder = stage / f"t{i}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(config))
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows(batch, seed)))
        entries.append((f"t{i}", f"a_{i:05d}", "TERMINATED", config, 0))
    write_state(stage, entries)
    out = root / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    return out


def finished(batch) -> list:
    return [s for s in SEEDS if (batch, s) != DIVERGES]


def t_interval(values) -> tuple:
    values = np.asarray(values)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def test_every_declared_metric_has_final_and_best_with_intervals_over_seeds(auc_report):
    configs = pd.read_csv(auc_report / "configurations.csv").set_index("batch_size")
    for batch in BATCHES:
        seeds = finished(batch)
        final = t_interval([val_auc(batch, s, EPOCHS) for s in seeds])
        best = t_interval([max(val_auc(batch, s, e) for e in range(1, EPOCHS + 1)) for s in seeds])
        test = t_interval([val_auc(batch, s, EPOCHS) - 0.01 for s in seeds])
        row = configs.loc[batch]
        assert [row["final_val_auc"], row["final_val_auc_low"], row["final_val_auc_high"]] == pytest.approx(final)
        assert [row["best_val_auc"], row["best_val_auc_low"], row["best_val_auc_high"]] == pytest.approx(best)
        assert [row["final_test_auc"], row["final_test_auc_low"], row["final_test_auc_high"]] == pytest.approx(test)
        assert row["final_val_loss"] == pytest.approx(np.mean([2 * val_error(batch, s, EPOCHS) for s in seeds]))
    assert configs.loc[64, "best_val_auc"] > configs.loc[64, "final_val_auc"]  # AUC's own direction: higher
    assert "best_test_auc" not in configs  # the test split is measured once
    trials = pd.read_csv(auc_report / "trials.csv").set_index(["batch_size", "seed"])
    assert trials.loc[(16, 1), "final_test_error"] == pytest.approx(val_error(16, 1, EPOCHS) + 0.002)
    assert trials.loc[(16, 1), "best_val_auc"] == pytest.approx(val_auc(16, 1, EPOCHS))
    assert math.isnan(trials.loc[DIVERGES, "final_val_auc"]) and math.isnan(trials.loc[DIVERGES, "best_val_auc"])


def test_report_md_shows_the_other_metrics_their_goal_curves_and_the_workloads_options(auc_report):
    text = (auc_report / "report.md").read_text()
    assert "## Other declared metrics" in text and "`val_auc`: higher is better" in text
    table = text.split("## Other declared metrics")[1].split("\n\n**")[1]
    header = table.splitlines()[2]
    for column in ("final val_auc", "best val_auc", "final val_loss", "final test_auc", "final test_error"):
        assert f"| {column} |" in header, column
    assert "best test_auc" not in header
    final = t_interval([val_auc(16, s, EPOCHS) for s in SEEDS])
    assert f"{fmt(final[0])} [{fmt(final[1])}, {fmt(final[2])}]" in table  # batch 16's final val_auc cell
    assert (auc_report / "curves_val_auc.png").read_bytes().startswith(b"\x89PNG")  # val_auc has a goal
    assert not list(auc_report.glob("curves_val_loss*")) and not list(auc_report.glob("curves_test*"))
    assert "![val_auc (higher is better, goal ≥ 0.9)" in text
    assert "the workload's own options: `width` 24, `data` breast-cancer" in text
    curves = pd.read_csv(auc_report / "curves.csv")
    assert "val_error_mean" in curves  # the primary metric's curves stay as they were
