"""The tables of a workload study's report, from what the study stored: what workload.json declares (metric names
and directions, the primary metric, goals, chance levels, grid axes) and the trials' result.json rows.

Library code for analysis/workload_report.py. `spec_of` and the two frames read a loaded Study; every other
function is a pure function of DataFrames (tested on hand-made ones in tests/test_workload_tables.py).
Policy, as in the papers' reports: a trial's final and best values count only when it finished (outcome
done); a diverged or errored trial has none and is counted in `finished` / `outcomes`, never shown as a number.
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import noise_figures, stats
from analysis.common import REPEATS
from analysis.figures import fmt
from analysis.load import WORKLOAD_FILE, Study
from study import metrics as M

EXAMPLES, STEP = M.EXAMPLES, M.STEP
SPLITS = ("val_", "test_")  # the engine prefixes a workload's evaluate() names with the split


@dataclass(frozen=True)
class Spec:
    """What the report needs to know about the workload, from workload.json alone."""

    name: str
    summary: str
    primary: str  # the stored column of the primary metric, e.g. "val_error"
    higher_is_better: bool
    test: str  # the primary metric's test-split column when the trials stored one, else ""
    metrics: tuple  # (stored column, higher_is_better) of each declared metric
    axes: tuple  # grid axes with several values (batch_size first, always): a configuration; repeats left out
    repeats: tuple  # grid axes that repeat a configuration
    goals: tuple  # (stored column, value, higher_is_better)
    chance: dict  # stored column -> value of a model that learned nothing
    hook: str  # "module:function" of the workload's own report section, or ""
    stage: str  # the stage the general sections cover

    @property
    def others(self) -> tuple:
        """The stored columns of every metric but the primary one: the declared ones in their order, and the
        primary's test split where the trials stored it undeclared (a study without workload.json)."""
        declared = tuple(m for m, _ in self.metrics if m != self.primary)
        return declared + ((self.test,) if self.test and self.test not in declared else ())

    def higher(self, metric: str) -> bool:
        """Whether higher values of a stored column are better (lower when nothing says so)."""
        return self.higher_is_better if metric == self.primary else dict(self.metrics).get(metric, False)


def has_best(metric: str) -> bool:
    """A best-over-epochs value needs a metric measured every epoch: the test split is measured once, at the end."""
    return not metric.startswith("test_")


def _column(name: str, keys: set) -> str:
    """The stored column of a declared metric: its own name when the rows hold it, else its validation split."""
    if name in keys or any(name.startswith(p) for p in SPLITS):
        return name
    return next((p + name for p in SPLITS if p + name in keys), name)


def axis_value(config: dict, axis: str):
    """A grid axis' value in a trial's config: a base-config key, or one of the workload's own options."""
    if axis in config:
        return config[axis]
    return (config.get("options") or {}).get(axis)


def spec_of(study: Study) -> Spec:
    declared = study.files.get(WORKLOAD_FILE) or {}
    stages = study.expected_stages()
    stage = next((s for s in reversed(stages) if s in study.stages), stages[-1] if stages else "")
    trials = study.trials(stage)
    keys = {k for t in trials for r in t.rows for k in r}
    declared_metrics = declared.get("metrics", ())
    metrics = tuple((_column(m["name"], keys), bool(m.get("higher_is_better"))) for m in declared_metrics)
    named = declared.get("primary") or (declared_metrics[0]["name"] if declared_metrics else "")
    primary = _column(named, keys)
    higher = next((bool(m.get("higher_is_better")) for m in declared_metrics if m["name"] == named), False)
    test = "test_" + primary[len("val_"):] if primary.startswith("val_") else ""
    # The axes with more than one value make the configurations; one-valued ones are constants of the study.
    axes = [a for a, values in (declared.get("axes") or {}).items() if len(values) > 1 or a in REPEATS]
    if not declared.get("axes"):  # no axes stored: the config keys that vary between the trials
        axes = sorted(k for k in {k for t in trials for k in t.config}
                      if len({repr(t.config.get(k)) for t in trials}) > 1)
    if "batch_size" in axes:
        axes.remove("batch_size")
    return Spec(name=declared.get("name") or study.meta.get("study", "workload"), summary=declared.get("summary", ""),
                primary=primary, higher_is_better=bool(higher), test=test if test in keys else "",
                metrics=metrics, axes=("batch_size", *[a for a in axes if a not in REPEATS]),
                repeats=tuple(a for a in axes if a in REPEATS),
                goals=tuple((_column(g["metric"], keys), float(g["value"]), bool(g.get("higher_is_better")))
                            for g in declared.get("goals", ())),
                chance={_column(k, keys): float(v) for k, v in (declared.get("chance") or {}).items()},
                hook=str(declared.get("report") or ""), stage=stage)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _trained(row: dict) -> bool:
    """A row after some training: epoch 1 on (epoch 0 evaluates the untrained model), or, in rows that count steps
    only (a steps-to-result study), a step after 0; an OOM row trains none."""
    epoch = _num(row.get(M.EPOCH))
    after = epoch >= 1 if math.isfinite(epoch) else _num(row.get(STEP)) > 0
    return after and row.get(M.STATUS) != M.STATUS_OOM


