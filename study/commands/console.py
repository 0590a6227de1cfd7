"""What a study prints while it runs: one compact table per stage and a progress line, in place of Tune's
per-trial boxes (those, and Ray's warnings, come back with --verbose).

On a terminal the table is redrawn in place; in a log (stdout not a terminal) a progress line is printed now
and then and the table once, at the end of the stage. A stage with more trials than fit a screen shows one row
per configuration, its repeated runs (a grid's `run` or `seed` axis, metrics.REPEATS) counted together.
"""

import contextlib
import logging
import math
import os
import shlex
import shutil
import sys
import time

from ray import tune

from study import metrics as M
from study.metrics import REPEATS
from study.data.progress import LOG_EVERY_S  # one cadence for every progress line in a log

REDRAW_EVERY_S = 1.0
FINISHED = ("done", "no result", "diverged", "out of memory", "error")  # row statuses of trials that ended
QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.air")  # their warnings are benign in a study (snapshot timing, ...)
# Logs a trial's traceback each time the trial fails; Tune writes it to the trial's error.txt as well, and the
# stage's end names that file (study.engine.trial_errors.summary).
TRIAL_FAILURE_LOGGER = "ray.tune.execution.tune_controller"


def trial_failure_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: False for Tune's "Trial task failed" record (its traceback), True for the rest."""
    return not str(record.msg).startswith("Trial task failed")


@contextlib.contextmanager
def tune_console(verbose: bool):
    """While a stage runs: Ray's benign warnings and the tracebacks of failed trials (they are in the trial folders)
    hidden unless --verbose (other errors stay visible), and Tune's older console, which prints nothing at
    verbose=0 and never the TensorBoard hint of a temporary staging folder (the newer one prints both even at
    verbose=0). Everything is put back afterwards."""
    saved_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        logging.getLogger(TRIAL_FAILURE_LOGGER).addFilter(trial_failure_traceback)
    try:
        yield
    finally:
        logging.getLogger(TRIAL_FAILURE_LOGGER).removeFilter(trial_failure_traceback)
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def tensorboard_hint(uri: str) -> str:
    return f"TensorBoard: tensorboard --logdir {uri}"


def started(uri: str) -> None:
    print(f"study folder: {uri}\n{tensorboard_hint(uri)}")


def finished(uri: str, results) -> int:
    """Where the results are and the report's command; the exit status: 1 when a trial failed or ran out of
    memory (the others' results are stored all the same)."""
    print(f"results: {uri}  (report: python -m analysis.report {shlex.quote(uri)})")
    return 1 if any(r.error is not None or (r.metrics or {}).get(M.STATUS) in M.ENDED for r in results) else 0


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


