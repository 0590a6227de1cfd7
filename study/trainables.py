"""Plain function trainables: `train_x(config, data)` builds the run from its config, calls study.train.fit and
turns each epoch into `ray.tune.report` with a checkpoint. Tune restarts a failed trial from that checkpoint.

Data arrives through `tune.with_parameters`, i.e. Ray's object store: prepared once by the driver, one copy per
node, shared by every trial there.
"""

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ray import tune
from sklearn.metrics import log_loss, roc_auc_score

from study import metrics as M
from study.augment import to_input
from study.config import MnistConfig, PcamConfig
from study.data import kaggle
from study.data import pcam as pcam_data
from study.data.batches import PatchBatches
from study.data.locks import step_lock
from study.errors import StudyError
from study.memory import (GpuShareTooSmall, activation_bytes_per_image, cap_memory, configure_cuda, free_cuda,
                          plan_uploads, training_bytes)
from study.models import VGG16Patches
from study.train import DeviceBatches, eval_logits, fit, make_optimizer, pick_device, predict, seed_everything
from study.workloads import mnist_regression as regression


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
    """What every trainable runs inside: CUDA out-of-memory ends this trial alone, at once (the study and the other
    trials go on), and a trial that errored before a --resume stays errored (errored: trial folder names; see
    tuning.run_stage).

    Out of memory is reported, not raised: Tune retries every exception a trainable raises (--max-failures times,
    from the last checkpoint), and the same batch size in the same share runs out again. So the trial reports one
    last row, status `out_of_memory` with the message, and returns; the study counts it as failed (exit 1), and
    `--resume --retry-errored` continues it from its last checkpoint in the share given then (study.resume)."""
    def wrapped(config, data, errored=()):
        if errored and Path(tune.get_context().get_trial_dir()).name in errored:
            raise RuntimeError("this trial ended in an error before the study was resumed; "
                               "resume with --retry-errored to retry it")
        _reported["epoch"] = -1
        message = None
        try:
            return train(config, data)
        except torch.cuda.OutOfMemoryError as err:
            message = out_of_memory_message(config, err)
        # Out of the except block the traceback, and with it every tensor of the failed frames, is gone.
        free_cuda()
        tune.report({M.EPOCH: _reported["epoch"] + 1, M.STATUS: M.STATUS_OOM, M.MESSAGE: message,
                     M.DIVERGED: False})
    # The trainable's qualified name too: Ray's cloudpickle then sends it by reference, and the worker runs it with
    # this module's globals (sent by value it got its own copy of _reported: an out-of-memory row said epoch 0).
    wrapped.__name__, wrapped.__qualname__, wrapped.__doc__ = train.__name__, train.__qualname__, train.__doc__
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
    """One PCam trial, as Tune runs it. data: {"features": VGG16 conv state_dict or None}."""
    cfg = PcamConfig.from_dict(config)
    device, placement = trial_device()
    if device.type == "cuda":
        # A reused worker (Ray reuses actors) still caches the last trial's blocks, which would count as used.
        free_cuda()
        torch.cuda.reset_peak_memory_stats(device)
    share = placement[M.GPU_SHARE]
    configure_cuda(device, tf32=cfg.tf32, benchmark=True)  # fixed shapes: cuDNN's autotuning pays once
    try:
        budget = cap_memory(device, share)
    except GpuShareTooSmall as err:  # retrying cannot help: end it as out of memory does, with the advice
        raise torch.cuda.OutOfMemoryError(str(err)) from None
    run_pcam(cfg, data["features"], device, lambda metrics, state, files: report(
        {**metrics, **placement}, state, files, cfg.checkpoint_every), load_start(), memory_budget=budget,
        packed=0 < share < 1)


