"""The one training loop, free of Ray and of workloads: `fit`.

It evaluates at step 0 and then on a schedule: at every epoch's end (a workload's run trial, the two papers'
trials), or at given training steps counted across epochs (the steps-to-result trial); a stop predicate, called on
each evaluation row, may end training there (the steps trial's limits). Each row and a resumable state go to
`report` (the trial bridge, study.engine.bridge, turns them into `tune.report` with a checkpoint).
The data order of epoch e and its augmentation are drawn from (seed, e) alone, so a trial resumed from the
checkpoint of any step, mid-epoch too, continues exactly as an uninterrupted one would (bit for bit on CPU).
"""

import copy
import math
import time
from typing import Callable, Sequence

import torch

from study import metrics as M
from study.engine.eval_schedule import settled
from study.engine.lr_scaling import lr_at, scaled_lr, set_lr
from study.engine.noise import NoiseScale, ProbeClock
from study.engine.train import epoch_generator, rng_state, set_rng_state, sync

AUG_STATE = "aug_state"  # in a mid-epoch checkpoint: the augmentation generator's state at the checkpoint's step


def fit(model, optimizer, batches, loss_fn: Callable, evaluate: Callable[[torch.nn.Module], dict], report: Callable,
        *, cfg, device: torch.device, prepare: Callable | None = None, start: dict | None = None,
        select: str | None = None, maximise: bool = True, autocast_dtype: torch.dtype | None = None,
        eval_steps: Sequence[int] | None = None, stop: Callable[[dict], str | None] | None = None,
        keep_steps: Sequence[int] = (), rewind_on: tuple = (), screen: Callable[[dict], str | None] | None = None,
        refine: Callable[[dict], bool] | None = None) -> dict:
    """Train `model` until the last evaluation of the schedule, or until `stop` or divergence ends it; returns the
    final state (see `snapshot` below).

    batches: has `epoch(generator)` yielding (x, y) on the device, `len()`, `x` (the split) and `batch_size`.
    prepare(x, generator): turns a raw training batch into model input on the device (augmentation); None: identity.
    evaluate(model) -> metrics dict; report(row, state) at every evaluation, step 0 included.
    eval_steps: the training steps (ascending, counted across epochs) to evaluate at after step 0; None: at every
    epoch's end for cfg.epochs epochs. The lr schedule ends at the last of them. Rows carry the epoch as a whole
    number on the epoch schedule, as step / steps per epoch on a step schedule.
    stop(row) -> a status that ends training at this row, or None to go on; where it gives None, divergence and
    the schedule's last evaluation end training all the same, as `diverged` and `done`.
    select: a metric to maximise (minimise with maximise=False); the state then carries the best row's weights
    ("best_model"). start: a state from an earlier `report` to resume from (as loaded from a checkpoint).
    keep_steps, rewind_on: steps between evaluations whose weights are kept, not evaluated; when an evaluation's
    stop status is in rewind_on, the steps kept since the previous evaluation are evaluated in order and reported,
    and the first whose status is also in rewind_on ends training there (study.engine.eval_schedule states the rule).
    screen(row) -> a status, like stop (None: no screen): evaluate(model, settles) may stop early where no metric
    value within its bounds gives a status (a screened row: metrics NaN, M.SCREENED); such a row is reported once the
    next is known, evaluated whole first when that next one's status is in rewind_on. refine(row): on a row that
    goes on, True evaluates every kept step from then on.
    """
    steps_per_epoch = len(batches)
    at = list(eval_steps) if eval_steps is not None else [e * steps_per_epoch for e in range(1, cfg.epochs + 1)]
    base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    schedule, final = cfg.schedule, cfg.final_lr_factor
    noise = NoiseScale(model, cfg.noise_every, seed=cfg.seed) if cfg.noise_scale else None  # the model: its BN layers
    clock = ProbeClock(device)
    state = {"epoch": epoch_of(0, steps_per_epoch, eval_steps), "step": 0, "train_seconds": 0.0,
             "best": {"value": -math.inf, "epoch": -1}, "best_model": None}
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        set_rng_state(start, device)
        # A checkpoint from before the steps trial shared this loop holds whole epochs and no step.
        step = start["step"] if "step" in start else start["epoch"] * steps_per_epoch
        state.update({k: start[k] for k in ("best", "best_model") if k in start})
        state.update(step=step, epoch=epoch_of(step, steps_per_epoch, eval_steps),
                     train_seconds=start["train_seconds"])
    aug = None  # the epoch's augmentation generator (with `prepare` only)

    def snapshot():
        # A mid-epoch restart skips the epoch's batches before its step without drawing their augmentation, so it
        # takes the augmentation generator up where the checkpoint left it.
        mid_epoch = aug is not None and state["step"] % steps_per_epoch
        return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(), **rng_state(device),
                **({AUG_STATE: aug.get_state()} if mid_epoch else {})}

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return loss_fn(model(x), y)

    # On a step schedule every interval between rows (evaluated or kept) opens with a probe, so each row's B_simple
    # rests on probes of its own interval (the steps before a goal may be fewer than noise_every).
    interval_opens = [eval_steps is not None]

    def train_step(x, y, step):
        """One optimizer step on the batch; a noise probe's step takes the same gradient in micro-batches."""
        optimizer.zero_grad(set_to_none=True)
        opens, interval_opens[0] = interval_opens[0], False
        if noise is not None and (noise.due(step % steps_per_epoch) or opens):
            clock.start()
            loss = noise.probe(loss_of, x, y, step)  # the plain step's gradient and BN statistics, at these weights
            clock.stop()
        else:
            loss = loss_of(x, y)
            loss.backward()
        optimizer.step()
        return loss

    def so_far() -> dict:
        """The interval's sums since the previous evaluation, at the current step (after a device sync)."""
        sync(device)
        probe_seconds = clock.seconds()
        trace, grad_sq = noise.means() if noise is not None and noise.probes else (0.0, 0.0)
        probes = noise.probes if noise is not None else 0
        # Timing comparisons across batch sizes leave the probes out: their share of an interval depends on the
        # batch size. What is left out is the probe steps' forward and backward passes (their optimizer steps
        # stay in); evaluations are outside the interval.
        return {"step": state["step"], "loss_sum": loss_sum.item(), "seen": seen, "probe_seconds": probe_seconds,
                "seconds": time.perf_counter() - started - probe_seconds, "probes": probes,
                "trace_sum": trace * probes, "grad_sq_sum": grad_sq * probes, "lr": optimizer.param_groups[0]["lr"]}

    def row_of(now: dict, since: dict | None = None) -> dict:
        """The row's training part: the interval from `since` (the interval's start by default) to `now`, two of
        so_far()'s sums; it moves the state's step, epoch and training seconds to `now`."""
        d = {k: now[k] - since[k] if since else now[k] for k in ("loss_sum", "seen", "seconds", "probe_seconds",
                                                                 "probes", "trace_sum", "grad_sq_sum")}
        step = now["step"]
        state["train_seconds"] += d["seconds"]
        state.update(step=step, epoch=epoch_of(step, steps_per_epoch, eval_steps))
        train_loss = d["loss_sum"] / max(d["seen"], 1) if step else math.nan
        full, rest = divmod(step, steps_per_epoch)  # only an epoch's last batch can be smaller than batch_size
        row = {M.EPOCH: state["epoch"], M.STEP: step, M.EXAMPLES: full * len(batches.x) + rest * batches.batch_size,
               M.TRAIN_LOSS: train_loss, M.EPOCH_SECONDS: d["seconds"], M.PROBE_SECONDS: d["probe_seconds"],
               M.TRAIN_SECONDS: state["train_seconds"],
               M.IMAGES_PER_SECOND: d["seen"] / d["seconds"] if d["seconds"] > 0 else math.nan,
               M.NOISE_SCALE: math.nan, M.NOISE_PROBES: 0, M.DIVERGED: step > 0 and not math.isfinite(train_loss),
               M.LR: now["lr"], M.STATUS: M.STATUS_RUNNING}
        if d["probes"]:  # the means pool across rows (study.metrics.NOISE_TRACE)
            trace, grad_sq = d["trace_sum"] / d["probes"], d["grad_sq_sum"] / d["probes"]
            row.update({M.NOISE_SCALE: trace / grad_sq if grad_sq > 0.0 else math.nan, M.NOISE_PROBES: d["probes"],
                        M.NOISE_TRACE: trace, M.NOISE_GRAD_SQ: grad_sq})
        return row

    def track_best(row):
        # Step 0 is the untrained network: reported, never the "best" model that gets tested.
        # A diverged row is never the best: NaN outputs can still score, e.g. an accuracy of the negatives' share.
        sign = 1 if maximise else -1
        best = sign * state["best"]["value"] if state["best"]["epoch"] > 0 else -math.inf
        if state["step"] > 0 and not row[M.DIVERGED] and sign * row[select] > best:
            state["best"] = {"value": row[select], "epoch": row[M.EPOCH]}
            state["best_model"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        row[M.BEST_EPOCH] = state["best"]["epoch"]  # e.g. best_val_acc (M.BEST_VAL_ACC) and its epoch
        row["best_" + select] = state["best"]["value"] if state["best"]["epoch"] > 0 else math.nan

    def decide(row, last: bool) -> dict:
        """Track the best row and set the row's status."""
        if select is not None:
            track_best(row)
        status = stop(row) if stop is not None else None
        if status is None and row[M.DIVERGED]:  # a NaN/inf model has nothing left to learn
            status = M.STATUS_DIVERGED
        row[M.STATUS] = status or (M.STATUS_DONE if last else M.STATUS_RUNNING)
        return row

    kept = []  # (so_far(), weights) of the steps kept since the last evaluation (keep_steps)
    keeping = set(keep_steps)
    on_host = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 2**26  # > 64 MiB: host
    held = []  # a screened row not yet reported, with a copy of its state: [(row, state)]
    refined = [False]  # refine() asked for every kept step to be evaluated

    def scored(now: dict, since: dict | None, last: bool, rewinding: bool = False) -> dict:
        """The row at `now` with the model's metrics, decided; a screened row goes on (its screen proved it)."""
        row = row_of(now, since)
        if screen is None or last:  # the last evaluation's status never waits for a next row
            return decide({**row, **evaluate(model)}, last)
        stops_on = rewind_on if rewinding else None  # in a rewind only a row at the goal changes anything
        row.update(evaluate(model, lambda lows, highs: not row[M.DIVERGED] and settled(screen, row, lows, highs,
                                                                                        stops_on)))
        return row if row.get(M.SCREENED) else decide(row, last)

    def release(reached: bool) -> None:
        """Report the held screened row; evaluated whole first when the row after it reached the goal (the
        analysis interpolates between the two)."""
        if not held:
            return
        row, saved = held.pop()
        if reached:
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(saved["model"])
            row.update(evaluate(model, lambda lows, highs: False))  # a screen that never stops: whole
            model.load_state_dict(live)
        report(row, saved)

    def put(row: dict) -> None:
        """Report a row in step order, the held one first; a screened row is held until the next is known."""
        release(reached=row[M.STATUS] in rewind_on)
        if row.get(M.SCREENED):
            held.append((row, copy.deepcopy(snapshot())))
        else:
            report(row, snapshot())

    def evaluated(now: dict, last: bool) -> bool:
        """The evaluation due now: decided, then, where its status asks for it (rewind_on), the kept steps before
        it evaluated and reported in order until one's status is in rewind_on too; True when training ends."""
        start_seconds = state["train_seconds"]
        row = scored(now, None, last)
        if row[M.STATUS] not in rewind_on or not kept:
            kept.clear()
            put(row)
            refined[0] = refined[0] or (refine is not None and row[M.STATUS] == M.STATUS_RUNNING and refine(row))
            return row[M.STATUS] != M.STATUS_RUNNING
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["train_seconds"], since = start_seconds, None
        for part, weights in kept:
            model.load_state_dict(weights)
            fine = scored(part, since, last=False, rewinding=True)
            since = part
            if fine[M.STATUS] in rewind_on:
                kept.clear()
                put(fine)
                return True
            fine[M.STATUS] = M.STATUS_RUNNING  # the later evaluation decides how the trial goes on
            put(fine)
        kept.clear()
        model.load_state_dict(current)
        put(decide({**row, **row_of(now, since)}, last))
        return True

    def start_interval():
        """An evaluation interval starts: its loss sum, example count, noise sums and clocks at zero."""
        if noise is not None:
            noise.start_epoch()
        clock.start_epoch()
        interval_opens[0] = eval_steps is not None
        model.train()
        sync(device)
        return torch.zeros((), device=device), 0, time.perf_counter()  # the loss summed on the device: no host sync

    if start is None:  # a start's step was reported with the checkpoint it came from: once per trial
        set_lr(optimizer, lr_at(0, base_lr, warmup_steps, at[-1], schedule, final))
        zero = dict(step=0, loss_sum=0.0, seen=0, seconds=0.0, probe_seconds=0.0, probes=0, trace_sum=0.0,
                    grad_sq_sum=0.0, lr=optimizer.param_groups[0]["lr"])
        if evaluated(zero, last=False):
            return state
    pending = [s for s in at if s > state["step"]]

    def refine_pending() -> None:
        """After refine() asked for it: the kept steps still ahead become evaluations."""
        if refined[0] and keeping:
            pending[:] = sorted(set(pending) | {s for s in keeping if s > state["step"]})
            keeping.clear()

    refine_pending()
    epoch, skip = divmod(state["step"], steps_per_epoch)
    loss_sum, seen, started = start_interval()

    def evaluation_ends_training() -> bool:
        """The evaluation due at this step: the interval's row, reported; True when training ends here."""
        pending.pop(0)
        if evaluated(so_far(), last=not pending):
            return True
        refine_pending()
        return False

    while pending:
        epoch += 1
        gen = epoch_generator(cfg.seed, epoch)
        aug = epoch_generator(cfg.seed, epoch, device) if prepare is not None else None
        if aug is not None and skip and AUG_STATE in start:
            aug.set_state(start[AUG_STATE])
        for k, (x, y) in enumerate(batches.epoch(gen)):
            if k < skip:  # a restart mid-epoch: the batches before its checkpoint's step were trained already
                continue
            step = state["step"]
            set_lr(optimizer, lr_at(step, base_lr, warmup_steps, at[-1], schedule, final))
            if prepare is not None:
                x = prepare(x, aug)
            loss = train_step(x, y, step)
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
            state["step"] = step + 1
            if state["step"] in keeping and state["step"] < pending[0]:
                kept.append((so_far(), {k: v.detach().to("cpu" if on_host else v.device, copy=True)
                                        for k, v in model.state_dict().items()}))
                interval_opens[0] = eval_steps is not None
            if state["step"] == pending[0] and state["step"] % steps_per_epoch:  # mid-epoch
                if evaluation_ends_training():
                    return state
                loss_sum, seen, started = start_interval()
        skip = 0
        if pending and state["step"] == pending[0]:  # at the epoch's end, once its batches have run out
            if evaluation_ends_training():
                return state
            loss_sum, seen, started = start_interval()
    return state


def epoch_of(step: int, steps_per_epoch: int, eval_steps) -> float | int:
    """A row's epoch: whole epochs on the epoch schedule, step / steps per epoch on a step schedule."""
    return step // steps_per_epoch if eval_steps is None else step / steps_per_epoch