class StudyConsole(tune.Callback):
    """columns: config keys shown per row (the grid's axes); metrics: the stage's key metrics (last reported);
    primary: the metric a finished trial is for (NaN at its end: "no result", not "done"). A study whose trials end
    in its own words (study.commands.steps_console) overrides `finished_words`, `outcome` and `status_text`."""

    finished_words = FINISHED  # the status words of trials that ended

    def __init__(self, stage: str, columns: list[str], metrics: list[str], primary: str | None = None):
        self.stage, self.columns, self.metrics, self.primary = stage, columns, metrics, primary
        self.live = sys.stdout.isatty()  # (no stream kept: Tune pickles its callbacks with the run config)
        self.trials = {}  # trial -> {"config", "epoch", "epochs", "status", metric: value}
        self.total = 0
        self.started = time.monotonic()
        self._drawn_lines = 0
        self._last_draw = -math.inf
        self._dirty = False

    def setup(self, total_num_samples: int = 0, **info):
        self.total = total_num_samples or 0
        self.started = time.monotonic()

    def _row(self, trial) -> dict:
        if trial not in self.trials:
            self.trials[trial] = {"config": trial.config, "epoch": 0, "epochs": trial.config.get("epochs", 1),
                                  "status": "pending"}
        return self.trials[trial]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "running"
        self._dirty = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["epoch"] = result.get(M.EPOCH, row["epoch"])
        row["status"] = ended(result) or "running"
        row.update({m: result[m] for m in self.metrics if m in result})
        self._dirty = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        last = trial.last_result or {}
        row["status"] = self.outcome(last)
        self._dirty = True

    def outcome(self, last: dict) -> str:
        """The status word of a trial Tune calls complete, from its last result."""
        return ended(last) or ("no result" if no_result(last, self.primary) else "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "error"
        self._dirty = True
        self._drawn_lines = 0  # Tune has just printed the error: the next table goes below it, never over it

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:  # pending trials too, so the table shows the whole grid
            self._row(trial)
        now = time.monotonic()
        if self.live and self._dirty and now - self._last_draw >= REDRAW_EVERY_S:
            self._draw(self.table() + [self.progress()])
        elif not self.live and now - self._last_draw >= LOG_EVERY_S:
            self._draw([self.progress()])

    def on_experiment_end(self, trials, **info):
        self._draw(self.table() + [self.progress()])
        self._drawn_lines = 0  # the next stage starts below this one

    def _draw(self, lines: list[str]) -> None:
        if self.live and self._drawn_lines:
            sys.stdout.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # back to the table's first line, clear below
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._drawn_lines = len(lines) if self.live else 0
        self._last_draw, self._dirty = time.monotonic(), False

    def progress(self) -> str:
        rows = list(self.trials.values())
        total = max(self.total, len(rows))
        finished = sum(r["status"] in self.finished_words for r in rows)
        running = sum(r["status"] == "running" for r in rows)
        epochs_total = sum(r["epochs"] for r in rows) + (total - len(rows)) * (rows[0]["epochs"] if rows else 1)
        epochs_done = sum(r["epochs"] if r["status"] in self.finished_words else r["epoch"] for r in rows)
        elapsed = time.monotonic() - self.started
        if finished == total:
            left = "stage finished"
        elif epochs_done:  # the epochs so far set the pace (a trial's start-up counts into it)
            left = f"about {duration(elapsed * (epochs_total - epochs_done) / epochs_done)} left"
        else:
            left = "time left known after the first epoch"
        return (f"[{self.stage}] {finished}/{total} trials finished, {running} running; "
                f"elapsed {duration(elapsed)}, {left}")

    def table(self) -> list[str]:
        rows = list(self.trials.values())
        columns = self.columns
        screen = shutil.get_terminal_size((100, 40)).lines
        if len(rows) > max(screen - 6, 10):  # one row per configuration, its repeats counted together
            columns = [c for c in self.columns if c not in REPEATS]
        groups = {}
        for r in rows:
            groups.setdefault(tuple(r["config"].get(c, "") for c in columns), []).append(r)
        header = [*columns, "status", *self.metrics]
        body = []
        for key, members in sorted(groups.items(), key=lambda kv: [sort_key(v) for v in kv[0]]):
            body.append([*(cell(v) for v in key), self.status_text(members),
                         *(cell(mean([m.get(name, math.nan) for m in members])) for name in self.metrics)])
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return [fmt(header)] + [fmt(b) for b in body]

    def status_text(self, members: list[dict]) -> str:
        return status_of(members)


def ended(result: dict) -> str:
    """The status word of a row that ended its trial early (diverged, out of memory, its own error), else ""."""
    if result.get(M.DIVERGED):
        return "diverged"
    return {M.STATUS_OOM: "out of memory", M.STATUS_ERROR: "error"}.get(result.get(M.STATUS), "")


def no_result(last: dict, primary: str | None) -> bool:
    """A trial that finished without diverging but whose primary metric is NaN at its end (e.g. a metric undefined
    on its split) has no result to show: not "done"."""
    value = last.get(primary) if primary else None
    return isinstance(value, float) and math.isnan(value)


def sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def status_of(members: list[dict]) -> str:
    if len(members) == 1:
        m = members[0]
        return f"epoch {m['epoch']}/{m['epochs']}" if m["status"] == "running" else m["status"]
    counts = {}
    for m in members:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan

