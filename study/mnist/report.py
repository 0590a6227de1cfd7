"""The MNIST regression study's report sections (the original paper's Figures 5-12), from stored results only.

Called by `python -m analysis.report EXPERIMENT_DIR`; `write(report, study)` adds the sections to a ReportWriter.
"Final" MSE is the last epoch's test MSE of a trial that finished; diverged and errored trials have none. The
training-time section is report_time.py's.
"""

import math

import numpy as np
import pandas as pd

from analysis import noise_figures, stats
from analysis.common import base_value, fold_lr_scaling
from analysis.figures import ReportWriter, batch_axis, epoch_axis, legend_below, log_scale_if_wide, new_figure
from analysis.load import Study, epoch_table, trial_table
from study import metrics as M
from study.mnist.report_time import write_time

TARGET_ORDER = ("mean", "median", "std", "var")  # the variance is ~100x the others: it gets its own axis
# What analysis.papers reads of this paper (its study.json "study" value, title, stages, labels, config key).
KIND = "mnist"
TITLE = "MNIST regression study"
STAGES = ("lr_coarse", "lr_fine", "batch_sweep")
LABELS = ["target", "batch_size", "lr", "run"]
DETECT = "target"  # a regression target: only this paper's trials have one


def stages(args: dict) -> list:
    """The stages a study with these arguments runs: a given --lr skips the learning-rate search."""
    return ["batch_sweep"] if args.get("lr") is not None else list(STAGES)


def _targets(values) -> list:
    """Targets in the paper's order (each rule of a target after it, see fold_lr_scaling), then any others."""
    rank = {t: i for i, t in enumerate(TARGET_ORDER)}
    return sorted(set(values), key=lambda t: (rank.get(base_value(t), len(rank)), str(t)))


def _groups(targets: list) -> list:
    """Panels of targets sharing an axis: the variance alone, the rest together."""
    return [g for g in ([t for t in targets if base_value(t) != "var"], [t for t in targets if base_value(t) == "var"])
            if g]


def sweep_table(study: Study) -> pd.DataFrame:
    """One row per stage-2 trial, with final_test_mse set only for trials that finished."""
    table = trial_table(study.trials("batch_sweep"), LABELS, [M.TEST_MSE, M.TRAIN_SECONDS])
    # The last row's test MSE only counts for a finished trial, and the last noise scale is its last finite one:
    # each replaces the raw column rather than repeating it.
    table["final_test_mse"] = table.pop(M.TEST_MSE).where(table["outcome"] == "done")
    table["last_noise_scale"] = [noise_figures.trial_noise(t) for t in study.trials("batch_sweep")]
    return table.sort_values(["target", "batch_size", "run", "trial_id"], kind="stable", ignore_index=True)


def write(report: ReportWriter, study: Study) -> None:
    write_lr_search(report, study)
    write_target_distributions(report, study)
    if fold_lr_scaling(study.trials("batch_sweep"), "target"):
        report.text("The sweep ran several learning-rate scaling rules (a grid axis, same seeds): from here on each "
                    "target is shown once per rule, as 'target, lr rule'.")
    if not study.trials("batch_sweep"):
        report.heading("Batch-size sweep")
        report.text("Stage 2 (batch_sweep) has no trials yet.")
        return
    sweep = sweep_table(study)
    epochs = epoch_table(study.trials("batch_sweep"), LABELS, [M.TEST_MSE, M.TRAIN_SECONDS, M.NOISE_SCALE])
    report.heading("Batch-size sweep: every trial")
    report.table("sweep_trials", sweep, "Stage 2 trials: final test MSE (finished trials only), training seconds")
    if epochs.empty:
        report.text("No stage-2 trial has reported an epoch yet.")
        return
    write_convergence(report, epochs)
    write_sensitivity(report, study, sweep)
    write_spread(report, sweep)
    write_time(report, sweep, epochs, _targets(sweep["target"]))
    write_noise(report, sweep)
    noise_figures.write(report, study.trials("batch_sweep"), LABELS, lambda c: f"target {c.get('target')}")


