"""Read what a study stored, through pyarrow's filesystems, so a local folder and s3://... read the same way.

    from analysis.load import open_study
    study = open_study("results/mnist-20250101-120000")   # or file:///..., s3://bucket/prefix/name, a stage folder
    study.trials("batch_sweep")[0].last("test_mse")

The layout read here is the one `study.commands.tuning` writes: `<study>/study.json`, one Tune experiment per stage, and
the study's own `errored_trials.json` per stage. What comes from where:
- Tune's newest experiment snapshot (`experiment_state-*.json`), read as plain JSON (never unpickled: see
  `_trial_states`): every trial Tune knows, including those that errored or never started; its status
  (TERMINATED, ERROR, PENDING; RUNNING is read as PENDING, as Tune's reader does, since a restored trial starts
  again, so "running" is inferred from stored rows), its config, its folder and how often it failed. Before Tune's
  first snapshot there is none: trials are then the folders with a `params.json`, their statuses unknown.
- Tune's documented per-trial files, read directly: `params.json` (the config), `result.json` (a JSON line per
  epoch: every metric, the trial's outcome in `status`/`diverged`, the timeline's timestamps), `error.txt` (the
  exception; its "Failure # N" headers count failures when there is no snapshot), and the `checkpoint_*/` folders.
A trial's outcome is how it ended, not what it recovered from on the way; a `result.json` line that is not JSON is
skipped and named in `Study.corrupt_lines()`. Nothing here writes to the study folder.
"""

import io
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from study import metrics as M
from study.metrics import CHOSEN_FILE, ERRORED_FILE, STUDY_FILE, TARGET_STATS_FILE, WORKLOAD_FILE
from study.errors import StudyError
from study.result_rows import result_lines

from analysis.papers import paper, papers

WORKLOAD_KINDS = ("workload", "steps")  # study.json "kind" of a study built from a workload (study/workload.py)
EXPERIMENT_STATE = re.compile(r"^experiment_state-.*\.json$")
# Tune statuses of a trial that has not finished yet; a study holding one is reported as partial.
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
# A last row's status of a trial that ended as planned: done, or a steps-to-result trial's end (study.engine.steps).
FINISHED = (M.STATUS_DONE, "reached", "censored", "infeasible")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Trial:
    """One Tune trial: its full config, its per-epoch rows and how it ended."""

    stage: str
    trial_id: str
    dirname: str  # folder under the stage; "" for a trial Tune listed but never started
    config: dict
    rows: list = field(default_factory=list)  # result.json, one dict per reported epoch, in order
    tune_status: str = "UNKNOWN"  # TERMINATED | ERROR | PENDING | PAUSED, from Tune's snapshot
    error: str = ""  # the exception line of error.txt (also of a failure the trial recovered from)
    failures: int = 0  # times the trial failed (Tune restarted it from its checkpoint, or it ended in ERROR)
    errored: bool = False  # listed in the stage's errored_trials.json: the study's last run left it errored
    result_file: str = ""  # path of result.json in the study's filesystem
    corrupt: tuple = ()  # (line number, reason) of each result.json line that could not be read
    start_time: float = math.nan  # unix seconds: the first result's timestamp less its epoch's seconds
    end_time: float = math.nan  # unix seconds of the last result
    checkpoint: str = ""  # path (in the study's filesystem) of the latest checkpoint folder
    checkpoint_files: tuple = ()
    ended_by_error: bool = False  # its own exception ended it, reported, not raised (study.engine.trial_errors)
    primary: str = ""  # a workload study's primary metric (workload.json): NaN at the end is no result

    @property
    def outcome(self) -> str:
        """error | diverged | done | no result | running | pending | incomplete (stopped without finishing or
        erroring). "no result": finished without diverging, its primary metric NaN at the end.

        How the trial ended: an error.txt left by a failure Tune recovered from (the trial restarted from its
        checkpoint and finished) does not make it an error; `recovered` says that it happened."""
        oom = bool(self.rows) and self.rows[-1].get(M.STATUS) == M.STATUS_OOM  # ended at once, without raising
        if self.tune_status == "ERROR" or self.errored or oom or self.ended_by_error:
            return "error"
        if any(r.get(M.DIVERGED) is True or r.get(M.STATUS) == M.STATUS_DIVERGED for r in self.rows):
            return "diverged"
        if self.rows and self.rows[-1].get(M.STATUS) in FINISHED:
            nan = self.rows[-1].get(M.STATUS) == M.STATUS_DONE and self.primary and math.isnan(
                _number(self.last(self.primary)))
            return "no result" if nan else "done"
        if self.tune_status in UNFINISHED:
            return "running" if self.rows or self.tune_status != "PENDING" else "pending"
        if self.error and self.tune_status == "UNKNOWN":  # no Tune state says otherwise: it stopped at its error
            return "error"
        return "incomplete"

    @property
    def recovered(self) -> str:
        """"recovered after N failures" for a trial that failed and then finished (or is still going), else ""."""
        if not self.failures or self.outcome == "error":
            return ""
        return f"recovered after {self.failures} failure{'s' if self.failures > 1 else ''}"

    def last(self, key: str, default=math.nan):
        """The key's value in the last row that has it (test metrics appear only at the end)."""
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return default

    def last_finite(self, key: str) -> float:
        for row in reversed(self.rows):
            value = _number(row.get(key))
            if math.isfinite(value):
                return value
        return math.nan


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


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for bad or unsupported URIs
        raise StudyError(f"cannot open {uri}: {err}")
    return fs, path.rstrip("/") or "/"


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()


