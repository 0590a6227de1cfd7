"""Report sections both studies share: timing and cost, the timeline of trials per node and GPU, the trials that
errored, diverged or did not finish. Used by analysis/report.py.
"""

import math

import numpy as np
import pandas as pd

from analysis.figures import ReportWriter, fmt, new_figure
from analysis.load import Study
from analysis.trials import Trial
from study import metrics as M
from study.metrics import REPEATS

STAGE_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:olive", "tab:cyan", "tab:brown")
CONFIG_COLOURS = tuple(f"C{i}" for i in range(10)) + ("black", "silver", "gold", "teal", "navy", "salmon",
                                                   "lime", "orchid", "sienna", "khaki")
OUTCOME_HATCH = {"error": "xxx", "diverged": "///", "no result": "\\\\", "running": "...", "incomplete": "..."}


def fold_lr_scaling(trials: list, key: str) -> bool:
    """With several lr-scaling rules in one grid (--lr-scaling none linear ...), the rule joins the config value
    `key` of every trial (e.g. target "mean" -> "mean, lr linear"), so every table and figure grouped by `key`
    keeps the rules apart. Changes the trials' configs in memory only; True if it did."""
    rules = {t.config.get("lr_scaling", "none") for t in trials}
    if len(rules) < 2:
        return False
    for t in trials:
        t.config = {**t.config, key: f"{t.config.get(key)}, lr {t.config.get('lr_scaling', 'none')}"}
    return True


