"""--lr-scaling with several rules is a grid axis: a real Tune sweep on CPU, then the report keeps the rules apart."""

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import report
from study import metrics as M
from study.mnist import command as cli


def stored(stage_dir: Path) -> list[tuple[dict, list[dict]]]:
    out = []
    for trial in sorted(p for p in stage_dir.iterdir() if (p / "params.json").is_file()):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        out.append((json.loads((trial / "params.json").read_text()), rows))
    return out


@pytest.mark.slow
def test_two_rules_are_a_grid_axis_with_the_same_seeds(local_ray, tmp_path):
    code = cli.main(["--smoke", "--targets", "mean", "--lr", "1e-3", "--batch-sizes", "16", "64", "--runs", "1",
                     "--epochs", "1", "--lr-scaling", "none", "linear", "--lr-reference-batch", "16",
                     "--storage-path", str(tmp_path), "--name", "axis"])
    assert code == 0
    trials = stored(tmp_path / "axis" / "batch_sweep")
    assert sorted((c["lr_scaling"], c["batch_size"]) for c, _ in trials) == [
        ("linear", 16), ("linear", 64), ("none", 16), ("none", 64)]
    for config, rows in trials:
        factor = config["batch_size"] / 16 if config["lr_scaling"] == "linear" else 1.0
        assert rows[-1][M.LR] == pytest.approx(1e-3 * factor)  # the rule reached the optimizer
        assert config["seed"] == config["batch_size"] + config["run"]  # the same seeds under both rules

    out = tmp_path / "report"
    assert report.main([str(tmp_path / "axis"), "--out", str(out)]) == 0
    spread = pd.read_csv(out / "spread.csv")
    assert sorted(zip(spread["target"], spread["batch_size"])) == [
        ("mean, lr linear", 16), ("mean, lr linear", 64), ("mean, lr none", 16), ("mean, lr none", 64)]
    final = {(c["lr_scaling"], c["batch_size"]): rows[-1][M.TEST_MSE] for c, rows in trials}
    for row in spread.itertuples():
        rule = row.target.split(", lr ")[1]
        assert row.mean == pytest.approx(final[(rule, row.batch_size)])
    assert "several learning-rate scaling rules" in (out / "report.md").read_text()


def test_fold_joins_the_rule_only_when_several_ran():
    from analysis.common import base_value, fold_lr_scaling
    from analysis.trials import Trial

    one = [Trial("grid", f"t{i}", "", {"optimizer": "sgd", "lr_scaling": "none"}) for i in range(2)]
    assert not fold_lr_scaling(one, "optimizer") and [t.config["optimizer"] for t in one] == ["sgd", "sgd"]
    two = [Trial("grid", f"t{i}", "", {"optimizer": "sgd", "lr_scaling": rule}) for i, rule in
           enumerate(["none", "sqrt"])]
    assert fold_lr_scaling(two, "optimizer")
    assert [t.config["optimizer"] for t in two] == ["sgd, lr none", "sgd, lr sqrt"]
    assert base_value("sgd, lr sqrt") == "sgd" and base_value("var") == "var"
    assert not fold_lr_scaling([Trial("grid", "old", "", {"optimizer": "adam"})], "optimizer")  # stored before


def test_scaling_rules_accepts_old_and_new_forms():
    from study.engine.lr_scaling import scaling_rules

    assert scaling_rules("linear") == ["linear"]
    assert scaling_rules(["none", "sqrt", "none"]) == ["none", "sqrt"]
