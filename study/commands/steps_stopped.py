"""The steps study's stopping rule across a --resume: the rule's record rebuilt from what the stage stored (prime),
and stopped_by_rule.json, the trials it stopped (trial folder -> step), this run's added to earlier runs'
(save_stopped). Used by study.commands.steps_study.
"""

import math
from pathlib import Path

from study import metrics as M
from study import result_rows
from study.engine import steps as S
from study.engine.steps import STAGE
from study.commands.study_folder import StudyFolder


def stored_rows(folder: StudyFolder) -> dict:
    """Trial folder -> (config, rows) of what the stage stored so far."""
    import pyarrow.fs as pafs

    out = {}
    try:
        infos = folder.fs.get_file_info(pafs.FileSelector(f"{folder.path}/{STAGE}"))
    except OSError:
        return out
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with folder.fs.open_input_stream(f"{info.path}/{M.RESULT_FILE}") as src:
                rows = result_rows.rows(src.read())  # a line cut short by a crash: the rows before it stand
        except OSError:
            continue
        if rows:
            out[Path(info.path).name] = (rows[0].get("config", {}), rows)
    return out


def prime(stopper, folder: StudyFolder, limits: S.TrialLimits) -> None:
    """On --resume: the rule's record of reaching trials, rebuilt from the stored rows (Tune's restore brings back
    the stopper as the study started it, empty)."""
    for name, (config, rows) in stored_rows(folder).items():
        first = next((r for r in rows if limits.goal.reached(float(r.get(limits.goal.metric, math.nan)))), None)
        if first is not None:
            stopper.rule.reached(config["batch_size"], rows[0].get("trial_id", name), first[S.STEP])
    earlier = f"{STAGE}/{M.STOPPED_FILE}"
    if folder.has(earlier):
        stopper.stopped.update(folder.read_json(earlier))


def save_stopped(folder: StudyFolder, stopper, results) -> None:
    """stopped_by_rule.json: trial folder -> step, this run's stops added to any earlier run's."""
    earlier = f"{STAGE}/{M.STOPPED_FILE}"
    stopped = dict(folder.read_json(earlier)) if folder.has(earlier) else {}
    folders = {(r.metrics or {}).get("trial_id"): Path(r.path).name for r in results}
    for trial_id, step in stopper.stopped.items():
        stopped[folders.get(trial_id, trial_id)] = step
    folder.write_json(earlier, stopped)

