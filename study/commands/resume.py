"""What a resumed stage does to what its trials stored before: each epoch stays stored once, and --retry-errored
runs out-of-memory trials again.

- A trial restarts from its latest checkpoint (epoch e) and reports the epochs after e again: after a driver stop
  those stored after Tune's last experiment snapshot, with a --checkpoint-every > 1 those since the last
  checkpoint. `StoredOnce`, the first callback of every stage, removes those rows from result.json, progress.csv
  and the TensorBoard event files before the loggers reopen them, so each epoch is stored once, as the restarted
  trial reports it (on CPU the same numbers).
- Tune keeps a trial's two newest checkpoints and writes its experiment snapshot every few seconds, so a driver
  stopped between the two can leave a snapshot naming a checkpoint already deleted; Tune's restore then fails that
  trial ("Could not recover from checkpoint as it does not exist on storage anymore"), retry after retry.
  `forget_lost_checkpoints` makes such a trial start again from scratch instead (StoredOnce then removes all it
  stored), which costs its epochs but never an epoch stored twice or a lost trial.
- An out-of-memory trial ends normally in Tune's eyes (study.engine.bridge.trial_entry: so that Tune does not retry
  it in the same share), and so does one its own error ended (study.engine.trial_errors), so a restore would keep it
  finished. `mark_out_of_memory_errored` turns it into an
  errored trial in Tune's newest experiment snapshot before `Tuner.restore(resume_errored=True)`, which then
  continues it from its checkpoint with the resources the resumed study asks for (--gpus-per-trial).
"""

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
from ray import tune

from study import metrics as M
from study.atomic import replace_file
from study.metrics import PROGRESS_FILE, RESULT_FILE
from study.result_rows import result_lines

TUNER_FILE = "tuner.pkl"  # Tune's record of a stage's Tuner, written before its first experiment snapshot
EVENTS_PREFIX = "events.out.tfevents"
# On every row of a steps trial. Only those trials key their TensorBoard events by the training step; workload
# trials also report a step, but key their events by the epoch.
STEPS_ROW_KEY = M.STEPS_TO_RESULT


def _after(value, epoch: float) -> bool:
    try:
        return float(value) > epoch
    except (TypeError, ValueError):
        return False  # not an epoch row: left as it is


def trimmed_results(text: str, epoch: float) -> str:
    """result.json without rows after `epoch`, nor a last line cut short by a killed driver."""
    return "".join(line.text for line in result_lines(text)
                   if not line.cut and not (line.row is not None and _after(line.row.get(M.EPOCH), epoch)))


def trimmed_progress(text: str, epoch: float) -> str:
    """progress.csv (written by csv.DictWriter, excel dialect) without rows after `epoch` or cut short."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or M.EPOCH not in rows[0]:
        return text
    if not text.endswith("\n"):
        rows = rows[:-1]
    column = rows[0].index(M.EPOCH)
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(rows[0])
    writer.writerows(r for r in rows[1:] if not (len(r) > column and _after(r[column], epoch)))
    return out.getvalue()


def trimmed_events(data: bytes, epoch: float) -> bytes:
    """A TensorBoard event file without the steps after `epoch` (the event's step: the epoch, or in a steps study
    the training step) and without the hparams session's end: the trial is running again and writes its end when
    it ends."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata
    from tensorboard.summary.writer.record_writer import RecordWriter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events"
        path.write_bytes(data)
        events = list(EventFileLoader(str(path)).Load())
    out = io.BytesIO()
    writer = RecordWriter(out)
    for event in events:
        ended = any(v.tag == metadata.SESSION_END_INFO_TAG for v in event.summary.value)
        if event.step <= epoch and not ended:
            writer.write(event.SerializeToString())
    return out.getvalue()


def trim_trial_folder(fs: pafs.FileSystem, path: str, epoch: float, step: int | None = None) -> None:
    """Drop what a trial stored after `epoch` from its folder (local, or remote through pyarrow). `step`: the
    checkpoint's training step where the trial has one (steps studies): their TensorBoard events are keyed by it."""
    try:
        names = [Path(info.path).name for info in fs.get_file_info(pafs.FileSelector(path))]
    except (FileNotFoundError, OSError):
        return  # nothing stored there yet
    for name in names:
        if name == RESULT_FILE:
            trim = lambda b: trimmed_results(b.decode(), epoch).encode()  # noqa: E731
        elif name == PROGRESS_FILE:
            trim = lambda b: trimmed_progress(b.decode(), epoch).encode()  # noqa: E731
        elif name.startswith(EVENTS_PREFIX):
            trim = lambda b: trimmed_events(b, epoch if step is None else step)  # noqa: E731
        else:
            continue
        with fs.open_input_stream(f"{path}/{name}") as src:
            before = src.read()
        after = trim(before)
        if after != before:
            # A new file in place of the old one (study.atomic): a TensorBoard writer of this trial still open on the
            # old file (a worker restart in the same run) writes into the replaced one, never into what is kept
            # here; a driver killed meanwhile leaves the old file, which the next --resume trims again.
            replace_file(fs, f"{path}/{name}", after)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def restart_point(trial) -> tuple[float, int | None] | None:
    """The last epoch a starting trial keeps, as a float (a steps trial's rows carry step / steps per epoch), and its
    checkpoint's training step where the events are keyed by it (steps trials): (-1, -1) without a checkpoint (it
    starts from scratch and reports everything again); None when that cannot be told, and then nothing is removed."""
    result = trial.latest_checkpoint_result
    if result is None:
        return -1.0, -1
    metrics = result.metrics or {}
    epoch, step = metrics.get(M.EPOCH), metrics.get(M.STEP)
    if not _finite(epoch):
        return None
    return float(epoch), (int(step) if STEPS_ROW_KEY in metrics and _finite(step) else None)


