"""A trial's own exceptions: which end it at once and which Tune may retry, and the study's one line per error.

Tune retries every exception a trainable raises (--max-failures times, from the last checkpoint). That is what a
lost worker or node needs (those never reach the trainable's code) and what an exception another try may pass
needs (I/O, storage, host memory, the accelerator, Ray itself); for a bug it is a waste: the same exception at the
same place, each time after the epochs before it, and a traceback per try on the console. So the trial bridge
(study.engine.bridge.trial_entry) asks `ends_trial`:
- an exception of a kind another try may pass (RETRIED) is raised for Tune to retry, and its line (type, first
  line of the message, place) is kept in the trial's folder; the same line on a later try ends the trial;
- any other exception (TypeError, ValueError, a shape or dtype mismatch's RuntimeError, ...) ends it at once.
A trial ended so reports one last row, status `error` with the exception's line as MESSAGE, and leaves the full
traceback in traceback.txt in its folder (`record`); the study counts it as errored (exit 1, errored_trials.json;
`--resume --retry-errored` tries it again, after a fix) and ends with one line per distinct error (`summary`).
"""

import traceback
from collections import Counter
from pathlib import Path

from study import metrics as M


def retried() -> tuple:
    """Exception types another try may pass (a fresh worker, the storage back, another device)."""
    import torch
    from ray.exceptions import RayError

    device = getattr(torch, "AcceleratorError", None)  # a CUDA error (torch 2.8 on); before, a bare RuntimeError
    return (OSError, MemoryError, EOFError, RayError) + ((device,) if device else ())


def line_of(err: BaseException) -> str:
    """The exception's type, the first line of its message, and where it was raised: what makes two the same."""
    frames = traceback.extract_tb(err.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    message = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {message}{place}"


def ends_trial(err: Exception) -> bool:
    """Whether err ends this trial now, unretried; if not, its line is kept for the next try to compare."""
    line = line_of(err)
    if not isinstance(err, retried()):
        return True
    if _read(M.LAST_FAILURE_FILE) == line:
        return True
    _write(M.LAST_FAILURE_FILE, line)
    return False


def record(err: Exception) -> str:
    """traceback.txt in the trial's folder; returns the exception's line, the last row's MESSAGE."""
    _write(M.TRACEBACK_FILE, "".join(traceback.format_exception(err)))
    return line_of(err)


def _storage():
    """The trial's folder in the study's storage (local or remote), as Tune's own files reach it."""
    from ray import tune

    get_storage = getattr(tune.get_context(), "get_storage", None)  # a developer API: absent outside a trial
    storage = get_storage() if get_storage else None
    if storage is None:
        return None, None
    return storage.storage_filesystem, storage.trial_fs_path


def _read(name: str) -> str:
    fs, folder = _storage()
    if fs is None:
        return ""
    try:
        with fs.open_input_stream(f"{folder}/{name}") as src:
            return src.read().decode(errors="replace")
    except OSError:  # none yet (FileNotFoundError included)
        return ""


def _write(name: str, text: str) -> None:
    fs, folder = _storage()
    if fs is None:  # no trial folder to write to: the worker's log keeps it
        print(f"{name}:\n{text}")
        return
    try:
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/{name}") as out:
            out.write(text.encode())
    except OSError as err:  # the storage is away: the worker's log keeps it
        print(f"could not write {folder}/{name} ({err}):\n{text}")


def summary(results) -> list[str]:
    """One line per distinct error of a stage's trials: how many, its line, where the full traceback is."""
    found = {}  # line -> [trial folders' traceback paths]
    for r in results:
        last = r.metrics or {}
        if last.get(M.STATUS) in M.ENDED:
            line = last.get(M.MESSAGE) or last[M.STATUS]
            where = f"{r.path}/{M.TRACEBACK_FILE}" if last[M.STATUS] == M.STATUS_ERROR else ""
        elif r.error is not None:  # raised: what Tune retried until --max-failures, or a lost worker
            lines = [s.strip() for s in str(r.error).splitlines() if s.strip()]
            line, where = (lines[-1] if lines else type(r.error).__name__), f"{r.path}/error.txt"
        else:
            continue
        found.setdefault(line, []).append(where)
    counts = Counter({line: len(paths) for line, paths in found.items()})
    out = []
    for line, n in counts.most_common():
        where = found[line][0]
        trials = f"{n} trial{'s' if n > 1 else ''}"
        out.append(f"error in {trials}: {line}" + (f"; traceback: {where}" if where else ""))
    return out
