"""The trainable of every workload study: `train_workload(config, data)` as Tune runs it, and `run_workload`, the
same trial without Ray (the tests call it directly).

The workload is resolved again by name inside the trial's process (only its name travels in the config); its
splits arrive through tune.with_parameters as numpy arrays, go onto the device once, and are batched there by
indexing. A memory-mapped workload's splits never travel: the trial opens the files itself and streams batches
from them (study.data.batches.PatchBatches), uploading a split whole when it fits the trial's memory plan
(study.memory). Each epoch's row carries the workload's metrics with their split prefix: the validation split's
every epoch (val_error, ...), the test split's at the end (test_error, ...; NaN before), of the best epoch's
weights when the workload selects one.
"""

import math

import numpy as np
import torch

from study import metrics as M
from study.config import TrainConfig
from study.data.batches import PatchBatches
from study.memory import (GpuShareTooSmall, activation_bytes_per_image, cap_memory, configure_cuda, free_cuda,
                          plan_uploads, training_bytes)
from study.train import DeviceBatches, fit, make_optimizer, seed_everything
from study.trainables import load_start, report, trial_device, trial_entry
from study.workload import Workload, resolve


@trial_entry
def train_workload(config: dict, data: dict | None) -> None:
    """One trial of a workload study. data: the workload's splits, {"train": (x, y), "val": (x, y), ...}; None
    for a memory-mapped workload (the trial opens its files)."""
    cfg = TrainConfig.from_dict(config)
    workload = resolve(cfg.workload)
    device, placement = trial_device()
    budget, packed = cuda_budget(device, placement[M.GPU_SHARE])
    configure_cuda(device, tf32=cfg.tf32, benchmark=False)  # benchmark off: an epoch's last batch is smaller
    run_workload(cfg, workload, data, device, lambda metrics, state, files=None: report(
        {**metrics, **placement}, state, files), load_start(), memory_budget=budget, packed=packed)


def cuda_budget(device: torch.device, share: float) -> tuple[int | None, bool]:
    """Cap the trial's CUDA allocator at its GPU share (packed trials cannot starve each other); returns the bytes
    it may allocate (None on CPU) and whether it shares its GPU."""
    if device.type != "cuda":
        return None, False
    free_cuda()  # a reused worker (Ray reuses actors) still caches the last trial's blocks
    torch.cuda.reset_peak_memory_stats(device)
    try:
        return cap_memory(device, share), 0 < share < 1
    except GpuShareTooSmall as err:  # retrying cannot help: end it as out of memory does, with the advice
        raise torch.cuda.OutOfMemoryError(str(err)) from None


