"""Open what a study stored, through pyarrow's filesystems, so a local folder and s3://... read the same way.

    from analysis.load import open_study
    study = open_study("results/mnist-20250101-120000")   # or file:///..., s3://bucket/prefix/name, a stage folder
    study.trials("batch_sweep")[0].last("test_mse")

The layout read here is the one `study.commands.tuning` writes: `<study>/study.json`, one Tune experiment per stage, and
the study's own `errored_trials.json` per stage. This module finds the study folder (or the one stage folder it was
pointed at), tells the study's kind and reads its study-level files, and makes the tables of trials the reports
build on; each stage's trials are read by analysis.trials,
which knows Tune's per-trial files. Trial is importable from here too, as users' code has it. Nothing here writes to
the study folder.
"""

import io
import posixpath
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs

from study import metrics as M
from study.metrics import CHOSEN_FILE, STUDY_FILE, TARGET_STATS_FILE, WORKLOAD_FILE
from study.errors import StudyError

from analysis.papers import paper, papers
from analysis.trials import (EXPERIMENT_STATE, Trial, _is_dir, _listing, _number, _read_or_warn, _read_stage,
                             read_bytes, read_json, resolve)

__all__ = ["WORKLOAD_KINDS", "Study", "Trial", "open_study", "resolve"]

WORKLOAD_KINDS = ("workload", "steps")  # study.json "kind" of a study built from a workload (study/workload.py)


@dataclass
class Study:
    """A study folder: its study.json, and its trials per stage."""

    uri: str
    fs: pafs.FileSystem
    path: str  # the study folder inside fs
    kind: str  # a paper's KIND (analysis.papers: the studies before workloads) | workload | steps
    meta: dict  # study.json ({} when the folder is a bare Tune experiment)
    stages: dict  # stage name -> [Trial], sorted by trial id
    files: dict  # optional study-level JSON files (chosen_lr.json, target_stats.json) that exist
    only_stage: str = ""  # set when the report was pointed at one stage folder
    unreadable: list = field(default_factory=list)  # a line per stored file that could not be read, and what instead

    @property
    def args(self) -> dict:
        return self.meta.get("args", {})

    def trials(self, stage: str | None = None) -> list:
        if stage is not None:
            return list(self.stages.get(stage, []))
        return [t for name in sorted(self.stages) for t in self.stages[name]]

    def expected_stages(self) -> list:
        if self.only_stage:
            return [self.only_stage]
        if self.kind in WORKLOAD_KINDS:  # study.json's stages when it names them, else the stage folders there are
            return list(self.meta.get("stages") or sorted(self.stages))
        return paper(self.kind).stages(self.args) if paper(self.kind) else []

    def partial_reasons(self) -> list:
        """Why the results are not (yet) the whole study; empty when it finished."""
        reasons = [f"stage {s} has not started" for s in self.expected_stages() if s not in self.stages]
        unfinished = [t for t in self.trials() if t.outcome in ("running", "pending")]
        if unfinished:
            reasons.append(f"{len(unfinished)} trial(s) still running or pending")
        return reasons

    def corrupt_lines(self) -> list:
        """One line per unreadable result.json line: which file, which line, why; the rows around it are kept."""
        return [f"{t.result_file} line {line}: {reason}" for t in self.trials() for line, reason in t.corrupt]

    def read_bytes(self, path: str) -> bytes:
        return read_bytes(self.fs, path)

    def read_csv(self, path: str) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(self.read_bytes(path)))


def _is_experiment(fs: pafs.FileSystem, path: str, listing: dict) -> bool:
    """A Tune experiment folder: it has an experiment_state file, or (state not yet written) trial folders."""
    if any(EXPERIMENT_STATE.match(name) for name in listing):
        return True
    return any(_is_dir(kind) and "params.json" in _listing(fs, f"{path}/{name}") for name, kind in listing.items())


