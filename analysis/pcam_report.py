"""The PCam study's report sections, from stored results only: test AUC tables in the original's shape (rows batch
size, columns learning rate, one table per optimizer) with their uncertainty, DeLong tests against the best
configuration, validation curves, submissions and the gradient noise scale.

Called by `python -m analysis.report EXPERIMENT_DIR`; `write(report, study)` adds the sections to a ReportWriter.
Every AUC interval comes from the test predictions each trial stored (test_predictions.csv in its last checkpoint).
"""

import math
import re

import numpy as np
import pandas as pd

from analysis import noise_figures, stats
from analysis.common import fold_lr_scaling
from analysis.figures import ReportWriter, batch_axis, epoch_axis, fmt, legend_below, new_figure
from analysis.load import Study, Trial, epoch_table
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
                  "best_val_acc": float(t.last(M.BEST_VAL_ACC)), "test_auc": float(t.last(M.TEST_AUC)),
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
        row = dict(zip(CONFIG, key), seeds=len(part), with_auc=len(values),
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


def best_configs(configs: pd.DataFrame) -> list:
    """The keys of every configuration with the highest test AUC: one, or several when they tie."""
    ranked = configs[np.isfinite(configs["mean_test_auc"])]
    if ranked.empty:
        return []
    top = ranked[ranked["mean_test_auc"] == ranked["mean_test_auc"].max()]
    return [tuple(row[k] for k in CONFIG) for _, row in top.iterrows()]


def paired_tests(trials: pd.DataFrame, configs: pd.DataFrame, predictions: dict) -> tuple[pd.DataFrame, tuple]:
    """DeLong's test of every trial against the best configuration's trial with the same seed (paired: the same
    test images). Returns the table and the best configuration's key (of tied ones, the first in grid order)."""
    tied = best_configs(configs)
    if not tied:
        return pd.DataFrame(), ()
    best = tied[0]
    best_trials = trials[(trials[CONFIG] == pd.Series(dict(zip(CONFIG, best)))).all(axis=1)]
    best_trials = best_trials[best_trials["trial_id"].isin(predictions)]
    rows = []
    for row in trials.itertuples(index=False):
        if row.trial_id not in predictions or best_trials.empty:
            continue
        same_seed = best_trials[best_trials["run"] == row.run]
        reference = (same_seed if len(same_seed) else best_trials).iloc[0]
        a, b = predictions[row.trial_id], predictions[reference["trial_id"]]
        record = {**{k: getattr(row, k) for k in CONFIG}, "run": row.run, "trial_id": row.trial_id,
                  "best_trial_id": reference["trial_id"], "test_auc": math.nan, "best_auc": math.nan, "z": math.nan,
                  "p_value": math.nan, "significant": False, "note": ""}
        if row.trial_id == reference["trial_id"]:
            record["note"] = "best configuration itself"
        elif len(a) != len(b) or not np.array_equal(a["label"].to_numpy(), b["label"].to_numpy()):
            record["note"] = "different test images: not comparable"
        else:
            auc_a, auc_b, z, p = stats.delong_test(a["label"].to_numpy(), a["probability"].to_numpy(dtype=float),
                                                   b["probability"].to_numpy(dtype=float))
            record.update(test_auc=auc_a, best_auc=auc_b, z=z, p_value=p, significant=bool(p < ALPHA))
        rows.append(record)
    return pd.DataFrame.from_records(rows), best


def _cell(config: pd.Series, marks: set) -> str:
    if not math.isfinite(config["mean_test_auc"]):
        return config["outcomes"]  # e.g. "1 error": shown as such, never as a number
    text = fmt(config["mean_test_auc"])
    if math.isfinite(config["ci_low"]):
        text += f" [{fmt(config['ci_low'])}, {fmt(config['ci_high'])}]"
    if config["with_auc"] > 1:
        text += f" (n={config['with_auc']})"
    if config["seeds"] > config["with_auc"] or "done" not in config["outcomes"]:
        text += f" ({config['outcomes']})"
    if tuple(config[k] for k in CONFIG) in marks:
        text += " *"
    return text


def write(report: ReportWriter, study: Study) -> None:
    if fold_lr_scaling(study.trials(STAGE), "optimizer"):
        report.text("The grid ran several learning-rate scaling rules (a grid axis, same seeds): each optimizer is "
                    "shown once per rule, as 'optimizer, lr rule'; the learning rates are the base rates.")
    trials, predictions = trial_table(study)
    if trials.empty:
        report.heading("Test AUC")
        report.text("The grid has no trials yet.")
        return
    configs = config_table(trials)
    tests, best = paired_tests(trials, configs, predictions)
    write_auc_tables(report, trials, configs, tests, best)
    write_validation_curves(report, study)
    write_submissions(report, study)
    write_noise(report, study, configs)


def best_description(configs: pd.DataFrame, best: tuple) -> str:
    """The best configuration in words; tied ones are all named, and which one the tests use."""
    if not best:
        return "none (no test AUC yet)"
    tied = best_configs(configs)
    words = [", ".join(f"{k} {fmt(v)}" for k, v in zip(CONFIG, key)) for key in tied]
    if len(tied) < 2:
        return words[0] if words else ", ".join(f"{k} {fmt(v)}" for k, v in zip(CONFIG, best))
    return (f"a tie of {len(tied)} configurations at test AUC {fmt(configs['mean_test_auc'].max())} "
            f"({'; '.join(words)}); the tests compare against the first, {words[0]}")


def auc_numbers(part: pd.DataFrame, significant: set) -> pd.DataFrame:
    """One optimizer's AUC table as numbers, for its CSV: a row per (batch size, lr) with value, low, high."""
    table = part[["batch_size", "lr", "mean_test_auc", "ci_low", "ci_high", "with_auc", "seeds", "outcomes",
                  "interval"]].rename(columns={"mean_test_auc": "value", "ci_low": "low", "ci_high": "high",
                                               "with_auc": "n"})
    table["differs_from_best"] = [tuple(r[k] for k in CONFIG) in significant for _, r in part.iterrows()]
    return table.sort_values(["batch_size", "lr"], ignore_index=True)


def write_auc_tables(report, trials, configs, tests, best) -> None:
    report.heading("Test AUC")
    report.text("Test AUC of the best-on-validation model of each trial. With one seed per configuration the "
                f"interval is the 95 % percentile bootstrap over the test images ({N_BOOT} stratified resamples, "
                f"seed {SEED}); with several seeds it is the mean and Student-t 95 % interval across seeds. "
                "A cell without a number names how its trials ended.")
    significant = set()
    if len(tests):
        significant = {tuple(r[k] for k in CONFIG) for _, r in tests[tests["significant"]].iterrows()}
    best_text = best_description(configs, best)
    for optimizer in sorted(configs["optimizer"].unique()):
        part = configs[configs["optimizer"] == optimizer]
        shown = part.assign(cell=[_cell(r, significant) for _, r in part.iterrows()]).pivot(
            index="batch_size", columns="lr", values="cell").sort_index().sort_index(axis=1)
        shown = shown.fillna("not in grid")
        shown.columns = [f"lr {fmt(c)}" for c in shown.columns]
        shown = shown.reset_index()
        marked = any(tuple(r[k] for k in CONFIG) in significant for _, r in part.iterrows())
        notes = [] if not marked else [f"* a trial of this configuration differs in AUC from the best configuration ({best_text}) at "
                 f"p < {ALPHA}: DeLong's paired test against its trial with the same seed, on the same test images "
                 f"(per-trial p-values below and in delong.csv). The p-values are not corrected for the number of "
                 f"comparisons, and the best configuration was picked by its test AUC, which favours finding it "
                 f"better: read a p-value near {ALPHA} as a hint, not a finding."]
        in_table = tests[tests["optimizer"] == optimizer] if len(tests) else tests
        for r in in_table.itertuples(index=False):
            if math.isfinite(r.p_value):
                notes.append(f"lr {fmt(r.lr)}, batch {r.batch_size}, seed {r.run}: p = {r.p_value:.3g}"
                             + (" (significant)" if r.significant else ""))
        report.table("auc_" + re.sub(r"[^A-Za-z0-9]+", "_", optimizer), auc_numbers(part, significant),
                     f"Test AUC, optimizer {optimizer} (rows: batch size; columns: learning rate)", shown=shown,
                     notes=notes)
    report.table("auc_summary", configs, "Test AUC per configuration")
    report.table("trials", trials, "Every trial: stored test AUC, AUC recomputed from its predictions, bootstrap "
                                   "95 % interval")
    if len(tests):
        sig = tests[tests["significant"]]
        report.text(f"Best configuration: {best_text}. " + (
            f"{len(sig)} trial(s) differ from it significantly at {ALPHA}: " + "; ".join(
                f"{r.optimizer} lr {fmt(r.lr)} batch {r.batch_size} seed {r.run}" for r in sig.itertuples())
            if len(sig) else f"No trial differs from it significantly at {ALPHA}."))
        report.table("delong", tests, "DeLong's paired test of each trial against the best configuration")
    else:
        report.text("No trial stored test predictions, so no intervals or paired tests.")


def write_validation_curves(report: ReportWriter, study: Study) -> None:
    report.heading("Validation curves")
    trials = study.trials(STAGE)
    epochs = epoch_table(trials, CONFIG + ["run"], [M.VAL_ACC, M.VAL_AUC])
    best_epoch = {t.trial_id: t.last(M.BEST_EPOCH, None) for t in trials}
    if epochs.empty:
        report.text("No epoch has been reported yet.")
        return
    report.table("validation", epochs, "Validation accuracy and AUC per trial and epoch")
    panels = sorted({(o, lr) for o, lr in zip(epochs["optimizer"], epochs["lr"])})
    batches = sorted(epochs["batch_size"].unique())
    colours = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    # Trials often draw the same curve (a small validation set, a converged model): each batch size gets its own
    # marker and dash, and earlier lines are wider, so a line drawn over another still shows both.
    styles = {b: dict(marker="os^Dv<>"[i % 7], linestyle=("-", "--", ":", "-.")[i % 4],
                      linewidth=1 + 2.0 * (len(batches) - 1 - i) / max(len(batches) - 1, 1), alpha=0.85)
              for i, b in enumerate(batches)}
    for metric, label in ((M.VAL_ACC, "validation accuracy"), (M.VAL_AUC, "validation AUC")):
        fig, axes = new_figure(len(panels))
        for ax, (optimizer, lr) in zip(axes, panels):
            part = epochs[(epochs["optimizer"] == optimizer) & (epochs["lr"] == lr)]
            labelled = set()
            for trial_id, line in part.groupby("trial_id", sort=True):
                batch = line["batch_size"].iloc[0]
                line = line.sort_values(M.EPOCH)
                ax.plot(line[M.EPOCH], line[metric], color=colours[batch], **styles[batch],
                        label=None if batch in labelled else f"batch {batch}")
                labelled.add(batch)
                at = line[line[M.EPOCH] == best_epoch.get(trial_id)]
                if len(at):
                    ax.plot(at[M.EPOCH], at[metric], "*", color=colours[batch], markersize=11,
                            markeredgecolor="black")
            epoch_axis(ax)
            if metric == M.VAL_AUC:
                auc_axis(ax)
            ax.set_ylabel(label)
            ax.set_title(f"{optimizer}, lr {lr:g}")
            handles, names = ax.get_legend_handles_labels()
            order = sorted(range(len(names)), key=lambda i: int(names[i].split()[-1]))
            ax.legend([handles[i] for i in order], [names[i] for i in order])
        caption = (f"{label[0].upper() + label[1:]} per epoch (epoch 0: before training); a line per trial, "
                   "colour, marker and dash by batch size; star: best epoch")
        report.figure(f"validation_{metric}", fig, caption)


def write_submissions(report: ReportWriter, study: Study) -> None:
    rows = [{**{k: t.config.get(k) for k in CONFIG}, "run": t.config.get("run", 0), "trial_id": t.trial_id,
             "path": f"{study.uri.rstrip('/')}/{t.checkpoint[len(study.path) + 1:]}/{M.SUBMISSION_FILE}"}
            for t in study.trials(STAGE) if M.SUBMISSION_FILE in t.checkpoint_files]
    if rows:
        report.heading("Kaggle submissions")
        report.table("submissions", pd.DataFrame.from_records(rows).sort_values(CONFIG + ["run"], ignore_index=True),
                     f"{M.SUBMISSION_FILE} files (id, label = predicted probability of the best-on-validation model)")


def auc_axis(ax) -> None:
    """An AUC axis never shows values outside [0, 1] (an interval's whisker can reach past them)."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low), min(1.0, high))


def write_noise(report: ReportWriter, study: Study, configs: pd.DataFrame) -> None:
    report.heading("Sensitivity to the batch size and the gradient noise scale")
    trials = study.trials(STAGE)
    optimizers = sorted(configs["optimizer"].unique())
    fig, axes = new_figure(len(optimizers))
    marked = False
    for ax, optimizer in zip(axes, optimizers):
        part = configs[configs["optimizer"] == optimizer]
        for lr, line in part.groupby("lr", sort=True):
            ok = line[np.isfinite(line["mean_test_auc"])]
            ax.errorbar(ok["batch_size"], ok["mean_test_auc"],
                        yerr=[ok["mean_test_auc"] - ok["ci_low"].fillna(ok["mean_test_auc"]),
                              ok["ci_high"].fillna(ok["mean_test_auc"]) - ok["mean_test_auc"]],
                        marker="o", capsize=3, label=f"lr {lr:g}")
        marked |= noise_figures.overlay(ax, [t for t in trials if t.config.get("optimizer") == optimizer])
        batch_axis(ax, configs["batch_size"])
        auc_axis(ax)
        ax.set_ylabel("test AUC")
        ax.set_title(f"optimizer {optimizer}")
        legend_below(ax)
    report.text("Test AUC against batch size with its 95 % interval. " + (
        "Dotted, right axis: the gradient noise scale B_simple each batch size's runs measured (median of each "
        "trial's last finite value, bars min to max over runs); where the curve's batch size passes B_simple, "
        "theory puts its knee." if marked
        else "No trial measured a finite gradient noise scale (B_simple), so none is drawn."))
    report.figure("sensitivity", fig, "Test AUC vs batch size per optimizer, a line per learning rate")
    noise_figures.write(report, trials, CONFIG, lambda c: f"{c.get('optimizer')}, lr {c.get('lr'):g}")