def write_lr_search(report: ReportWriter, study: Study) -> None:
    report.heading("Stage 1: learning-rate search")
    trials = study.trials("lr_coarse") + study.trials("lr_fine")
    if study.args.get("lr") is not None:
        report.text(f"The learning rate was given with --lr {study.args['lr']:g} for every target; no search ran.")
        return
    if not trials:
        report.text("No learning-rate search trials are stored.")
        return
    chosen = study.files.get(M.CHOSEN_FILE, {})
    key = next((c["selected_on"] for c in chosen.values() if c.get("selected_on") in (M.VAL_MSE, M.TEST_MSE)),
               M.VAL_MSE if study.args.get("select_on", "val") == "val" else M.TEST_MSE)
    table = trial_table(trials, ["target", "lr", "lr_factor", "batch_size"], [M.VAL_MSE, M.TEST_MSE])
    table["lr_factor"] = table["lr_factor"].where(table["stage"] == "lr_fine")  # only the fine grid has factors
    table["chosen"] = [t in chosen and math.isclose(lr, chosen[t]["lr"], rel_tol=1e-9)
                       for t, lr in zip(table["target"], table["lr"])]
    table = table.sort_values(["target", "lr", "stage", "trial_id"], kind="stable", ignore_index=True)
    report.text(f"Each target's rate is chosen on the final {key} among trials that finished (not diverged). "
                f"Coarse grid first, then the fine grid as factors of the best coarse rate.")
    report.table("lr_search", table,
                 f"Learning-rate search: final MSE per trial; chosen = the rate in {M.CHOSEN_FILE}")
    if chosen:
        rows = [{"target": t, "chosen_lr": c.get("lr"), "coarse_lr": c.get("coarse_lr"), "mse": c.get("mse"),
                 "selected_on": c.get("selected_on")} for t, c in sorted(chosen.items())]
        report.table("chosen_lr", pd.DataFrame.from_records(rows), "Chosen learning rate per target")
    else:
        report.text(f"{M.CHOSEN_FILE} is not stored yet: the search has not finished.")
    targets = _targets(table["target"])
    fig, axes = new_figure(len(targets))
    for ax, target in zip(axes, targets):
        part = table[table["target"] == target]
        for stage, marker in (("lr_coarse", "o"), ("lr_fine", "s")):
            ok = part[(part["stage"] == stage) & np.isfinite(part[key]) & (part["outcome"] == "done")]
            ax.plot(ok["lr"], ok[key], marker, linestyle="", label=stage.replace("_", " "))
        bad = part[part["outcome"] != "done"]
        if len(bad):  # no MSE to plot: drawn along the top edge so the reader sees they ran
            ax.plot(bad["lr"], [0.97] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(),
                    label="diverged / failed")
        ax.set_xscale("log")
        log_scale_if_wide(ax, part[key])
        if target in chosen:
            ax.axvline(chosen[target]["lr"], color="black", linestyle=":", linewidth=1,
                       label=f"chosen {chosen[target]['lr']:.3g}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {key} (target units²)")
        ax.set_title(f"target: {target}")
        ax.legend()
    report.figure("lr_search", fig, f"Learning-rate search: final {key} vs learning rate, chosen rate dotted")


def write_target_distributions(report: ReportWriter, study: Study) -> None:
    report.heading("Target distributions")
    summaries = study.files.get(M.TARGET_STATS_FILE)
    if not summaries:
        report.text(f"The study did not store {M.TARGET_STATS_FILE} (box-plot statistics of each target over the "
                    f"training images), so the target distributions cannot be drawn; the report never reads images.")
        return
    ran = study.args.get("targets") or list(summaries)
    targets = _targets([t for t in summaries if t in ran])  # the file has all four; the study may run fewer
    rows = [{"target": t, **{k: summaries[t].get(k) for k in ("n", "min", "whislo", "q1", "med", "mean", "q3",
                                                             "whishi", "max")}} for t in targets]
    report.table("target_stats", pd.DataFrame.from_records(rows),
                 "Each target over the training images (0..255 pixel scale; whiskers at 1.5 IQR)")
    groups = _groups(targets)
    fig, axes = new_figure(len(groups), width=4.2)
    for ax, group in zip(axes, groups):
        boxes = [{**{k: summaries[t][k] for k in ("whislo", "q1", "med", "q3", "whishi")},
                  "mean": summaries[t].get("mean"), "fliers": [], "label": t} for t in group]
        ax.bxp(boxes, showmeans=all(b["mean"] is not None for b in boxes))
        ax.set_ylabel("variance (pixel units²)" if group == ["var"] else "target value (pixel units)")
        ax.set_xlabel("target")
    report.figure("target_distributions", fig, "Distribution of each regression target over the training images")


def _curve_panels(targets):
    fig, axes = new_figure(len(targets))
    return fig, dict(zip(targets, axes))


def write_convergence(report: ReportWriter, epochs: pd.DataFrame) -> None:
    report.heading("Convergence")
    finite = epochs[np.isfinite(epochs[M.TEST_MSE])]
    curve = (finite.groupby(["target", "batch_size", M.EPOCH])[M.TEST_MSE]
             .agg(runs="count", mean="mean", min="min", max="max").reset_index()
             .rename(columns={"mean": "mean_test_mse", "min": "min_test_mse", "max": "max_test_mse"}))
    report.text("Test MSE after each epoch (epoch 0: before training), averaged over the runs with a finite value; "
                "a diverged run stops contributing at the epoch its loss became NaN.")
    report.table("convergence", curve, "Test MSE per epoch, per target and batch size")
    targets = _targets(epochs["target"])
    fig, axes = _curve_panels(targets)
    for target, ax in axes.items():
        part = curve[curve["target"] == target]
        for batch, line in part.groupby("batch_size"):
            ax.plot(line[M.EPOCH], line["mean_test_mse"], marker="o", label=f"batch {batch}")
        log_scale_if_wide(ax, part["mean_test_mse"])
        epoch_axis(ax)
        ax.set_ylabel("test MSE (target units²)")
        ax.set_title(f"target: {target}")
        ax.legend()
    report.figure("convergence", fig, "Convergence: test MSE per epoch, a line per batch size (mean over runs)")


