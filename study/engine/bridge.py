"""The trial bridge: what every trainable (a workload's run trial, the steps trial, the two papers') runs inside
Ray Tune, around the Ray-free trial it calls.

- `trial_entry` wraps the trainable: out of memory and the trial's own errors end this trial alone
(study.engine.trial_errors).
- `trial_device` takes the trial's resources: its threads, its device, its GPU memory cap, the per-trial CUDA switches,
  and the placement facts every row carries.
- `load_start` restores the state of the trial's latest checkpoint; `reporter` reports each row with
  `tune.report`, and with a checkpoint of the resumable state every so many epochs or seconds.

The trainables are plain functions of (config, data): study.engine.run_workload.train_workload,
study.engine.steps_trial.train_steps, and each paper's own (study/<paper>/trainable.py).
"""

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from ray import tune

from study import metrics as M
from study.engine import trial_errors
from study.engine.memory import GpuShareTooSmall, cap_memory, configure_cuda, free_cuda
from study.engine.train import pick_device

# What this process's trial reported last and when it last saved a checkpoint (a reused worker runs one trial at a
# time; trial_entry resets both when a trial starts).
_reported = {"epoch": -1, "saved": 0.0}


class TrialDevice(NamedTuple):
    device: torch.device
    placement: dict  # carried by every row: what ran where (device, GPU ids and share, node, CUDA_VISIBLE_DEVICES)
    memory_budget: int | None  # bytes the trial's CUDA allocator may take (None on CPU)
    packed: bool  # the trial shares its GPU with other trials


def trial_device(*, tf32: bool, benchmark: bool = False) -> TrialDevice:
    """The device Tune gave this trial (CUDA when its resources include a GPU share, else CPU), set up for it: as
    many threads as its CPUs, its CUDA allocator capped at its GPU share (packed trials cannot starve each other),
    and the CUDA switches (tf32; benchmark: cuDNN's autotuning, for fixed shapes only)."""
    import ray

    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))  # do not oversubscribe cores shared by trials
    share = float(resources.get("GPU", 0))
    device = pick_device(share)
    gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids())  # Ray's assignment (also on nodes that only declare GPUs)
    placement = {M.DEVICE: device.type, M.GPU_IDS: gpu_ids, M.GPU_SHARE: share,
                 M.NODE_ID: ray.get_runtime_context().get_node_id(),
                 M.CUDA_VISIBLE: os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    budget, packed = cuda_budget(device, share)
    configure_cuda(device, tf32=tf32, benchmark=benchmark)
    return TrialDevice(device, placement, budget, packed)


def cuda_budget(device: torch.device, share: float) -> tuple[int | None, bool]:
    """Cap the trial's CUDA allocator at its GPU share; returns the bytes it may allocate (None on CPU) and whether
    it shares its GPU."""
    if device.type != "cuda":
        return None, False
    free_cuda()  # a reused worker (Ray reuses actors) still caches the last trial's blocks
    torch.cuda.reset_peak_memory_stats(device)
    try:
        return cap_memory(device, share), 0 < share < 1
    except GpuShareTooSmall as err:  # retrying cannot help: end it as out of memory does, with the advice
        raise torch.cuda.OutOfMemoryError(str(err)) from None


def out_of_memory_message(config: dict, err: BaseException) -> str:
    return (f"CUDA out of memory at batch size {config.get('batch_size')}: give each trial a larger GPU share "
            f"(--gpus-per-trial) or use smaller batches; the other trials go on. ({str(err).splitlines()[0]})")


def trial_entry(train):
    """What every trainable runs inside: CUDA out-of-memory and the trial's own errors end this trial alone, at once
    (the study and the other trials go on), and a trial that errored before a --resume stays errored (errored:
    trial folder names; see tuning.run_stage).

    Out of memory is reported, not raised: Tune retries every exception a trainable raises (--max-failures times,
    from the last checkpoint), and the same batch size in the same share runs out again. So the trial reports one
    last row, status `out_of_memory` with the message, and returns; the study counts it as failed (exit 1), and
    `--resume --retry-errored` continues it from its last checkpoint in the share given then (study.commands.resume). An
    exception that another try would meet again ends the trial the same way, status `error`, its traceback in the
    trial's folder (study.engine.trial_errors); Tune retries the others."""
    def wrapped(config, data, errored=()):
        if errored and Path(tune.get_context().get_trial_dir()).name in errored:
            raise RuntimeError("this trial ended in an error before the study was resumed; "
                               "resume with --retry-errored to retry it")
        _reported.update(epoch=-1, saved=time.monotonic())
        try:
            return train(config, data)
        except torch.cuda.OutOfMemoryError as err:
            status, message = M.STATUS_OOM, out_of_memory_message(config, err)
        except Exception as err:
            if not trial_errors.ends_trial(err):
                raise
            status, message = M.STATUS_ERROR, trial_errors.record(err)
        # Out of the except block the traceback, and with it every tensor of the failed frames, is gone.
        free_cuda()
        tune.report({M.EPOCH: _reported["epoch"] + 1, M.STATUS: status, M.MESSAGE: message, M.DIVERGED: False})
    # The trainable's module and qualified name too: Ray's cloudpickle then sends it by reference, and the worker runs
    # it with its module's globals (sent by value it got its own copy of this module's _reported: an out-of-memory
    # row said epoch 0).
    wrapped.__module__, wrapped.__name__, wrapped.__qualname__ = train.__module__, train.__name__, train.__qualname__
    wrapped.__doc__ = train.__doc__
    return wrapped


def load_start() -> dict | None:
    """The state of the trial's latest checkpoint, when Tune restarted or resumed it."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / M.STATE_FILE, map_location="cpu", weights_only=True)
    _reported["epoch"] = state["epoch"]  # a resumed trial does not report its checkpoint's epoch again
    return state


def report(metrics: dict, state: dict, files: dict | None = None, *, every: int = 1,
           seconds: float | None = None) -> None:
    """tune.report with a checkpoint holding the resumable state (and any extra files, e.g. predictions): every
    `every` epochs, or with `seconds` at most once per that many seconds (a steps trial's rows come at any step),
    and always at the end; with `every`, at epoch 0 too. A restart resumes from the latest checkpoint and trains
    what came after it again, which repeats it exactly (order and augmentation come from (seed, epoch); the RNG
    states are saved)."""
    _reported["epoch"] = metrics[M.EPOCH]
    if metrics[M.STATUS] == M.STATUS_RUNNING and (
            metrics[M.EPOCH] % every != 0 if seconds is None else time.monotonic() - _reported["saved"] < seconds):
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / M.STATE_FILE)
        for name, write in (files or {}).items():
            write(Path(folder) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    _reported["saved"] = time.monotonic()


def reporter(placement: dict, *, every: int = 1, seconds: float | None = None) -> Callable:
    """The report(metrics, state, files=None) a trial hands its loop: `report` with the placement on every row."""
    return lambda metrics, state, files=None: report({**metrics, **placement}, state, files, every=every,
                                                     seconds=seconds)
