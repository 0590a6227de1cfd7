"""Plain function trainables: `train_x(config, data)` builds the run from its config, calls study.train.fit and
turns each epoch into `ray.tune.report` with a checkpoint. Tune restarts a failed trial from that checkpoint.

Data arrives through `tune.with_parameters`, i.e. Ray's object store: prepared once by the driver, one copy per
node, shared by every trial there.
"""

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from ray import tune

from study import metrics as M
from study import trial_errors
from study.config import MnistConfig, PcamConfig, TrainConfig
from study.data import pcam as pcam_data
from study.memory import configure_cuda, free_cuda
from study.train import DeviceBatches, fit, make_optimizer, pick_device, predict, seed_everything
from study.workloads import mnist_regression as regression
from study.workloads.pcam import auc, bce  # noqa: F401 (where the tests find them)


def trial_device() -> tuple[torch.device, dict]:
    """The device Tune gave this trial (CUDA when its resources include a GPU share, else CPU), and the placement
    facts every report carries so the analysis can draw what ran where."""
    import ray

    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))  # do not oversubscribe cores shared by trials
    device = pick_device(resources.get("GPU", 0))
    gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids())  # Ray's assignment (also on nodes that only declare GPUs)
    return device, {M.DEVICE: device.type, M.GPU_IDS: gpu_ids, M.GPU_SHARE: float(resources.get("GPU", 0)),
                    M.NODE_ID: ray.get_runtime_context().get_node_id(),
                    M.CUDA_VISIBLE: os.environ.get("CUDA_VISIBLE_DEVICES", "")}


_reported = {"epoch": -1}  # the epoch this process's trial reported last (a reused worker runs one trial at a time)


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
    `--resume --retry-errored` continues it from its last checkpoint in the share given then (study.resume). An
    exception that another try would meet again ends the trial the same way, status `error`, its traceback in the
    trial's folder (study.trial_errors); Tune retries the others."""
    def wrapped(config, data, errored=()):
        if errored and Path(tune.get_context().get_trial_dir()).name in errored:
            raise RuntimeError("this trial ended in an error before the study was resumed; "
                               "resume with --retry-errored to retry it")
        _reported["epoch"] = -1
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
    # it with this module's globals (sent by value it got its own copy of _reported: an out-of-memory row said epoch
    # 0). Without its module a trainable defined elsewhere (study.run_workload's) went by value.
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


def report(metrics: dict, state: dict, files: dict | None = None, every: int = 1) -> None:
    """tune.report with a checkpoint holding the resumable state (and any extra files, e.g. predictions): every
    `every` epochs, at epoch 0 and at the end. A restart resumes from the latest one and trains the epochs after it
    again, which repeats them exactly (order and augmentation come from (seed, epoch); the RNG state is saved)."""
    _reported["epoch"] = metrics[M.EPOCH]
    if metrics[M.STATUS] == M.STATUS_RUNNING and metrics[M.EPOCH] % every != 0:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / M.STATE_FILE)
        for name, write in (files or {}).items():
            write(Path(folder) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@trial_entry
def train_mnist(config: dict, data: dict) -> None:
    """One trial of the MNIST regression study (study.mnist), as Tune runs it."""
    cfg = MnistConfig.from_dict(config)
    device, placement = trial_device()
    configure_cuda(device, tf32=cfg.tf32, benchmark=False)  # benchmark off: the last batch of an epoch is smaller
    run_mnist(cfg, data, device, lambda metrics, state: report({**metrics, **placement}, state), load_start())


def run_mnist(cfg: MnistConfig, data: dict, device: torch.device, report, start: dict | None = None) -> dict:
    """The trial without Ray (the tests call it directly), built from the mnist-regression workload. data:
    train_x/test_x (N,28,28) uint8 and targets[target] -> (train values, test values) on the 0..255 scale.
    Unlike a workload study's trial (study.run_workload), the test split is scored every epoch (the report's curves)
    and a val_size of 0 trains on every image (val_mse NaN), as the study did before the workload redesign."""
    seed_everything(cfg.seed)
    workload = regression.workload
    options = {"target": cfg.target, "input_scale": cfg.input_scale, "target_scale": cfg.target_scale,
               "val_size": cfg.val_size}
    splits = regression.splits(data["train_x"], data["test_x"], data["targets"][cfg.target], options)
    # Onto the device and prepared (uint8 -> float) once per trial: MNIST is small, and nothing is augmented.
    (train_x, train_y), *scored = (
        (workload.prepare(torch.from_numpy(np.array(x)).to(device)), torch.from_numpy(np.array(y)).to(device))
        for x, y in (splits[s] for s in ("train", "val", "test")))

    def evaluate(model):
        out = {}
        for split, (x, y) in zip(("val", "test"), scored):
            if not len(x):  # val_size 0: no validation split
                values = {m.name: math.nan for m in workload.metrics}
            else:
                values = workload.evaluate(predict(model, x, cfg.eval_batch_size), y)
            out.update({f"{split}_{name}": value for name, value in values.items()})
        return out

    model = workload.model(options).to(device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions: a 1.3x faster training step at batch 16 (measured)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device)
    return fit(model, optimizer, DeviceBatches(train_x, train_y, cfg.batch_size), workload.loss,
               evaluate, report, cfg=cfg, device=device, start=start)


@trial_entry
def train_pcam(config: dict, data: dict) -> None:
    """One trial of `python -m study.pcam`, as Tune runs it (its config is PcamConfig: the stored layout of the
    study before workloads). data: {"features": VGG16 conv state_dict or None}, loaded once by the driver."""
    from study.run_workload import cuda_budget

    cfg = PcamConfig.from_dict(config)
    device, placement = trial_device()
    budget, packed = cuda_budget(device, placement[M.GPU_SHARE])
    configure_cuda(device, tf32=cfg.tf32, benchmark=True)  # fixed shapes: cuDNN's autotuning pays once
    run_pcam(cfg, data["features"], device, lambda metrics, state, files: report(
        {**metrics, **placement}, state, files, cfg.checkpoint_every), load_start(), memory_budget=budget,
        packed=packed)


def run_pcam(cfg: PcamConfig, features: dict | None, device: torch.device, report, start: dict | None = None, *,
             memory_budget: int | None = None, packed: bool = False):
    """The PCam trial without Ray: the "pcam" workload (study.workloads.pcam) run by the workload engine with
    the settings of a PcamConfig. report(metrics, state, files) gets every epoch; the last one carries the test
    metrics of the best-on-validation weights and the prediction files. features: the VGG16 conv weights (None:
    random init)."""
    from study.models import VGG16Patches
    from study.run_workload import run_workload
    from study.workload import resolve

    workload = resolve("pcam")
    options = dict(data_dir=cfg.data_dir, download=cfg.download, train_limit=cfg.train_limit,
                   weights=cfg.weights, freeze_blocks=cfg.freeze_blocks, no_flip=not cfg.flip,
                   no_rot90=not cfg.rot90, zoom=cfg.zoom, brightness=cfg.brightness)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(cfg.to_dict())
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in shared}, workload="pcam", options=options, stage="grid")
    return run_workload(train_cfg, workload, None, device, lambda m, s, files=None: report(m, s, files or {}), start,
                        memory_budget=memory_budget, packed=packed,
                        model_factory=lambda options: VGG16Patches(features, options["freeze_blocks"]))


def locate_or_fetch(cfg: PcamConfig) -> dict:
    """The PCam files on this node; with cfg.download a node that lacks them fetches them once (under a lock)."""
    if cfg.download:
        return pcam_data.locate_or_fetch(Path(cfg.data_dir))
    return pcam_data.locate(cfg.data_dir)
