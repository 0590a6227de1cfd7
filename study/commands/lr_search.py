"""A workload's learning-rate search before its sweep (`python -m study run WORKLOAD --lr-search`), when the workload
declares one: Workload.stages["lr_search"] = {"lr_grid", "fine_factors", "batch_size", "select"}.

Stage lr_coarse trains at the search batch size on each rate of the grid; stage lr_fine on multiples of the best
one; the best of both (on `select`, a prefixed metric, in its declared direction; finished, not diverged) becomes the
sweep's one learning rate, stored in chosen_lr.json (a --resume reads it back instead of searching again).
"""

import math

from study import metrics as M
from study.errors import StudyError

STAGES = ("lr_coarse", "lr_fine")


def best(results, select: str, higher_is_better: bool) -> dict | None:
    """The trial with the best final `select` among those that finished and did not diverge: {"lr", select}."""
    found = None
    for result in results:
        cfg, last = result.config or {}, result.metrics or {}
        value = last.get(select, math.nan)
        if (not cfg or result.error is not None or last.get(M.DIVERGED) or not math.isfinite(value)
                or last.get(M.EPOCH) != cfg["epochs"]):
            continue
        if found is None or (value > found[select] if higher_is_better else value < found[select]):
            found = {"lr": cfg["lr"], select: value}
    return found


def search(workload, args, base: dict, run, folder) -> dict:
    """run(stage, space) runs one Tune stage of the trainable and returns its results. Returns chosen_lr.json's
    record: {"lr", "coarse_lr", "selected_on", <select>: value}."""
    from study.commands.tuning import grid_axis

    spec = workload.stages["lr_search"]
    select, batch = spec["select"], spec["batch_size"]
    higher = workload.metric(select).higher_is_better
    common = dict(base, batch_size=batch, seed=batch, run=0, optimizer=args.optimizers[0], lr_scaling="none",
                  noise_scale=False)
    coarse = best(run("lr_coarse", dict(common, stage="lr_coarse", lr=grid_axis(spec["lr_grid"]))), select, higher)
    if coarse is None:
        raise StudyError(f"lr_coarse: every learning rate diverged or failed; see {folder.child('lr_coarse')}")
    fine = best(run("lr_fine", dict(common, stage="lr_fine",
                                    lr=grid_axis([coarse["lr"] * f for f in spec["fine_factors"]]))), select, higher)
    chosen = fine if fine is not None else coarse  # the fine grid holds factor 1 too: only failures fall back
    return dict(chosen, coarse_lr=coarse["lr"], selected_on=select)
