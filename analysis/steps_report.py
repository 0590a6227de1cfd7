"""The report of a steps-to-result study (study.json "kind": "steps", `python -m study steps`): the study's goals,
ranges and rule from study.json, every trial's stored evaluation rows, and stopped_by_rule.json, handed to
analysis/steps_figures.write_section. Called by `python -m analysis.report STUDY`, which adds the timing and
failure sections every study has. Reads stored results only.
"""

import json

from analysis.figures import ReportWriter
from analysis.steps_figures import write_section
from analysis.load import Study
from analysis.workload_report import options_line, options_of
from study import metrics as M
from study.engine import steps as S
from study.engine.steps import BUDGET, CONFIG, STAGE
from study.workload import Goal

LABELS = ["batch_size", CONFIG]


def status_of(trial, stopped: dict) -> str:
    """How a trial ended in the study's terms (study.engine.steps.STATUSES, or out of memory: a failure, left out of the
    per-batch results); a trial still going counts as censored."""
    if any(r.get(M.STATUS) == M.STATUS_OOM for r in trial.rows):
        return M.STATUS_OOM
    last = trial.rows[-1].get(M.STATUS) if trial.rows else None
    if last in S.STATUSES:
        return last
    if trial.dirname in stopped:
        return S.STOPPED_BY_RULE
    if any(r.get(M.DIVERGED) is True for r in trial.rows):
        return S.DIVERGED
    return S.CENSORED


def trials_of(study: Study) -> list[dict]:
    try:
        stopped = json.loads(study.read_bytes(f"{study.path}/{STAGE}/{M.STOPPED_FILE}"))
    except (OSError, ValueError):  # written after the run: none yet while it runs
        stopped = {}
    out = []
    for t in study.trials(STAGE):
        rows = [r for r in t.rows if S.STEP in r]
        status = status_of(t, stopped)
        if not rows and status != M.STATUS_OOM:  # an out-of-memory trial is counted even without an evaluation
            continue
        momentum = t.config.get("momentum") if t.config.get("optimizer") in ("sgd", "nesterov") else None
        out.append({"trial_id": t.dirname or t.trial_id, "batch_size": int(t.config["batch_size"]),
                    "config": int(t.config[CONFIG]), "lr": float(t.config["lr"]), "momentum": momentum,
                    "status": status, "budget": t.config.get(BUDGET), "rows": rows})
    return out


def title(study: Study) -> str:
    return f"Steps-to-result study of {study.meta.get('study', 'a workload')}"


def budget_line(args: dict, per_batch: dict) -> str:
    """The step budget as the study set it: the same steps at every batch size, or epochs at the smallest with the
    rule that carried them to the others (study.engine.steps.step_budgets; studies stored before the rule had epochs at
    every batch size), and the steps per batch size."""
    steps = "; steps " + ", ".join(f"{b}: {s}" for b, s in sorted(per_batch.items(), key=lambda kv: int(kv[0])))
    if args.get("budget_steps"):
        return f"{args['budget_steps']} steps at every batch size"
    if args.get("budget_scaling") == S.SQRT:
        return (f"{args.get('budget_epochs')} epochs at the smallest batch size, steps shrinking as 1 / sqrt(batch "
                f"size) for the larger ones, at least {S.BUDGET_FLOOR} (where the smallest had as many)"
                + (steps if per_batch else ""))
    return f"{args.get('budget_epochs')} epochs per batch size" + (steps if per_batch else "")


def write(report: ReportWriter, study: Study) -> None:
    meta = study.meta
    stored = meta.get("goals") or (study.files.get(M.WORKLOAD_FILE) or {}).get("goals") or []
    goals = [Goal.from_dict(g) for g in stored]
    trials = trials_of(study)
    report.heading("The study")
    ranges = {k: tuple(v) for k, v in (meta.get("ranges") or {}).items()}
    args = study.args
    budget = budget_line(args, meta.get("budget_steps") or {})
    report.bullets(["goals: " + ", ".join(map(str, goals)),
                    f"optimizer {args.get('optimizer')}; {args.get('configs')} configurations per batch size, "
                    f"scrambled Sobol points (seed {args.get('seed')}) over log "
                    + " and log ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in ranges.items()),
                    f"batch sizes {args.get('batch_sizes')}; budget {budget}",
                    *options_line(options_of(study.trials())),
                    "trial ends: " + ", ".join(f"{s} {sum(t['status'] == s for t in trials)}"
                                               for s in S.STATUSES + (M.STATUS_OOM,))])
    failed = sum(t["status"] == M.STATUS_OOM for t in trials)
    if failed:
        report.text(f"{failed} trials ran out of memory: they failed, and are left out of every table below.")
    trials = [t for t in trials if t["status"] != M.STATUS_OOM]
    report.text("Trials the rule stopped (stopped_by_rule) show as *incomplete* in the shared tables below: Tune "
                "ended them before their own limits did.")
    if not trials or not goals:
        report.text("No trial has stored an evaluation yet." if goals else "study.json names no goal.")
        return
    write_section(trials, goals, report.out, ranges=ranges or None, level=meta.get("level", 0.95),
                  safety=meta.get("safety", 10.0), seed=int(args.get("seed", 0)), writer=report, unit=unit_of(study))


def unit_of(study: Study) -> str | None:
    """What the workload's examples are, for the figures' axes: workload.json's "unit" where the study stored one
    ("images"), else None (write_section then says "examples": true of any workload, where "images" would be
    wrong for a table)."""
    unit = (study.files.get(M.WORKLOAD_FILE) or {}).get("unit")
    return unit.strip() if isinstance(unit, str) and unit.strip() else None