def read_json(fs: pafs.FileSystem, path: str):
    try:
        return json.loads(read_bytes(fs, path))
    except json.JSONDecodeError as err:
        raise StudyError(f"{path} is not valid JSON ({err}); was it cut short while being written?")


def _listing(fs: pafs.FileSystem, path: str) -> dict:
    """name -> FileType of the entries directly inside a folder."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {posixpath.basename(i.path.rstrip("/")): i.type for i in infos}


def _is_dir(kind) -> bool:
    return kind == pafs.FileType.Directory


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


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


def _read_or_warn(fs: pafs.FileSystem, path: str, kind: type, unreadable: list, instead: str):
    """A stored JSON file of the given type, or None with a line in `unreadable` that names the file and what the
    report does without it: one unreadable file (cut short by a crash, edited) leaves the rest of the report."""
    try:
        data = json.loads(read_bytes(fs, path))
        if not isinstance(data, kind):
            raise ValueError(f"a JSON {type(data).__name__}, not a {kind.__name__}")
        return data
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        unreadable.append(f"{path} cannot be read ({str(err).splitlines()[0][:120]}); {instead}")
        return None


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


def _read_stage(fs: pafs.FileSystem, stage_dir: str, stage: str, unreadable: list) -> list:
    """Every trial of one Tune experiment: those with a folder, and those experiment_state lists without one. A
    file that cannot be read is named in `unreadable`, and the stage is read without it."""
    listing = _listing(fs, stage_dir)
    try:
        states = _trial_states(fs, stage_dir, listing)
    except StudyError as err:
        unreadable.append(f"{err}; the trials are read from their folders, their Tune statuses unknown")
        states = {}
    errored = (_read_or_warn(fs, f"{stage_dir}/{ERRORED_FILE}", list, unreadable,
                             "errored trials are told by Tune's statuses alone")
               if ERRORED_FILE in listing else None) or []
    trials = {}
    for name in sorted(n for n, kind in listing.items() if _is_dir(kind) and not n.startswith(".")):
        trial = _read_trial(fs, f"{stage_dir}/{name}", stage, name, states.get(name), unreadable)
        if trial is not None:
            trial.errored = name in errored
            trials[name] = trial
    for dirname, state in sorted(states.items()):
        if dirname not in trials:  # listed by Tune, but no folder (never started, or not yet synced)
            trials[dirname] = Trial(stage=stage, trial_id=state["trial_id"], dirname="", config=state["config"],
                                    tune_status=state["status"])
    return sorted(trials.values(), key=lambda t: (t.trial_id, t.dirname))


def _trial_states(fs: pafs.FileSystem, stage_dir: str, listing: dict) -> dict:
    """Trial folder name (trial id for one never started) -> {trial_id, status, config, failures}, from the stage's
    newest experiment snapshot (the one Tune restores from); {} before Tune wrote its first one.

    Read as plain JSON, never through Tune's reader: that one unpickles the objects Tune's encoder embedded (a
    config value JSON cannot hold, the trial's resources), so a snapshot in a folder someone else could write would
    run their code. Such values stay what they are stored as, {"_type": "CLOUDPICKLE_FALLBACK", ...}."""
    snapshots = sorted(n for n in listing if EXPERIMENT_STATE.match(n))  # named by time: the newest sorts last
    if not snapshots:
        return {}
    path = f"{stage_dir}/{snapshots[-1]}"
    try:
        states = {}
        for entry in json.loads(read_bytes(fs, path))["trial_data"]:
            trial, run = json.loads(entry[0]), json.loads(entry[1])
            status = trial["status"]
            states[trial.get("relative_logdir") or trial["trial_id"]] = {
                "trial_id": trial["trial_id"], "config": trial.get("config") or {},
                # as Tune's reader has it: a trial stored running starts again when the stage is restored
                "status": "PENDING" if status == "RUNNING" else status, "failures": run.get("num_failures")}
    except (ValueError, KeyError, TypeError, IndexError) as err:  # cut short, or not a snapshot of this Tune
        raise StudyError(f"{path}: Tune's experiment snapshot cannot be read ({type(err).__name__}: {err}); was it "
                         f"cut short while being written?")
    return states


def _read_trial(fs, trial_dir: str, stage: str, dirname: str, state: dict | None, unreadable: list) -> Trial | None:
    files = _listing(fs, trial_dir)
    if "params.json" not in files and state is None:
        return None  # not a trial folder (e.g. a report written into the study folder)
    config = None
    if "params.json" in files:
        config = _read_or_warn(fs, f"{trial_dir}/params.json", dict, unreadable,
                               "its config taken from Tune's snapshot" if state else "the trial is left out")
    if config is None:
        if state is None:
            return None
        config = state["config"]
    corrupt = []
    running = (state or {}).get("status", "RUNNING") in UNFINISHED  # no state yet: a study still starting
    rows = parse_results(read_bytes(fs, f"{trial_dir}/{M.RESULT_FILE}"), corrupt, running) \
        if M.RESULT_FILE in files else []
    error_text = read_bytes(fs, f"{trial_dir}/error.txt").decode(errors="replace") if "error.txt" in files else ""
    error = error_reason(error_text) if "error.txt" in files else ""
    ended_by_error = bool(rows) and rows[-1].get(M.STATUS) == M.STATUS_ERROR
    if ended_by_error:  # its last row trained nothing: only the exception's line (traceback.txt has the rest)
        error = rows.pop().get(M.MESSAGE) or "error"
    if not error and rows and rows[-1].get(M.STATUS) == M.STATUS_OOM:  # ended by out-of-memory without raising
        error = rows[-1].get(M.MESSAGE) or "CUDA out of memory"
    checkpoints = sorted(n for n, kind in files.items() if _is_dir(kind) and n.startswith("checkpoint_"))
    checkpoint = f"{trial_dir}/{checkpoints[-1]}" if checkpoints else ""
    state = state or {}
    end = _number(rows[-1].get("timestamp")) if rows else math.nan
    # Tune's timestamp is whole seconds: good enough for a timeline
    start = _number(rows[0].get("timestamp")) - _number(rows[0].get("time_this_iter_s", 0)) if rows else math.nan
    trial_id = state.get("trial_id") or (rows[0].get("trial_id") if rows else "") or dirname
    failures = state.get("failures")
    if not isinstance(failures, int):  # no experiment state: Tune writes one "Failure # N" header per failure
        failures = len(re.findall(r"^Failure # \d+", error_text, re.MULTILINE))
    return Trial(stage=stage, trial_id=trial_id, dirname=dirname, config=config, rows=rows,
                 tune_status=state.get("status", "UNKNOWN"), error=error, failures=failures,
                 result_file=f"{trial_dir}/{M.RESULT_FILE}", corrupt=tuple(corrupt), start_time=start, end_time=end,
                 checkpoint=checkpoint, checkpoint_files=tuple(sorted(_listing(fs, checkpoint))) if checkpoint else (),
                 ended_by_error=ended_by_error)


def parse_results(raw: bytes, corrupt: list | None = None, still_writing: bool = False) -> list:
    """result.json rows, one per epoch in epoch order; after a restart from a checkpoint Tune appends the repeated
    epochs again, and the later row wins. A line that is not a JSON object is skipped and appended to `corrupt` as
    (line number from 1, reason), except, while the trial runs (`still_writing`), a last line with no newline yet."""
    by_epoch = {}
    for line in result_lines(raw):
        if line.row is None:
            if not line.blank and corrupt is not None and not (line.cut and still_writing):
                why = "cut short, no newline" if line.cut else line.problem
                corrupt.append((line.number, f"not a result row ({why}); skipped"))
            continue
        row = dict(line.row)
        row.pop("config", None)  # the same as params.json, repeated on every line
        by_epoch.pop(row.get(M.EPOCH), None)
        by_epoch[row.get(M.EPOCH)] = row
    return sorted(by_epoch.values(), key=lambda r: _number(r.get(M.EPOCH)))


def error_reason(text: str) -> str:
    """The exception line of a Tune error.txt: its last non-empty line (the first one is only a timestamp)."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "error (error.txt is empty)"


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