def spread_table(sweep: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (target, batch), part in sweep.groupby(["target", "batch_size"], sort=True):
        s = stats.spread(part["final_test_mse"].dropna())
        rows.append({"target": target, "batch_size": batch, "runs": len(part), "finished": s["n"],
                     "not_finished": len(part) - s["n"], "min": s["min"], "mean": s["mean"], "max": s["max"],
                     "std": s["std"], "cv": s["cv"]})
    return pd.DataFrame.from_records(rows)


def write_sensitivity(report: ReportWriter, study: Study, sweep: pd.DataFrame) -> None:
    report.heading("Sensitivity to the batch size")
    spread = spread_table(sweep)
    targets = _targets(sweep["target"])
    drawn = False
    groups = _groups(targets)
    fig, axes = new_figure(len(groups))
    for ax, group in zip(axes, groups):
        for target in group:
            part = spread[(spread["target"] == target) & (spread["finished"] > 0)]
            lines = ax.errorbar(part["batch_size"], part["mean"], yerr=[part["mean"] - part["min"],
                                                                        part["max"] - part["mean"]],
                                marker="o", capsize=3, label=f"target: {target}")
            drawn |= noise_figures.overlay(ax, [x for x in study.trials("batch_sweep")
                                                if x.config.get("target") == target],
                                           lines[0].get_color(), f"target {target}: ")
        batch_axis(ax, sweep["batch_size"])
        log_scale_if_wide(ax, spread[spread["target"].isin(group)]["mean"])
        ax.set_ylabel("final test MSE (target units²)")
        ax.set_title("variance target" if group == ["var"] else "targets: " + ", ".join(group))
        legend_below(ax)
    note = ("Dotted, right axis: the gradient noise scale B_simple each batch size's runs measured (median of "
            "each trial's last finite value, bars min to max over runs); where the curve's batch size passes "
            "B_simple, theory puts its knee." if drawn
            else "No trial measured a finite gradient noise scale, so none is drawn.")
    report.text("Final test MSE against batch size: mean over finished runs, bars from min to max. " + note)
    report.figure("sensitivity", fig, "Final test MSE vs batch size per target (variance on its own axis)")


def write_spread(report: ReportWriter, sweep: pd.DataFrame) -> None:
    report.heading("Run-to-run spread")
    spread = spread_table(sweep)
    report.table("spread", spread, "Final test MSE over runs per batch size (finished runs only)",
                 notes=["cv = coefficient of variation, std (ddof 1) / mean; – with fewer than 2 finished runs."])
    targets = _targets(sweep["target"])
    fig, axes = new_figure(len(targets) + 1)
    for ax, target in zip(axes, targets):
        part = spread[(spread["target"] == target) & (spread["finished"] > 0)]
        # arrays, not Series: numpy 1.24's masked arrays take a pandas Series's _data (its block manager)
        ax.fill_between(part["batch_size"].to_numpy(), part["min"].to_numpy(float), part["max"].to_numpy(float),
                        alpha=0.3, label="min–max over runs")
        ax.plot(part["batch_size"], part["mean"], marker="o", label="mean over runs")
        batch_axis(ax, sweep["batch_size"])
        log_scale_if_wide(ax, list(part["min"]) + list(part["max"]))
        ax.set_ylabel("final test MSE (target units²)")
        ax.set_title(f"target: {target}")
        ax.legend()
    ax = axes[-1]
    for target in targets:
        part = spread[spread["target"] == target]
        ax.plot(part["batch_size"], part["cv"], marker="o", label=f"target: {target}")
    batch_axis(ax, sweep["batch_size"])
    ax.set_ylabel("coefficient of variation (std / mean)")
    ax.set_title("run-to-run variation")
    ax.legend()
    report.figure("spread", fig, "Run-to-run spread of the final test MSE per batch size, and its CV")


def write_noise(report: ReportWriter, sweep: pd.DataFrame) -> None:
    report.heading("Gradient noise scale")
    finite = sweep[np.isfinite(sweep["last_noise_scale"])]
    if finite.empty:
        report.text("No trial measured a finite gradient noise scale (B_simple); the study ran with "
                    "--no-noise-scale, or every estimate was NaN.")
        return
    table = (finite.groupby(["target", "batch_size"])["last_noise_scale"]
             .agg(trials="count", median="median", min="min", max="max").reset_index())
    report.text("B_simple (McCandlish et al. 2018) per configuration: the last finite value of each trial, "
                "summarised over runs. Batches well below it use examples efficiently; well above it the returns "
                "per example fall.")
    report.table("noise_scale", table, "Measured gradient noise scale B_simple (images)")
