"""The PCam study's report sections, from stored results only: test AUC tables in the original's shape (rows batch
size, columns learning rate, one table per optimizer) with their uncertainty, tests of every configuration against
the one chosen on validation (Holm-corrected), validation curves, submissions and the gradient noise scale.

Called by `python -m analysis.report EXPERIMENT_DIR`; `write(report, study)` adds the sections to a ReportWriter.
The numbers behind the AUC tables (intervals, the reference configuration, the tests against it) are computed in
report_auc.py; this module writes them and the other sections.
"""

import math
import re

import numpy as np
import pandas as pd

from analysis import noise_figures
from analysis.common import fold_lr_scaling
from analysis.figures import ReportWriter, batch_axis, epoch_axis, fmt, legend_below, new_figure
from analysis.load import Study, epoch_table
from study import metrics as M
from study.pcam.report_auc import (ALPHA, CONFIG, N_BOOT, SEED, STAGE, config_table, config_tests, rows_of,
                                   trial_table)

# What analysis.papers reads of this paper (its study.json "study" value, title, stages, labels, config key).
KIND = "pcam"
TITLE = "PCam classification study"
STAGES = (STAGE,)
LABELS = ["optimizer", "lr", "batch_size", "run"]
DETECT = "data_dir"  # the HDF5 folder: only this paper's trials have one


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


def stages(args: dict) -> list:
    return list(STAGES)


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
    tests, best = config_tests(trials, configs, predictions)
    write_auc_tables(report, trials, configs, tests, best)
    write_validation_curves(report, study)
    write_submissions(report, study)
    write_noise(report, study, configs)


def best_description(configs: pd.DataFrame, best: tuple) -> str:
    """The reference configuration in words, with the validation AUC that chose it."""
    if not best:
        return "none (no configuration has both a validation and a test AUC)"
    row = rows_of(configs, best).iloc[0]
    return (", ".join(f"{k} {fmt(v)}" for k, v in zip(CONFIG, best))
            + f" (mean validation AUC {fmt(row['mean_val_auc'])}, test AUC {fmt(row['mean_test_auc'])})")


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
                "A cell without a number names how its trials ended. A diverged trial counts with the test of "
                "its best-on-validation weights from before it diverged, as TensorBoard shows it; its cell names "
                "the outcome.")
    significant = set()
    if len(tests):
        significant = {tuple(r[k] for k in CONFIG) for _, r in tests[tests["significant"]].iterrows()}
    best_text = best_description(configs, best)
    method = (f"* this configuration's test AUC differs from the reference configuration's ({best_text}; chosen "
              f"by validation AUC, not test AUC) at p < {ALPHA} after Holm's correction over the {len(tests)} "
              "configurations tested: a paired t-test on per-seed test AUC over the seeds both trained, or, with "
              "one seed, DeLong's test of the two trials on the same test images (comparisons.csv)")
    for optimizer in sorted(configs["optimizer"].unique()):
        part = configs[configs["optimizer"] == optimizer]
        shown = part.assign(cell=[_cell(r, significant) for _, r in part.iterrows()]).pivot(
            index="batch_size", columns="lr", values="cell").sort_index().sort_index(axis=1)
        shown = shown.fillna("not in grid")
        shown.columns = [f"lr {fmt(c)}" for c in shown.columns]
        shown = shown.reset_index()
        marked = any(tuple(r[k] for k in CONFIG) in significant for _, r in part.iterrows())
        notes = [method] if marked else []
        in_table = tests[tests["optimizer"] == optimizer] if len(tests) else tests
        for r in in_table.itertuples(index=False):
            if math.isfinite(r.p_value):
                notes.append(f"lr {fmt(r.lr)}, batch {r.batch_size}: {r.test}, p = {r.p_value:.3g}, Holm "
                             f"{r.p_holm:.3g}" + (" (significant)" if r.significant else ""))
        report.table("auc_" + re.sub(r"[^A-Za-z0-9]+", "_", optimizer), auc_numbers(part, significant),
                     f"Test AUC, optimizer {optimizer} (rows: batch size; columns: learning rate)", shown=shown,
                     notes=notes)
    report.table("auc_summary", configs, "Test AUC per configuration")
    report.table("trials", trials, "Every trial: stored test AUC, AUC recomputed from its predictions, bootstrap "
                                   "95 % interval")
    if len(tests):
        sig = tests[tests["significant"]]
        report.text(f"Reference configuration: {best_text}. Each other configuration with a test AUC is tested "
                    f"against it once: a paired t-test on per-seed test AUC where both have two or more seeds, "
                    f"DeLong's test on the same test images where one has one seed; the p-values are corrected "
                    f"with Holm's method over the {len(tests)} comparisons (family-wise error rate {ALPHA}). " + (
                        f"{len(sig)} configuration(s) differ from it: " + "; ".join(
                            f"{r.optimizer} lr {fmt(r.lr)} batch {r.batch_size}" for r in sig.itertuples())
                        if len(sig) else f"No configuration differs from it at {ALPHA} after the correction."))
        report.table("comparisons", tests, "Each configuration against the reference chosen on validation "
                                           "(p_holm: Holm-corrected)")
    elif not best:
        report.text("No configuration has both a validation and a test AUC, so no reference and no tests.")
    else:
        report.text("Only the reference configuration has a test AUC: nothing to test against it.")


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