def open_study(uri: str) -> Study:
    """Read a study folder (or one stage folder inside it). Raises StudyError when there is no study there."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise StudyError(f"cannot reach {uri}: {err}")
    if info.type == pafs.FileType.NotFound:
        raise StudyError(f"{uri} does not exist; pass the study folder, <storage-path>/<name>, that the study "
                         f"printed at its start")
    if not _is_dir(info.type):
        raise StudyError(f"{uri} is a file; pass the study folder, <storage-path>/<name>")
    listing = _listing(fs, path)
    if not listing:
        raise StudyError(f"{uri} is empty; no study has stored anything there yet")
    only_stage, stage_root, study_dir = "", path, path
    if STUDY_FILE not in listing and _is_experiment(fs, path, listing):
        stage_root, only_stage = posixpath.dirname(path), posixpath.basename(path)
        if STUDY_FILE in _listing(fs, stage_root):
            study_dir = stage_root
    meta = read_json(fs, f"{study_dir}/{STUDY_FILE}") if STUDY_FILE in _listing(fs, study_dir) else {}
    if only_stage:
        stage_names = [only_stage]
    else:
        stage_names = sorted(name for name, kind in listing.items()
                             if _is_dir(kind) and _is_experiment(fs, f"{path}/{name}", _listing(fs, f"{path}/{name}")))
    if not meta and not stage_names:
        inside = sorted(name for name, kind in listing.items()
                        if _is_dir(kind) and STUDY_FILE in _listing(fs, f"{path}/{name}"))
        hint = f" It holds the studies {', '.join(inside)}: pass one of them." if inside else ""
        raise StudyError(f"{uri} is not a study folder: it has no {STUDY_FILE} and no Tune experiment "
                         f"(experiment_state-*.json). Pass <storage-path>/<name> of a study.{hint}")
    unreadable = []
    stages = {name: _read_stage(fs, f"{stage_root}/{name}", name, unreadable) for name in stage_names}
    files = {name: _read_or_warn(fs, f"{study_dir}/{name}", dict, unreadable, "read without it")
             for name in (CHOSEN_FILE, TARGET_STATS_FILE, WORKLOAD_FILE) if name in _listing(fs, study_dir)}
    files = {name: data for name, data in files.items() if data is not None}
    kind = _kind(meta, stages, WORKLOAD_FILE in files)
    if not kind:
        raise StudyError(f"{uri}: cannot tell which study this is (study.json says {meta.get('study')!r}, kind "
                         f"{meta.get('kind')!r}, and there is no {WORKLOAD_FILE}); expected one of "
                         f"{', '.join(papers())} or a workload study")
    primary = (files.get(WORKLOAD_FILE) or {}).get("primary") if kind == "workload" else None
    for trial in (t for trials in stages.values() for t in trials):
        trial.primary = primary if isinstance(primary, str) else ""
    return Study(uri=uri, fs=fs, path=study_dir, kind=kind, meta=meta, stages=stages, files=files,
                 only_stage=only_stage, unreadable=unreadable)


def _kind(meta: dict, stages: dict, has_workload_file: bool) -> str:
    """A paper's KIND | workload | steps, or "" when nothing says. The studies from before workloads keep their
    own reports; any other study is a workload study when study.json's kind or a workload.json says so."""
    if meta.get("study") in papers():
        return meta["study"]
    if meta.get("kind") in WORKLOAD_KINDS:
        return meta["kind"]
    if has_workload_file:
        return "workload"
    return "" if meta else _guess_kind(stages)


def _guess_kind(stages: dict) -> str:
    """For a bare Tune experiment without study.json: by the trial configs' own keys (a workload trial names its
    workload; a paper's trials a key of their own, its DETECT); "" when none fits."""
    configs = [t.config for trials in stages.values() for t in trials]
    for kind, key in (("workload", "workload"), *((kind, p.DETECT) for kind, p in papers().items())):
        if configs and all(key in c for c in configs):
            return kind
    return ""


def trial_table(trials: list, config_keys: list, metric_keys: list) -> pd.DataFrame:
    """One row per trial: stage, trial id, the config keys, outcome, last epoch, last values of the metrics."""
    records = []
    for t in trials:
        record = {"stage": t.stage, "trial_id": t.trial_id}
        record.update({k: t.config.get(k) for k in config_keys})
        record.update(outcome=t.outcome, epochs=t.last(M.EPOCH, None) if t.rows else None)
        record.update({k: _number(t.last(k)) for k in metric_keys})
        record["error"] = f"{t.recovered} ({t.error})" if t.recovered else t.error
        records.append(record)
    columns = ["stage", "trial_id", *config_keys, "outcome", "epochs", *metric_keys, "error"]
    return pd.DataFrame.from_records(records, columns=columns).astype({k: float for k in metric_keys})


def epoch_table(trials: list, config_keys: list, metric_keys: list) -> pd.DataFrame:
    """One row per trial and reported epoch (long form), for curves over training."""
    records = []
    for t in trials:
        base = {"stage": t.stage, "trial_id": t.trial_id, **{k: t.config.get(k) for k in config_keys},
                "outcome": t.outcome}
        for row in t.rows:
            records.append({**base, M.EPOCH: row.get(M.EPOCH), **{k: _number(row.get(k)) for k in metric_keys}})
    columns = ["stage", "trial_id", *config_keys, "outcome", M.EPOCH, *metric_keys]
    return pd.DataFrame.from_records(records, columns=columns).astype({k: float for k in metric_keys})