def _best(t, metric: str, higher: bool) -> tuple[float, float]:
    """(epoch, value) of a finished trial's best trained epoch by `metric` in its direction; NaNs otherwise."""
    values = [(_num(r.get(M.EPOCH)), _num(r.get(metric))) for r in t.rows if _trained(r)]
    values = [(e, v) for e, v in values if math.isfinite(v)]
    if not values or t.outcome != "done":
        return math.nan, math.nan
    return (max if higher else min)(values, key=lambda ev: ev[1])


def trial_frame(trials: list, spec: Spec) -> pd.DataFrame:
    """One row per trial: its axes and repeats, outcome, last epoch, the primary metric's final and best value
    (best over trained epochs, in the metric's direction), every other metric's final_<m> and best_<m> (final
    only for the test split), and its B_simple."""
    others = [(f"{kind}_{m}", m, kind) for m in spec.others for kind in ("final", "best") if kind == "final"
              or has_best(m)]
    records = []
    for t in trials:
        done = t.outcome == "done"
        best = _best(t, spec.primary, spec.higher_is_better)
        records.append({"trial_id": t.trial_id, **{a: axis_value(t.config, a) for a in spec.axes + spec.repeats},
                        "outcome": t.outcome, "epochs": _num(t.last(M.EPOCH)) if t.rows else math.nan,
                        "final": _num(t.last(spec.primary)) if done else math.nan, "best": best[1],
                        "best_epoch": best[0],
                        **{column: (_num(t.last(m)) if done else math.nan) if kind == "final"
                           else _best(t, m, spec.higher(m))[1] for column, m, kind in others},
                        "train_seconds": _num(t.last(M.TRAIN_SECONDS)), "noise_scale": noise_figures.trial_noise(t)})
    numbers = ["epochs", "final", "best", "best_epoch", *[c for c, _, _ in others], "train_seconds", "noise_scale"]
    columns = ["trial_id", *spec.axes, *spec.repeats, "outcome", *numbers]
    return pd.DataFrame.from_records(records, columns=columns).astype({c: float for c in numbers})