def base_value(label: str) -> str:
    """The config value under a label that fold_lr_scaling may have extended."""
    return str(label).split(", lr ")[0]


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _median_finite(values) -> float:
    v = np.asarray([_num(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else math.nan


def wall_seconds(trial: Trial) -> float:
    """Seconds the trial ran, as Tune measured it (setup, data transfer and evaluation included)."""
    total = _num(trial.last("time_total_s"))
    if math.isfinite(total):
        return total
    return trial.end_time - trial.start_time  # an errored trial without a result row


def timing_table(study: Study, label_keys: list) -> pd.DataFrame:
    """One row per trial: where it ran, when (seconds after the study's first trial started), for how long, and
    what it cost: GPU-seconds = GPU share x wall seconds, CPU-seconds = CPUs per trial x wall seconds."""
    trials = study.trials()
    starts = [t.start_time for t in trials if math.isfinite(t.start_time)]
    origin = min(starts) if starts else 0.0
    cpus = _num(study.meta.get("resources_per_trial", {}).get("cpu", math.nan))
    records = []
    for t in trials:
        wall = wall_seconds(t)
        share = _num(t.last(M.GPU_SHARE))
        ips = [r.get(M.IMAGES_PER_SECOND) for r in t.rows if _num(r.get(M.EPOCH)) >= 1]
        # Stored before probes were timed apart (no probe_seconds): training seconds with the probes in, read as is.
        probes = [_num(r[M.PROBE_SECONDS]) for r in t.rows if M.PROBE_SECONDS in r]
        records.append({
            "stage": t.stage, "trial_id": t.trial_id, **{k: t.config.get(k) for k in label_keys},
            "outcome": t.outcome, "node_ip": t.last("node_ip", ""), "node_id": short_id(t.last(M.NODE_ID, "")),
            "gpu_ids": t.last(M.GPU_IDS, ""),
            "device": t.last(M.DEVICE, ""), "gpu_share": share,
            "start_s": t.start_time - origin, "end_s": t.end_time - origin, "wall_seconds": wall,
            "train_seconds": _num(t.last(M.TRAIN_SECONDS)), "probe_seconds": sum(probes) if probes else math.nan,
            "gpu_seconds": share * wall, "cpu_seconds": cpus * wall,
            "images_per_second": _median_finite(ips)})
    return pd.DataFrame.from_records(records).sort_values(["stage", "trial_id"], kind="stable",
                                                          ignore_index=True) if records else pd.DataFrame()


def short_id(node_id) -> str:
    """Ray's 56-hex-digit node id cut to its first 8, as git cuts commits: unique among a study's few nodes."""
    return str(node_id or "")[:8]


def cost_table(timing: pd.DataFrame) -> pd.DataFrame:
    """Per stage and for the whole study: trials, elapsed span, summed trial seconds, GPU- and CPU-seconds."""
    def row(name, part):
        span = part["end_s"].max() - part["start_s"].min()
        return {"stage": name, "trials": len(part), "elapsed_seconds": span,
                "trial_seconds": part["wall_seconds"].sum(min_count=1),
                "gpu_seconds": part["gpu_seconds"].sum(min_count=1),
                "cpu_seconds": part["cpu_seconds"].sum(min_count=1),
                "gpu_hours": part["gpu_seconds"].sum(min_count=1) / 3600}

    rows = [row(stage, part) for stage, part in timing.groupby("stage", sort=True)]
    rows.append(row("study total", timing))
    return pd.DataFrame.from_records(rows)


def failure_reason(trial: Trial) -> str:
    epoch = trial.last(M.EPOCH, None) if trial.rows else None
    if trial.outcome == "error":
        return trial.error or f"Tune marked the trial as errored (no error.txt; last epoch {fmt(epoch)})"
    if trial.outcome == "no result":
        return f"finished, but its {trial.primary} is NaN at the end: no result to compare"
    if trial.outcome == "diverged":
        first = next((r.get(M.EPOCH) for r in trial.rows
                      if r.get(M.DIVERGED) is True or r.get(M.STATUS) == M.STATUS_DIVERGED), epoch)
        return f"training loss became NaN/inf in epoch {fmt(first)}; stopped there"
    if trial.outcome == "pending":
        return "not started yet"
    if trial.outcome == "running":
        return f"still running (last reported epoch {fmt(epoch)})"
    return f"stopped at epoch {fmt(epoch)} without finishing (Tune status {trial.tune_status})"


def failures_table(study: Study, label_keys: list) -> pd.DataFrame:
    records = [{"stage": t.stage, "trial_id": t.trial_id, **{k: t.config.get(k) for k in label_keys},
                "outcome": t.outcome, "last_epoch": t.last(M.EPOCH, None) if t.rows else None,
                "reason": failure_reason(t)}
               for t in study.trials() if t.outcome != "done"]
    return pd.DataFrame.from_records(records, columns=["stage", "trial_id", *label_keys, "outcome", "last_epoch",
                                                      "reason"])


def lanes(timing: pd.DataFrame) -> list:
    """A lane label per trial: node, GPU (or CPU) and a slot, so trials packed on one GPU sit on adjacent lanes
    and a gap in a lane is time that slot stood idle. Slots are filled greedily in order of start."""
    labels = [""] * len(timing)
    free_at: dict = {}
    order = timing.sort_values(["start_s", "trial_id"], kind="stable").index
    for i in order:
        row = timing.loc[i]
        device = f"GPU {row['gpu_ids']}" if row["gpu_ids"] else "CPU"
        # Ray's node id, not the IP alone: several nodes can share an IP (containers, one-machine test clusters).
        node = str(row["node_ip"]) or "unknown node"
        if row.get("node_id"):
            node += f" ({short_id(row['node_id'])})"
        key = (node, device)
        slots = free_at.setdefault(key, [])
        slot = next((k for k, end in enumerate(slots) if end <= row["start_s"]), len(slots))
        end = row["end_s"] if math.isfinite(row["end_s"]) else row["start_s"]
        if slot == len(slots):
            slots.append(end)
        else:
            slots[slot] = end
        labels[timing.index.get_loc(i)] = f"{key[0]} · {key[1]} · slot {slot + 1}"
    return labels


def configurations(timing: pd.DataFrame, label_keys: list) -> list:
    """A label per trial naming its configuration: the stage (when several) and its config keys but the repeat."""
    keys = [k for k in label_keys if k not in REPEATS and k in timing]
    several = timing["stage"].nunique() > 1
    return [(f"{row['stage']}: " if several else "") + ", ".join(f"{k} {fmt(row[k])}" for k in keys)
            for _, row in timing.iterrows()]


def timeline_figure(timing: pd.DataFrame, label_keys: list = ()):
    """Bars coloured by configuration (a legend names each), or by stage when there are more configurations than
    distinguishable colours; returns (figure, trials not drawn, what the colour means)."""
    shown = timing[np.isfinite(timing["start_s"]) & np.isfinite(timing["end_s"])].copy()
    shown["lane"] = lanes(shown) if len(shown) else []
    shown["configuration"] = configurations(shown, list(label_keys)) if len(shown) else []
    lane_names = sorted(set(shown["lane"]))
    by_config = 0 < shown["configuration"].nunique() <= len(CONFIG_COLOURS)
    key = "configuration" if by_config else "stage"
    groups = list(shown.groupby(key)["start_s"].min().sort_values(kind="stable").index)  # in order of start
    palette = CONFIG_COLOURS if by_config else STAGE_COLOURS
    colours = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    height = max(2.5, 0.28 * max(len(lane_names), len(groups) * 0.8) + 1.5)
    fig, (ax,) = new_figure(1, width=11, height=height)
    for row in shown.sort_values("start_s").itertuples():
        ax.barh(lane_names.index(row.lane), max(row.end_s - row.start_s, 1e-3), left=row.start_s, height=0.8,
                color=colours[getattr(row, key)], edgecolor="red" if row.outcome == "error" else "black",
                linewidth=0.5, hatch=OUTCOME_HATCH.get(row.outcome))
    ax.set_yticks(range(len(lane_names)), lane_names)
    ax.invert_yaxis()
    ax.set_xlabel("time since the first trial started (s)")
    ax.set_title("trials over time per node, GPU and slot")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colours[g], edgecolor="black", label=g) for g in groups]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=h, label=o) for o, h in OUTCOME_HATCH.items()
                if o in set(shown["outcome"]) and o != "incomplete"]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=key)
    return fig, len(timing) - len(shown), key


