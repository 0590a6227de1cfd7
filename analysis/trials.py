"""The stored trials of one stage, read from Tune's files: each trial's result.json rows, params.json, error.txt and
checkpoint folders, and Tune's experiment snapshot (experiment_state-*.json) for the statuses of all of them.

Apart from analysis.load, which finds a study folder, tells its kind and builds the Study: this module knows Tune's
per-trial layout and nothing of studies, kinds or papers. What comes from where:
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

import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from study import metrics as M
from study.metrics import ERRORED_FILE
from study.errors import StudyError
from study.result_rows import result_lines

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