def epoch_frame(trials: list, spec: Spec) -> pd.DataFrame:
    """One row per trial and stored row (long form): step, examples, seconds per epoch, train loss, the primary
    metric ("metric") and every other metric measured each epoch (by its own name)."""
    each_epoch = [m for m in spec.others if has_best(m)]
    records = []
    for t in trials:
        base = {"trial_id": t.trial_id, **{a: axis_value(t.config, a) for a in spec.axes}, "outcome": t.outcome}
        before = {M.TRAIN_SECONDS: 0.0, EXAMPLES: 0.0}
        for r in t.rows:
            if r.get(M.STATUS) == M.STATUS_OOM:
                continue
            seconds, examples = _num(r.get(M.TRAIN_SECONDS)), _num(r.get(EXAMPLES))
            epoch_seconds = _num(r.get(M.EPOCH_SECONDS, seconds - before[M.TRAIN_SECONDS]))
            epoch_examples = examples - before[EXAMPLES]
            records.append({**base, M.EPOCH: _num(r.get(M.EPOCH)), STEP: _num(r.get(STEP)), EXAMPLES: examples,
                            M.TRAIN_LOSS: _num(r.get(M.TRAIN_LOSS)), "metric": _num(r.get(spec.primary)),
                            **{m: _num(r.get(m)) for m in each_epoch},
                            "epoch_seconds": epoch_seconds if _trained(r) else math.nan,
                            "images_per_second": _num(r.get(M.IMAGES_PER_SECOND, epoch_examples / epoch_seconds
                                                            if epoch_seconds > 0 else math.nan))
                            if _trained(r) else math.nan})
            before = {M.TRAIN_SECONDS: seconds if math.isfinite(seconds) else before[M.TRAIN_SECONDS],
                      EXAMPLES: examples if math.isfinite(examples) else before[EXAMPLES]}
    numbers = [M.EPOCH, STEP, EXAMPLES, M.TRAIN_LOSS, "metric", *each_epoch, "epoch_seconds", "images_per_second"]
    return pd.DataFrame.from_records(records, columns=["trial_id", *spec.axes, "outcome", *numbers]).astype(
        {c: float for c in numbers})  # numbers even with no row yet (a study whose trials have not started)


def _interval(values: pd.Series) -> tuple[float, float, float, str]:
    v = values[np.isfinite(values)]
    if v.empty:
        return math.nan, math.nan, math.nan, "none finished"
    mean, low, high = stats.mean_ci(v)
    return mean, low, high, (f"t over {len(v)} runs" if len(v) > 1 else "one run")


def outcomes_text(outcomes: pd.Series) -> str:
    return ", ".join(f"{n} {o}" for o, n in sorted(outcomes.value_counts().items()))


def config_table(trials: pd.DataFrame, axes: list, metric: str, others=()) -> pd.DataFrame:
    """Per configuration (a value of every axis): the final and the best-over-epochs value of `metric` as the mean
    over its finished runs with a Student-t 95 % interval (none from one run); the same of each metric in `others`
    from the trials' final_<m> and best_<m> columns (those it has)."""
    columns = [(f"final_{metric}", "final"), (f"best_{metric}", "best")]
    columns += [(f"{kind}_{m}", f"{kind}_{m}") for m in others for kind in ("final", "best") if f"{kind}_{m}" in trials]
    rows = []
    for key, part in trials.groupby(list(axes), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(axes, key)), "runs": len(part), "finished": int(np.isfinite(part["final"]).sum()),
               "outcomes": outcomes_text(part["outcome"])}
        for name, source in columns:
            row[name], row[f"{name}_low"], row[f"{name}_high"], _ = _interval(part[source])
        rows.append({**row, "interval": _interval(part["final"])[3]})  # the primary metric's interval
    return pd.DataFrame.from_records(rows)


def best_rows(configs: pd.DataFrame, by: list, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """Per value of the `by` axes, the configuration with the best final mean of `metric` (the first of a tie, in
    grid order); a value whose configurations all lack one keeps its first, so no value of the grid drops out."""
    column = f"final_{metric}"
    rows = []
    for _, part in configs.groupby(list(by), sort=True, dropna=False):
        ranked = part[np.isfinite(part[column])]
        if ranked.empty:
            rows.append(part.iloc[0])
            continue
        target = ranked[column].max() if higher_is_better else ranked[column].min()
        rows.append(ranked[ranked[column] == target].iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def axis_table(configs: pd.DataFrame, axis: str, axes: list, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """Per value of one axis: how many configurations ran at it, and the best of them (its other axes named in
    `best_configuration`) with its final and best-over-epochs value and intervals."""
    best = best_rows(configs, [axis], metric, higher_is_better)
    others = [a for a in axes if a != axis]
    counts = configs.groupby(axis, sort=True, dropna=False).size()
    best.insert(1, "configurations", [int(counts.get(v, 0)) for v in best[axis]])
    best.insert(2, "best_configuration", [", ".join(f"{a} {fmt(r[a])}" for a in others) or "–"
                                          for _, r in best.iterrows()])
    return best.drop(columns=others)


def spread_table(trials: pd.DataFrame, axes: list) -> pd.DataFrame:
    """Per configuration: min, mean, max, std and CV over runs of the final value (finished runs only)."""
    rows = []
    for key, part in trials.groupby(list(axes), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        s = stats.spread(part["final"])
        rows.append({**dict(zip(axes, key)), "runs": len(part), "finished": s["n"], "min": s["min"],
                     "mean": s["mean"], "max": s["max"], "std": s["std"], "cv": s["cv"]})
    return pd.DataFrame.from_records(rows)


def curve_table(epochs: pd.DataFrame, axes: list, metric: str = "metric") -> pd.DataFrame:
    """Per configuration and epoch: means over runs of the finite metric (the primary one, or the epoch frame's
    column `metric`) and train loss (a diverged run stops counting at its first NaN), their min and max, and the
    mean step and examples seen."""
    at = M.EPOCH if epochs[M.EPOCH].notna().any() else STEP  # rows that count steps only: per step
    rows = []
    for key, part in epochs.groupby([*axes, at], sort=True, dropna=False):
        metric_values, loss = part[metric].dropna(), part[M.TRAIN_LOSS][np.isfinite(part[M.TRAIN_LOSS])]
        rows.append({**dict(zip([*axes, at], key)), "runs": int(metric_values.size), M.EPOCH: part[M.EPOCH].mean(),
                     STEP: part[STEP].mean(), EXAMPLES: part[EXAMPLES].mean(), "metric_mean": metric_values.mean(),
                     "metric_min": metric_values.min(), "metric_max": metric_values.max(),
                     "train_loss_mean": loss.mean(), "train_loss_min": loss.min(),
                     "train_loss_max": loss.max()})
    return pd.DataFrame.from_records(rows)


def timing_by_batch(epochs: pd.DataFrame, trials: pd.DataFrame, timing: pd.DataFrame) -> pd.DataFrame:
    """Per batch size: training seconds per epoch and images per second (medians over the trials' trained epochs),
    the mean total training seconds of a finished trial, the GPU share and the summed GPU-seconds (share x wall)."""
    trained = epochs[np.isfinite(epochs["epoch_seconds"])]
    rows = []
    for batch, part in trials.groupby("batch_size", sort=True):
        mine = trained[trained["trial_id"].isin(part["trial_id"])]
        cost = timing[timing["trial_id"].isin(part["trial_id"])] if len(timing) else timing
        done = part[part["outcome"] == "done"]
        rows.append({"batch_size": batch, "trials": len(part), "epochs_trained": len(mine),
                     "seconds_per_epoch": mine["epoch_seconds"].median(),
                     "images_per_second": mine["images_per_second"].median(),
                     "mean_train_seconds": done["train_seconds"].mean(),
                     "total_train_seconds": part["train_seconds"].sum(min_count=1),
                     "gpu_share": cost["gpu_share"].median() if len(cost) else math.nan,
                     "gpu_seconds": cost["gpu_seconds"].sum(min_count=1) if len(cost) else math.nan})
    return pd.DataFrame.from_records(rows)


def noise_by_batch(trials: pd.DataFrame) -> pd.DataFrame:
    """Per batch size: B_simple over the trials that measured one (median, min, max)."""
    finite = trials[np.isfinite(trials["noise_scale"])]
    table = finite.groupby("batch_size")["noise_scale"].agg(trials="count", median="median", min="min", max="max")
    return table.reset_index()


def cell(row: pd.Series, column: str) -> str:
    """A shown table cell: 'mean [low, high]', or '–' without a value."""
    value = row[column]
    if not math.isfinite(_num(value)):
        return "–"
    low, high = row.get(f"{column}_low", math.nan), row.get(f"{column}_high", math.nan)
    return fmt(value) + (f" [{fmt(low)}, {fmt(high)}]" if math.isfinite(_num(low)) else "")