def write_timing(report: ReportWriter, study: Study, label_keys: list) -> None:
    timing = timing_table(study, label_keys)
    report.heading("Timing and cost")
    if timing.empty:
        report.text("No trial has started yet.")
        return
    report.text("Wall seconds are Tune's `time_total_s` of a trial (setup and evaluation included); training "
                "seconds count the training epochs only, without the gradient-noise probes (whose share of an epoch "
                "depends on the batch size), and probe seconds those probes. GPU-seconds = the trial's GPU share x "
                "wall seconds; CPU-seconds = CPUs per trial x wall seconds. Images per second: median over epochs 1 "
                "and later.")
    if timing["probe_seconds"].isna().any():
        report.text("Trials with probe seconds – were stored before probes were timed apart: their training "
                    "seconds include the probes.")
    report.table("cost", cost_table(timing), "Cost per stage and for the whole study")
    report.table("timing", timing, "Timing per trial")
    fig, hidden, colour = timeline_figure(timing, label_keys)
    report.figure("timeline", fig, f"Timeline: one bar per trial, coloured by {colour}; one lane per node, GPU and "
                                   "packing slot; gaps are idle time")
    if hidden:
        report.text(f"{hidden} trial(s) have no start or end time (not started, or no result yet) and are not "
                    f"drawn.")


def write_failures(report: ReportWriter, study: Study, label_keys: list) -> None:
    failures = failures_table(study, label_keys)
    report.heading("Errored, diverged and unfinished trials")
    if failures.empty:
        report.text("Every trial finished normally.")
        return
    counts = failures["outcome"].value_counts().sort_index()
    report.text("Counts: " + ", ".join(f"{n} {o}" for o, n in counts.items()) + ". Their metrics are shown as "
                "missing (–) in the tables above, never as zeros. For an error the reason is the exception line "
                f"of the trial's error.txt, or of its {M.TRACEBACK_FILE} when its own error ended it unretried.")
    report.table("failures", failures, "Trials that did not finish normally")