def restart_epoch(trial) -> float | None:
    """The last epoch a starting trial keeps (see restart_point)."""
    point = restart_point(trial)
    return None if point is None else point[0]


class StoredOnce(tune.Callback):
    """Before a trial (re)starts, and before the loggers reopen its files, remove what it will report again: in
    the study's storage, where Tune's loggers restore result.json and progress.csv from, and in the driver's
    staging folder, which Tune uploads to the storage."""

    def on_trial_start(self, iteration, trials, trial, **info):
        point = restart_point(trial)
        if point is None:
            return
        trim_trial_folder(trial.storage.storage_filesystem, trial.path, *point)
        if trial.local_path and trial.local_path != trial.path:
            trim_trial_folder(pafs.LocalFileSystem(), trial.local_path, *point)


def start_over(fs: pafs.FileSystem, stage_path: str) -> None:
    """Empty a stage folder that Tune cannot resume (its tuner.pkl, no snapshot), tuner.pkl last: a driver killed
    meanwhile leaves a stage that still reads as such, and the next --resume empties it again."""
    for info in fs.get_file_info(pafs.FileSelector(stage_path)):
        if Path(info.path).name == TUNER_FILE:
            continue
        (fs.delete_dir if info.type == pafs.FileType.Directory else fs.delete_file)(info.path)
    fs.delete_dir_contents(stage_path)


SNAPSHOT_PATTERN = "experiment_state-*.json"  # Tune restores from the newest (greatest name) of these


def newest_snapshot(fs: pafs.FileSystem, stage_path: str) -> tuple[str, dict] | None:
    """(path, contents) of the experiment snapshot Tune restores a stage from; None when it has none."""
    import fnmatch

    names = [Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(stage_path))]
    snapshots = fnmatch.filter(names, SNAPSHOT_PATTERN)
    if not snapshots:
        return None
    path = f"{stage_path}/{max(snapshots)}"
    with fs.open_input_stream(path) as src:
        return path, json.loads(src.read())


def edit_snapshot(fs: pafs.FileSystem, stage_path: str, edit) -> list[str]:
    """Apply edit(entry) to each [trial JSON, run metadata JSON] entry of the stage's newest snapshot; edit changes
    the entry in place and returns the trial's id when it did. The snapshot is rewritten only when one changed."""
    found = newest_snapshot(fs, stage_path)
    if found is None:
        return []
    path, state = found
    edited = [i for i in (edit(entry) for entry in state.get("trial_data", [])) if i is not None]
    if edited:
        replace_file(fs, path, json.dumps(state).encode())
    return edited


def forget_lost_checkpoints(fs: pafs.FileSystem, stage_path: str) -> list[str]:
    """In the newest snapshot, a trial to be continued whose latest checkpoint is gone from its folder forgets its
    checkpoints, so the restore starts it from scratch instead of failing it. Checked in the stage folder as it is
    now (Tune maps the snapshot's paths there too when a study was moved). Returns those trials' ids."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata  # the snapshot's own format (Ray internals)

    def forget(entry):
        trial = json.loads(entry[0])
        if trial.get("status") == "TERMINATED":
            return None  # not run again
        run = _TrainingRunMetadata.from_json_state(entry[1])
        manager = run.checkpoint_manager
        latest = manager.latest_checkpoint_result if manager is not None else None
        if latest is None:
            return None
        where = Path(latest.checkpoint.path)
        if fs.get_file_info(f"{stage_path}/{where.parent.name}/{where.name}").type != pafs.FileType.NotFound:
            return None
        manager._checkpoint_results, manager._latest_checkpoint_result = [], None
        run.invalidate_cache()
        entry[1] = run.get_json_state()
        return trial.get("trial_id")

    return edit_snapshot(fs, stage_path, forget)


def mark_out_of_memory_errored(fs: pafs.FileSystem, stage_path: str) -> list[str]:
    """In Tune's newest experiment snapshot of a stage, mark each trial that ended out of memory (or by its own
    error, status error) as errored, so a restore with resume_errored continues it from its last checkpoint.
    Returns their trial ids."""
    def mark(entry):
        trial, run = json.loads(entry[0]), json.loads(entry[1])
        ended = (run.get("last_result") or {}).get(M.STATUS) in M.ENDED
        if trial.get("status") != "TERMINATED" or not ended:
            return None
        trial["status"] = "ERROR"
        entry[0] = json.dumps(trial, indent=2)
        return trial.get("trial_id")

    return edit_snapshot(fs, stage_path, mark)
