"""The numbers of the PCam report's AUC tables, from stored results only: each trial's test AUC with its bootstrap
interval, each configuration's AUC over its seeds, the reference configuration chosen on validation and every other
configuration's test against it (paired t or DeLong, Holm-corrected).

Apart from report.py, which writes these tables and the curves, submissions and noise sections, so the statistics
read and test alone (tests/test_report_pcam.py). Every AUC interval comes from the test predictions each trial stored
(test_predictions.csv in its last checkpoint).
"""

import math

import numpy as np
import pandas as pd

from analysis import stats
from analysis.load import Study
from analysis.trials import Trial
from study import metrics as M

STAGE = "grid"
CONFIG = ["optimizer", "lr", "batch_size"]  # one configuration; its seeds differ in `run`
N_BOOT = 2000  # bootstrap resamples of the test images per trial
SEED = 0  # fixed: the same intervals on every run of the report
ALPHA = 0.05


def _predictions(study: Study, trial: Trial) -> pd.DataFrame | None:
    if M.PREDICTIONS_FILE not in trial.checkpoint_files:
        return None
    frame = study.read_csv(f"{trial.checkpoint}/{M.PREDICTIONS_FILE}")
    return frame.sort_values("index", kind="stable", ignore_index=True)


def _best_val_auc(trial: Trial) -> float:
    """Validation AUC of the trial's best epoch (the weights it tested); NaN without one."""
    best = trial.last(M.BEST_EPOCH, None)
    rows = [r for r in trial.rows if best is not None and best > 0 and r.get(M.EPOCH) == best]
    return float(rows[-1].get(M.VAL_AUC, math.nan)) if rows else math.nan


def trial_table(study: Study) -> tuple[pd.DataFrame, dict]:
    """One row per trial with its stored test AUC and the bootstrap interval from its predictions; and the
    predictions by trial id (for the paired tests)."""
    records, predictions = [], {}
    for t in study.trials(STAGE):
        pred = _predictions(study, t)
        record = {"trial_id": t.trial_id, **{k: t.config.get(k) for k in CONFIG}, "run": t.config.get("run", 0),
                  "momentum": t.config.get("momentum") if t.config.get("optimizer") == "sgd" else None,  # Adam has none
                  "outcome": t.outcome,
                  "epochs": t.last(M.EPOCH, None) if t.rows else None, "best_epoch": t.last(M.BEST_EPOCH, None),
                  "best_val_acc": float(t.last(M.BEST_VAL_ACC)), "best_val_auc": _best_val_auc(t),
                  "test_auc": float(t.last(M.TEST_AUC)),
                  "test_acc": float(t.last(M.TEST_ACC)), "test_images": 0, "auc_from_predictions": math.nan,
                  "ci_low": math.nan, "ci_high": math.nan}
        if pred is not None and len(pred) and t.outcome != "error":
            labels, scores = pred["label"].to_numpy(), pred["probability"].to_numpy(dtype=float)
            record["test_images"] = len(pred)
            if np.isfinite(scores).all() and len(np.unique(labels)) == 2:
                predictions[t.trial_id] = pred
                record["auc_from_predictions"] = stats.auc(labels, scores)
                record["ci_low"], record["ci_high"] = stats.bootstrap_auc_ci(labels, scores, n_boot=N_BOOT, seed=SEED)
        if not math.isfinite(record["test_auc"]):
            record["test_auc"] = record["auc_from_predictions"]
        records.append(record)
    table = pd.DataFrame.from_records(records)
    if len(table):
        table = table.sort_values(CONFIG + ["run", "trial_id"], kind="stable", ignore_index=True)
    return table, predictions


