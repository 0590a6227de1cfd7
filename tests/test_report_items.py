"""Report details a reader trips over, checked on hand-made tables (no study, no Ray): ties named as ties, CSVs
that hold numbers, footnotes only under a mark, only the hyperparameters that apply, rows a figure leaves out
named."""

import math
from types import SimpleNamespace

import pandas as pd

from analysis import common, stats

from study.mnist import report_time as mnist_time

from study.pcam import report as pcam_report, report_auc as pcam_auc
from analysis.figures import ReportWriter, new_figure


def configs(*rows):
    """config_table rows: (optimizer, lr, batch_size, mean_test_auc, ci_low, ci_high[, mean_val_auc])."""
    return pd.DataFrame.from_records([
        dict(optimizer=o, lr=lr, batch_size=b, seeds=1, with_auc=1, outcomes="1 done", mean_test_auc=v,
             ci_low=lo, ci_high=hi, mean_val_auc=v if val is None else val, interval="bootstrap over test images")
        for o, lr, b, v, lo, hi, val in ((*r, None) if len(r) == 6 else r for r in rows)])


def paired(rows):
    """config_tests rows: (optimizer, lr, batch_size, p_value); Holm's correction as config_tests applies it."""
    table = pd.DataFrame.from_records([
        dict(optimizer=o, lr=lr, batch_size=b, test="DeLong", seeds="0 vs 0", test_auc=0.8, reference_auc=0.9,
             difference=-0.1, p_value=p, note="") for o, lr, b, p in rows])
    table["p_holm"] = stats.holm(table["p_value"])
    table["significant"] = table["p_holm"] < pcam_auc.ALPHA
    return table


def written(tmp_path, cfg, tests, best) -> str:
    report = ReportWriter(tmp_path)
    pcam_report.write_auc_tables(report, pd.DataFrame({"trial_id": []}), cfg, tests, best)
    return report.finish().read_text()


def test_the_reference_is_chosen_on_validation_and_named_with_it(tmp_path):
    # adam wins on test AUC, sgd batch 8 on validation AUC: the reference is the validation winner
    cfg = configs(("sgd", 0.01, 8, 0.9, 0.85, 0.95, 0.97), ("adam", 1e-4, 16, 0.95, 0.9, 0.99, 0.93),
                  ("sgd", 0.01, 16, 0.7, 0.5, 0.9, 0.97))
    best = pcam_auc.reference_config(cfg)
    assert best == ("sgd", 0.01, 8)  # the tie on validation goes to the first in grid order
    text = written(tmp_path, cfg, paired([("adam", 1e-4, 16, 0.5), ("sgd", 0.01, 16, 0.5)]), best)
    assert "Reference configuration: optimizer sgd, lr 0.01, batch_size 8 (mean validation AUC 0.97" in text
    no_val = cfg.assign(mean_val_auc=math.nan)
    assert pcam_auc.reference_config(no_val) == ()


def test_auc_csvs_hold_numbers_and_footnotes_stand_only_under_marks(tmp_path):
    cfg = configs(("sgd", 0.01, 8, 0.9, 0.85, 0.95), ("sgd", 0.01, 16, 0.6, 0.5, 0.7),
                  ("adam", 1e-4, 8, 0.88, 0.8, 0.93))
    tests = paired([("sgd", 0.01, 16, 0.001), ("adam", 1e-4, 8, 0.4)])  # sgd batch 16 differs, adam not
    text = written(tmp_path, cfg, tests, ("sgd", 0.01, 8))
    sgd = pd.read_csv(tmp_path / "auc_sgd.csv")
    for column in ("value", "low", "high", "lr", "batch_size"):
        assert pd.api.types.is_numeric_dtype(sgd[column]), column
    assert sgd.set_index("batch_size").loc[16, ["value", "low", "high"]].tolist() == [0.6, 0.5, 0.7]
    assert sgd["differs_from_best"].tolist() == [False, True]
    sections = text.split("**Test AUC, optimizer ")
    sgd_md, adam_md = (next(s for s in sections if s.startswith(o)) for o in ("sgd", "adam"))
    assert "0.6 [0.5, 0.7] *" in sgd_md and "> * this configuration" in sgd_md
    assert " *" not in adam_md.split("> ")[0] and "> * this configuration" not in adam_md  # no mark, no footnote


def test_trials_table_gives_momentum_to_sgd_only():
    def trial(optimizer, trial_id):
        return SimpleNamespace(trial_id=trial_id, config={"optimizer": optimizer, "lr": 0.01, "batch_size": 8,
                                                          "run": 0, "momentum": 0.9},
                               outcome="done", rows=[{}], checkpoint_files=[], last=lambda k, d=math.nan: d)
    study = SimpleNamespace(trials=lambda stage: [trial("sgd", "a"), trial("adam", "b")])
    table, _ = pcam_auc.trial_table(study)
    momentum = dict(zip(table["optimizer"], table["momentum"]))
    assert momentum["sgd"] == 0.9 and (momentum["adam"] is None or math.isnan(momentum["adam"]))


def test_auc_axis_stays_within_zero_and_one():
    fig, (ax,) = new_figure(1)
    ax.errorbar([8, 16], [0.97, 0.99], yerr=[[0.1, 0.1], [0.1, 0.1]])
    pcam_report.auc_axis(ax)
    low, high = ax.get_ylim()
    assert 0 <= low < 0.87 and high == 1.0


def test_time_to_reach_names_what_it_leaves_out():
    table = pd.DataFrame({"target": ["mean", "mean", "std"], "batch_size": [16, 1024, 512],
                          "runs_reached": [3, 0, 0]})
    assert mnist_time.not_reached(table) == "target mean: batch 1024; target std: batch 512"
    assert mnist_time.not_reached(table.iloc[:1]) == ""


def test_short_node_ids_and_timeline_colours_by_configuration():
    node = "a" * 56
    timing = pd.DataFrame({"stage": ["grid"] * 3, "trial_id": ["x", "y", "z"], "optimizer": ["sgd", "sgd", "adam"],
                           "lr": [0.01, 0.01, 1e-4], "batch_size": [8, 8, 8], "run": [0, 1, 0],
                           "outcome": ["done"] * 3, "node_ip": ["10.0.0.1"] * 3, "node_id": [node] * 3,
                           "gpu_ids": [""] * 3, "start_s": [0.0, 1.0, 2.0], "end_s": [1.0, 2.0, 3.0]})
    assert common.short_id(node) == "aaaaaaaa"
    labels = common.configurations(timing, ["optimizer", "lr", "batch_size", "run"])
    assert labels[0] == labels[1] != labels[2] and "run" not in labels[0]  # seeds of one configuration share it
    fig, hidden, colour = common.timeline_figure(timing, ["optimizer", "lr", "batch_size", "run"])
    legend = fig.axes[0].get_legend()
    assert colour == "configuration" and hidden == 0
    assert [t.get_text() for t in legend.get_texts()] == sorted(set(labels), key=labels.index)
    bars = [p.get_facecolor() for p in fig.axes[0].patches]
    assert bars[0] == bars[1] != bars[2]
