"""The general report sections of any workload study (study.json "kind": "workload"), driven by the workload.json
the study stored: the workload, its own options and its grid, the primary metric per configuration and per axis
with intervals over runs, every other declared metric per configuration (with curves of those that have a goal),
curves per batch size, run-to-run spread, training speed per batch size and the gradient noise scale.

Called by `python -m analysis.report STUDY`; `write(report, study)` adds the sections, and analysis/report.py then
adds the timing, cost and failure sections every study has. Reads stored results only, never a workload's code,
except one extension point, run only when the user asks for it by --workload-section: when workload.json names
"report": "module:function", that function is imported (from installed packages only) and called as
function(report, study) after the general sections, to add the workload's own section.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd

from analysis import noise_figures
from analysis import workload_figures as F
from analysis import workload_tables as T
from analysis.common import timing_table
from analysis.figures import ReportWriter, fmt
from analysis.load import WORKLOAD_FILE, Study


def labels(study: Study) -> list:
    """The config keys that name a trial in the shared timing and failure tables: the axes, then the repeats."""
    spec = T.spec_of(study)
    return [*spec.axes, *spec.repeats]


def title(study: Study) -> str:
    return f"Workload study {T.spec_of(study).name}"


def write(report: ReportWriter, study: Study, section: str | None = None) -> None:
    spec = T.spec_of(study)
    write_workload(report, study, spec)
    trial_objects = study.trials(spec.stage)
    if not trial_objects:
        report.heading(f"Primary metric: {spec.primary}")
        report.text(f"Stage {spec.stage or '(none)'} has no trials yet.")
        return
    trials = T.trial_frame(trial_objects, spec)
    epochs = T.epoch_frame(trial_objects, spec)
    axes = list(spec.axes)
    configs = T.config_table(trials, axes, spec.primary, spec.others)
    write_primary(report, spec, trials, configs)
    write_others(report, spec, configs, epochs)
    chosen = T.best_rows(configs, ["batch_size"], spec.primary, spec.higher_is_better)
    write_curves(report, spec, epochs, chosen)
    write_spread(report, spec, trials, chosen, trial_objects)
    write_speed(report, study, spec, trials, epochs)
    write_noise(report, spec, trials, trial_objects)
    write_hook(report, study, spec, section)


def write_workload(report: ReportWriter, study: Study, spec: T.Spec) -> None:
    report.heading(f"Workload: {spec.name}")
    if WORKLOAD_FILE not in study.files:
        report.text(f"The study stored no {WORKLOAD_FILE}: the metric directions are unknown (taken as lower is "
                    f"better) and the axes are the config keys that vary between trials.")
    facts = [f"summary: {spec.summary}" if spec.summary else "no summary stored",
             f"primary metric: `{spec.primary}` ({F.direction(spec)})",
             "metrics: " + (", ".join(f"`{c}` ({'higher' if h else 'lower'} is better)" for c, h in spec.metrics)
                            or "none declared"),
             "grid axes: " + ", ".join(f"`{a}`" for a in spec.axes) + (
                 f"; repeated over {', '.join(f'`{r}`' for r in spec.repeats)}" if spec.repeats else "")]
    if spec.goals:
        facts.append("goals: " + ", ".join(f"`{m}` {'≥' if h else '≤'} {fmt(v)}" for m, v, h in spec.goals))
    if spec.chance:
        facts.append("chance level: " + ", ".join(f"`{m}` {fmt(v)}" for m, v in spec.chance.items()))
    facts += options_line(options_of(study.trials(spec.stage)))
    if len(study.expected_stages()) > 1:
        facts.append(f"the sections below cover stage `{spec.stage}`; the timing and failure sections cover all")
    report.bullets(facts)
    axes = study.files.get(WORKLOAD_FILE, {}).get("axes") or {}
    if axes:
        report.text("Grid as stored: " + "; ".join(f"{a}: {json.dumps(v, default=str)}" for a, v in axes.items()))


def write_primary(report: ReportWriter, spec, trials: pd.DataFrame, configs: pd.DataFrame) -> None:
    metric = spec.primary
    report.heading(f"Primary metric: {metric}")
    report.text(f"`{metric}` ({F.direction(spec)}) of every configuration: final = the last epoch's value, best = "
                f"the best value over its trained epochs (epoch 0, the untrained model, excluded). Mean over the "
                f"finished runs with a Student-t 95 % interval (none from a single run). Diverged and errored runs "
                f"have no value: `finished` and `outcomes` count them, and they are never shown as numbers.")
    shown = configs[[*spec.axes, "runs", "finished", "outcomes"]].assign(
        final=[T.cell(r, f"final_{metric}") for _, r in configs.iterrows()],
        best=[T.cell(r, f"best_{metric}") for _, r in configs.iterrows()])
    report.table("configurations", configs, f"Final and best {metric} per configuration, mean [95 % interval]",
                 shown=shown)
    per_trial = trials.rename(columns={"final": f"final_{metric}", "best": f"best_{metric}"})
    report.table("trials", per_trial, f"Every trial: final and best {metric}"
                 + (", every other metric's final and best" if spec.others else "") + ", training seconds, B_simple")
    for axis in spec.axes if len(spec.axes) > 1 else ():  # one axis: the table above is already per batch size
        if configs[axis].nunique(dropna=False) < 2:
            continue
        table = T.axis_table(configs, axis, list(spec.axes), metric, spec.higher_is_better)
        shown = table[[axis, "configurations", "best_configuration", "runs", "finished"]].assign(
            final=[T.cell(r, f"final_{metric}") for _, r in table.iterrows()],
            best=[T.cell(r, f"best_{metric}") for _, r in table.iterrows()])
        report.table(f"axis_{axis}", table, f"{metric} per {axis}: the best configuration at each value "
                                            f"({F.direction(spec)})", shown=shown)


def write_others(report: ReportWriter, spec, configs: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """Every declared metric besides the primary one, per configuration, as the primary's table gives it; and for
    each with a goal, its curves per batch size."""
    if not spec.others:
        return
    report.heading("Other declared metrics")
    report.text("Every other metric the workload declares, per configuration: final and best as for the primary "
                "metric (mean over finished runs [Student-t 95 % interval]); the test split is measured once, after "
                "the last epoch, so it has a final value only. "
                + ", ".join(f"`{m}`: {F.direction(spec, m)}" for m in spec.others) + ".")
    kept = [f"{kind}_{m}" for m in spec.others for kind in ("final", "best") if f"{kind}_{m}" in configs]
    table = configs[[*spec.axes, "runs", "finished", *[c + end for c in kept for end in ("", "_low", "_high")]]]
    shown = configs[[*spec.axes, "finished"]].assign(
        **{c.replace("_", " ", 1): [T.cell(r, c) for _, r in configs.iterrows()] for c in kept})
    report.table("metrics", table, "Final and best of every other declared metric per configuration, mean "
                                   "[95 % interval]", shown=shown)
    for metric in dict.fromkeys(m for m, _, _ in spec.goals):
        if metric == spec.primary or metric not in epochs or f"final_{metric}" not in configs:
            continue
        chosen = T.best_rows(configs, ["batch_size"], metric, spec.higher(metric))
        goals = ", ".join(f"{'≥' if higher else '≤'} {fmt(v)}" for m, v, higher in spec.goals if m == metric)
        report.figure(f"curves_{metric}", F.curves(T.curve_table(epochs, list(spec.axes), metric), chosen, spec,
                                                   metric),
                      f"{metric} ({F.direction(spec, metric)}, goal {goals}) vs epoch, examples seen and steps, per "
                      f"batch size" + (f" (each its best configuration by final {metric})" if len(spec.axes) > 1
                                       else ""))


def options_line(options: dict) -> list:
    """The header's bullet of the workload's own options (none when it has none): `name` value, ..."""
    return ["the workload's own options: " + ", ".join(f"`{name}` {', '.join(fmt(v) for v in values)}"
                                                       for name, values in options.items())] if options else []


def options_of(trials: list) -> dict:
    """The workload's own options (each trial's config "options", as params.json stores it): name -> the values
    the trials ran with, in order of first appearance."""
    values = {}
    for t in trials:
        for name, value in (t.config.get("options") or {}).items():
            values.setdefault(name, [])
            if value not in values[name]:
                values[name].append(value)
    return values


def write_curves(report: ReportWriter, spec, epochs: pd.DataFrame, chosen: pd.DataFrame) -> None:
    report.heading("Curves per batch size")
    if epochs.empty:
        report.text("No trial has reported an epoch yet.")
        return
    curve = T.curve_table(epochs, list(spec.axes))
    several = len(spec.axes) > 1
    report.text(f"`{spec.primary}` and the training loss after each epoch, against epochs, training examples seen "
                f"and optimizer steps: a line per batch size, the mean over runs with a finite value (a diverged run "
                f"stops counting at its first NaN), band min to max."
                + (" Each batch size shows its best configuration by final mean." if several else ""))
    report.table("curves", curve.rename(columns=lambda c: c.replace("metric_", f"{spec.primary}_")),
                 f"Per configuration and epoch: {spec.primary} and training loss, mean (min, max) over runs")
    report.figure("curves", F.curves(curve, chosen, spec),
                  f"{spec.primary} (top) and training loss (bottom) vs epoch, examples seen and steps, per batch size")


def write_spread(report: ReportWriter, spec, trials, chosen, trial_objects) -> None:
    report.heading("Run-to-run spread")
    spread = T.spread_table(trials, list(spec.axes))
    report.table("spread", spread, f"Final {spec.primary} over runs per configuration (finished runs only)",
                 notes=["cv = coefficient of variation, std (ddof 1) / mean; – with fewer than 2 finished runs."])
    if not F.has_finite(spread["mean"]):
        report.text("No run has finished yet: nothing to draw against batch size.")
        return
    report.figure("sensitivity", F.sensitivity(spread, chosen, trial_objects, spec),
                  f"Final {spec.primary} vs batch size: mean over runs, bars min to max; B_simple per batch size "
                  f"dotted")


def write_speed(report: ReportWriter, study: Study, spec, trials, epochs) -> None:
    report.heading("Training speed per batch size")
    timing = T.timing_by_batch(epochs, trials, timing_table(study, []))
    report.text("Seconds per epoch and images per second: medians over the trials' trained epochs (training only, "
                "evaluation excluded). Mean training seconds: over finished trials. GPU-seconds: each trial's GPU "
                "share x its wall seconds, summed (0 on CPU).")
    report.table("speed", timing, "Training speed and cost per batch size")
    if timing.empty or not F.has_finite(timing["seconds_per_epoch"]):
        report.text("No trial has finished a training epoch yet: nothing to draw.")
        return
    report.figure("speed", F.speed(timing, trials), "Seconds per epoch, images per second and training seconds "
                                                     "per trial vs batch size")


def write_noise(report: ReportWriter, spec, trials, trial_objects) -> None:
    report.heading("Gradient noise scale")
    table = T.noise_by_batch(trials)
    if table.empty:
        report.text("No trial measured a finite gradient noise scale (B_simple); the study ran with the noise "
                    "scale off, or every estimate was NaN (see the per-trial table for why).")
    else:
        report.text("B_simple (McCandlish et al. 2018) per batch size: each trial's B_simple (as in the per-trial "
                    "table below), summarised over the trials at that batch size. Batches well below it use "
                    "examples efficiently; well above it the returns per example fall.")
        report.table("noise_scale", table, "Measured gradient noise scale B_simple per batch size (examples)")
    others = [a for a in spec.axes if a != "batch_size"]
    noise_figures.write(report, trial_objects, [*spec.axes, *spec.repeats],
                        lambda c: ", ".join(f"{a} {fmt(T.axis_value(c, a))}" for a in others) or spec.name)


def write_hook(report: ReportWriter, study: Study, spec, section: str | None = None) -> None:
    """The workload's own section, named in workload.json as "report": "module:function", run only when the user
    asks (`section`, from --workload-section: "" for the stored name, else MODULE:FUNCTION or FILE.py:FUNCTION).
    A stored name is code named by a file anyone who could write the study folder may have written, so it is
    imported from installed packages only (see import_installed). A section that fails is named, and the report
    goes on."""
    if section is None:
        if spec.hook:
            report.heading(f"{spec.name}: the workload's own section")
            report.text(f"workload.json names a report section of the workload's own: `{spec.hook}` was not run. "
                        f"{SECTION_HOW}")
        return
    named = section or spec.hook
    if not named:
        return
    where, _, name = named.rpartition(":")
    try:
        getattr(import_file(where) if section_file(named) else import_installed(where), name)(report, study)
    except Exception as err:  # the workload's code, not ours: one line in the report, the general sections stand
        report.heading(f"{spec.name}: the workload's own section")
        report.text(f"The workload's report section `{named}` failed: {type(err).__name__}: {err}")


SECTION_HOW = ("The report runs no code a study folder names unless asked: pass --workload-section to import it "
               "from an installed package, or --workload-section FILE.py:FUNCTION for a file of your own.")


def section_file(named: str) -> bool:
    """FILE.py:FUNCTION (a file the user names) rather than MODULE:FUNCTION (an installed module)."""
    where = named.rsplit(":", 1)[0]
    return where.endswith(".py") or "/" in where or os.sep in where


def import_file(path: str):
    """The module in a file the user named on the command line."""
    spec = importlib.util.spec_from_file_location(f"workload_section_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import has it (dataclasses and pickling look the module up there)
    spec.loader.exec_module(module)
    return module


def import_installed(module: str):
    """Import `module` from installed packages only. `python -m` puts the current folder first on the import path,
    where a study copied down into ./results/NAME makes `results.NAME.section` importable (a namespace package);
    the current folder is taken off the path for this import."""
    here = os.path.realpath(os.getcwd())
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if p and os.path.realpath(p) != here]
    try:
        return importlib.import_module(module)
    finally:
        sys.path[:] = saved