def config_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: test AUC over its seeds (mean and Student-t 95 % interval), or, with one seed, that
    trial's AUC and its bootstrap interval over the test images."""
    rows = []
    for key, part in trials.groupby(CONFIG, sort=True):
        values = part["test_auc"][np.isfinite(part["test_auc"])]
        val = part.loc[np.isfinite(part["test_auc"]), "best_val_auc"].dropna()
        row = dict(zip(CONFIG, key), seeds=len(part), with_auc=len(values),
                   mean_val_auc=float(val.mean()) if len(val) else math.nan,
                   outcomes=", ".join(f"{n} {o}" for o, n in sorted(part["outcome"].value_counts().items())),
                   mean_test_auc=math.nan, ci_low=math.nan, ci_high=math.nan, interval="")
        if len(values) == 1:
            one = part[np.isfinite(part["test_auc"])].iloc[0]
            row.update(mean_test_auc=one["test_auc"], ci_low=one["ci_low"], ci_high=one["ci_high"],
                       interval="bootstrap over test images")
        elif len(values) > 1:
            row["mean_test_auc"], row["ci_low"], row["ci_high"] = stats.mean_ci(values)
            row["interval"] = f"t over {len(values)} seeds"
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def reference_config(configs: pd.DataFrame) -> tuple:
    """The configuration the others are tested against: the highest mean validation AUC of the tested weights
    (never the test AUC, which the tests then judge), among those with a test AUC; of ties, the first in grid
    order. () when none qualifies."""
    ranked = configs[np.isfinite(configs["mean_test_auc"]) & np.isfinite(configs["mean_val_auc"])]
    if ranked.empty:
        return ()
    top = ranked.loc[ranked["mean_val_auc"].idxmax()]
    return tuple(top[k] for k in CONFIG)


def rows_of(trials: pd.DataFrame, key: tuple) -> pd.DataFrame:
    return trials[(trials[CONFIG] == pd.Series(dict(zip(CONFIG, key)))).all(axis=1)]


def _compare(mine: pd.DataFrame, ref: pd.DataFrame, predictions: dict) -> dict:
    """One configuration against the reference: a paired t-test over the seeds both have a test AUC for (two or
    more), else DeLong's test of one trial against the reference's trial with the same seed (else its first) on
    the same test images."""
    mine, ref = mine[np.isfinite(mine["test_auc"])], ref[np.isfinite(ref["test_auc"])]
    both = sorted(set(mine["run"]) & set(ref["run"]))
    if len(both) >= 2:
        a = [mine.loc[mine["run"] == r, "test_auc"].iloc[0] for r in both]
        b = [ref.loc[ref["run"] == r, "test_auc"].iloc[0] for r in both]
        diff, p = stats.paired_t_test(a, b)
        return {"test": f"paired t over {len(both)} seeds", "seeds": ",".join(map(str, both)),
                "test_auc": float(np.mean(a)), "reference_auc": float(np.mean(b)), "difference": diff,
                "p_value": p, "note": "" if math.isfinite(p) else "same difference in every seed: no spread to test"}
    mine, ref = mine[mine["trial_id"].isin(predictions)], ref[ref["trial_id"].isin(predictions)]
    if mine.empty or ref.empty:
        return {"test": "", "note": "no stored test predictions"}
    one = mine.iloc[0]
    same = ref[ref["run"] == one["run"]]
    other = (same if len(same) else ref).iloc[0]
    a, b = predictions[one["trial_id"]], predictions[other["trial_id"]]
    if len(a) != len(b) or not np.array_equal(a["label"].to_numpy(), b["label"].to_numpy()):
        return {"test": "", "note": "different test images: not comparable"}
    auc_a, auc_b, _, p = stats.delong_test(a["label"].to_numpy(), a["probability"].to_numpy(dtype=float),
                                           b["probability"].to_numpy(dtype=float))
    return {"test": "DeLong", "seeds": f"{one['run']} vs {other['run']}", "test_auc": auc_a, "reference_auc": auc_b,
            "difference": auc_a - auc_b, "p_value": p, "note": ""}


def config_tests(trials: pd.DataFrame, configs: pd.DataFrame, predictions: dict) -> tuple[pd.DataFrame, tuple]:
    """Every configuration with a test AUC against the reference (reference_config), one test per configuration,
    p-values Holm-corrected over all of them: a configuration is marked when its corrected p is below ALPHA.
    Returns the table and the reference's key."""
    best = reference_config(configs)
    if not best:
        return pd.DataFrame(), ()
    rows = []
    for _, config in configs[np.isfinite(configs["mean_test_auc"])].iterrows():
        key = tuple(config[k] for k in CONFIG)
        if key == best:
            continue
        record = {**dict(zip(CONFIG, key)), "test": "", "seeds": "", "test_auc": math.nan,
                  "reference_auc": math.nan, "difference": math.nan, "p_value": math.nan, "note": ""}
        record.update(_compare(rows_of(trials, key), rows_of(trials, best), predictions))
        rows.append(record)
    table = pd.DataFrame.from_records(rows, columns=[*CONFIG, "test", "seeds", "test_auc", "reference_auc",
                                                     "difference", "p_value", "note"])
    table["p_holm"] = stats.holm(table["p_value"]) if len(table) else []
    table["significant"] = table["p_holm"] < ALPHA
    return table, best