def run_pcam(cfg: PcamConfig, features: dict | None, device: torch.device, report, start: dict | None = None, *,
             memory_budget: int | None = None, packed: bool = False):
    """The PCam trial without Ray: fine-tune, keep the best-on-validation weights, evaluate them on the test split.
    report(metrics, state, files) gets every epoch; the last one carries the test metrics and prediction files.
    memory_budget: bytes this trial may allocate on its GPU (None on CPU); packed: it shares the GPU (see
    study.memory.plan_uploads)."""
    seed_everything(cfg.seed)
    splits = locate_or_fetch(cfg)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (pcam_data.load_split(*splits[s]) for s in pcam_data.SPLITS)
    if cfg.train_limit:
        train_x, train_y = train_x[:cfg.train_limit], train_y[:cfg.train_limit]
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda and cfg.amp else None
    model = VGG16Patches(features, cfg.freeze_blocks).to(device)
    if cuda:  # the batches arrive channels_last (study.augment.to_input); the convolutions run fastest in it
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device)
    needs = 0
    if memory_budget is not None and not packed:
        # Four images (repeated when --train-limit leaves fewer): the measurement needs two or more.
        example = np.resize(np.array(train_x[:4]), (4, *train_x.shape[1:]))
        example = to_input(torch.from_numpy(example).to(device), train=False)
        needs = training_bytes(model, cfg.optimizer, cfg.batch_size, activation_bytes_per_image(model, example, amp),
                               cfg.eval_batch_size)
    upload = plan_uploads({"train": train_x.nbytes, "val": val_x.nbytes, "test": test_x.nbytes},
                          budget_bytes=memory_budget, needs_bytes=needs, packed=packed)
    batches = PatchBatches(train_x, train_y, cfg.batch_size, device, on_device=upload["train"])
    val_batches = PatchBatches(val_x, val_y, cfg.eval_batch_size, device, shuffle=False, on_device=upload["val"])
    test_batches = PatchBatches(test_x, test_y, cfg.eval_batch_size, device, shuffle=False, on_device=upload["test"])
    augment = dict(flip=cfg.flip, rot90=cfg.rot90, zoom=cfg.zoom, brightness=cfg.brightness)

    @torch.no_grad()
    def probabilities(split):
        model.eval()
        out = []
        for x, _ in split.epoch():
            out.append(torch.sigmoid(eval_logits(model, to_input(x, train=False), amp)))
        model.train()
        return torch.cat(out).cpu().numpy().astype(np.float64)

    def evaluate(model):
        p = probabilities(val_batches)
        return {M.VAL_LOSS: bce(val_y, p), M.VAL_ACC: float(np.mean((p >= 0.5) == val_y)), M.VAL_AUC: auc(val_y, p),
                M.GPU_MEMORY_MB: torch.cuda.max_memory_allocated(device) / 2**20 if cuda else math.nan}

    def report_epoch(metrics, state):
        files = {}
        if metrics[M.STATUS] != M.STATUS_RUNNING and state["best_model"] is not None:
            # The end (done or diverged): the best-on-validation weights, judged once on the test split. The
            # state to checkpoint references the live weights, so they are put back afterwards.
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(state["best_model"])
            p = probabilities(test_batches)
            model.load_state_dict(last)
            if test_y is not None:
                metrics = {**metrics, M.TEST_AUC: auc(test_y, p), M.TEST_ACC: float(np.mean((p >= 0.5) == test_y))}
                files[M.PREDICTIONS_FILE] = lambda path: pd.DataFrame(
                    {"index": np.arange(len(p)), "label": test_y.astype(int), "probability": p}).to_csv(path,
                                                                                                      index=False)
            ids = kaggle.read_ids(cfg.data_dir, "test")
            if ids is not None:
                files[M.SUBMISSION_FILE] = lambda path: pd.DataFrame({"id": ids, "label": p}).to_csv(path, index=False)
        report(metrics, state, files)

    prepare = lambda x, generator: to_input(x, generator=generator, **augment)  # noqa: E731 (one-liner hook)
    return fit(model, optimizer, batches, torch.nn.functional.binary_cross_entropy_with_logits, evaluate,
               report_epoch, cfg=cfg, device=device, prepare=prepare, start=start, select=M.VAL_ACC,
               autocast_dtype=amp)


def locate_or_fetch(cfg: PcamConfig) -> dict:
    """The PCam files on this node. With --download, a node of a cluster that lacks them fetches them once: the
    first trial there downloads under a file lock while the node's other trials wait for it."""
    try:
        return pcam_data.locate(cfg.data_dir)
    except StudyError:
        if not cfg.download:
            raise
    root = Path(cfg.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with step_lock(root / ".download.lock"):
        try:
            return pcam_data.locate(root)
        except StudyError:
            pcam_data.download(root)
            return pcam_data.locate(root)


def bce(labels: np.ndarray, p: np.ndarray) -> float:
    """Binary cross-entropy (scikit-learn's log_loss, p clipped to its dtype's epsilon); NaN for a NaN model."""
    if not np.all(np.isfinite(p)):
        return math.nan
    return float(log_loss(labels, p, labels=[0, 1]))


def auc(labels: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when a split holds one class only or the model produced NaN."""
    if len(np.unique(labels)) < 2 or not np.all(np.isfinite(p)):
        return math.nan
    return float(roc_auc_score(labels, p))