def to_device(split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (x, y) as tensors on the device, once per trial (np.array copies: the object store's arrays are
    read-only)."""
    x, y = split
    return torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device)


class InMemory:
    """An evaluation split held on the device, in order, in eval batches (what PatchBatches is for memory maps)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def epoch(self):
        return zip(self.x.split(self.batch_size), self.y.split(self.batch_size))


def streamed(cfg: TrainConfig, workload: Workload, splits: dict, model, device, amp, budget, packed) -> dict:
    """PatchBatches over memory maps: the training split shuffled, the others in order; each uploaded whole
    when the trial's budget holds it after what training needs (measured on four example images)."""
    needs = 0
    train_x = splits["train"][0]
    if budget is not None and not packed:
        # Four images (repeated when fewer): the measurement needs two or more.
        example = torch.from_numpy(np.resize(np.array(train_x[:4]), (4, *train_x.shape[1:]))).to(device)
        example = workload.prepare(example) if workload.prepare is not None else example
        needs = training_bytes(model, cfg.optimizer, cfg.batch_size, activation_bytes_per_image(model, example, amp),
                               cfg.eval_batch_size)
    upload = plan_uploads({name: x.nbytes for name, (x, _) in splits.items()}, budget_bytes=budget,
                          needs_bytes=needs, packed=packed)
    return {name: PatchBatches(x, y, cfg.batch_size if name == "train" else cfg.eval_batch_size, device,
                               shuffle=name == "train", on_device=upload[name]) for name, (x, y) in splits.items()}


def run_workload(cfg: TrainConfig, workload: Workload, splits: dict | None, device: torch.device, report,
                 start: dict | None = None, *, memory_budget: int | None = None, packed: bool = False,
                 model_factory=None) -> dict:
    """Train the workload's model with cfg; report(metrics, state) after every epoch (epoch 0 included), with a
    third argument, {file name: write(path)}, on the last row when the workload writes files of its own.
    splits None: a memory-mapped workload's, opened here. memory_budget: bytes the trial may allocate on its GPU
    (None on CPU); packed: it shares its GPU. model_factory: options -> model, instead of workload.model."""
    seed_everything(cfg.seed)
    options = workload.option_values(cfg.options)
    if splits is None:
        splits = workload.load(options)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda and cfg.amp else None
    model = (model_factory or workload.model)(options).to(device)
    if cuda and workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, device, cfg.weight_decay)
    if workload.memory_mapped:
        held = streamed(cfg, workload, splits, model, device, amp, memory_budget, packed)
        batches, n_train = held.pop("train"), len(splits["train"][0])
    else:
        held = {name: to_device(splits[name], device) for name in ("train", "val", "test") if name in splits}
        train_x, train_y = held.pop("train")
        batches, n_train = DeviceBatches(train_x, train_y, cfg.batch_size), len(train_x)
        held = {name: InMemory(x, y, cfg.eval_batch_size) for name, (x, y) in held.items()}
    test = held.pop("test", None)
    labelled_test = test is not None and splits["test"][1] is not None

    @torch.no_grad()
    def outputs_of(split) -> tuple[torch.Tensor, torch.Tensor | None]:
        model.eval()
        outs, ys = [], []
        for x, y in split.epoch():
            if workload.prepare is not None:
                x = workload.prepare(x)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                outs.append(model(x).float())
            ys.append(y)
        model.train()
        return torch.cat(outs), None if ys[0] is None else torch.cat(ys)

    def scores(split: str, outputs, y) -> dict:
        if not torch.isfinite(outputs).all():  # a diverged model has no score, only NaN
            return {f"{split}_{m.name}": math.nan for m in workload.metrics}
        return {f"{split}_{name}": float(value) for name, value in workload.evaluate(outputs, y).items()}

    def evaluate(model):
        out = {M.GPU_MEMORY_MB: torch.cuda.max_memory_allocated(device) / 2**20 if cuda else math.nan}
        for split, batches_of in held.items():
            out.update(scores(split, *outputs_of(batches_of)))
        if labelled_test:  # scored once, at the end (report_epoch)
            out.update({f"test_{m.name}": math.nan for m in workload.metrics})
        return out

    def test_at_end(metrics, state) -> tuple[dict, dict]:
        """The tested weights (the best epoch's when the workload selects one) on the test split, and its files."""
        if workload.select and state["best_model"] is None:
            return metrics, {}
        if workload.select:  # the checkpoint's state references the live weights: they are put back afterwards
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(state["best_model"])
        outputs, y = outputs_of(test)
        if workload.select:
            model.load_state_dict(last)
        if labelled_test:
            metrics = {**metrics, **scores("test", outputs, y)}
        return metrics, workload.files(outputs, y, options) if workload.files is not None else {}

    steps_per_epoch = len(batches)

    def report_epoch(metrics, state):
        # Every epoch has the same batches, so steps and examples follow from the epoch.
        epoch = metrics[M.EPOCH]
        metrics = {**metrics, M.STEP: epoch * steps_per_epoch, M.EXAMPLES: epoch * n_train}
        files = {}
        if metrics[M.STATUS] != M.STATUS_RUNNING and test is not None:
            metrics, files = test_at_end(metrics, state)
        report(metrics, state, files) if files else report(metrics, state)

    prepare_train = None
    if workload.prepare_train is not None:
        prepare_train = lambda x, generator: workload.prepare_train(x, generator, options)  # noqa: E731
    elif workload.prepare is not None or workload.augment is not None:
        def prepare_train(x, generator):
            if workload.prepare is not None:
                x = workload.prepare(x)
            return x if workload.augment is None else workload.augment(x, generator)

    select = workload.select or None
    return fit(model, optimizer, batches, workload.loss, evaluate, report_epoch, cfg=cfg, device=device,
               prepare=prepare_train, start=start, select=select, autocast_dtype=amp,
               maximise=workload.metric(select).higher_is_better if select else True)
