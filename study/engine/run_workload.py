"""The trainable of every workload study: `train_workload(config, data)` as Tune runs it, and `run_workload`, the
same trial without Ray (the tests call it directly).

The workload is resolved again by name inside the trial's process (only its name travels in the config); its
splits arrive through tune.with_parameters as numpy arrays, go onto the device once, and are batched there by
indexing. A memory-mapped workload's splits never travel: the trial opens the files itself and streams batches
from them (study.data.batches.PatchBatches), uploading a split whole when it fits the trial's memory plan
(study.engine.memory). Each epoch's row carries the workload's metrics with their split prefix: the validation split's
every epoch (val_error, ...), the test split's at the end (test_error, ...; NaN before), of the best epoch's
weights when the workload selects one. `WorkloadTrial`, the trial set up on its device, is shared with the
steps-to-result trial (study.engine.steps_trial), which evaluates on training steps instead of epochs.
"""

import json
import math
import zlib

import numpy as np
import torch

from study import metrics as M
from study.engine.bridge import load_start, reporter, trial_device, trial_entry
from study.engine.config import TrainConfig
from study.data.batches import PatchBatches
from study.engine.eval_schedule import bounds
from study.engine.loop import fit
from study.engine.memory import activation_bytes_per_image, plan_uploads, training_bytes
from study.engine.train import DeviceBatches, make_optimizer, seed_everything
from study.workload import Workload, resolve


@trial_entry
def train_workload(config: dict, data: dict | None) -> None:
    """One trial of a workload study. data: the workload's splits, {"train": (x, y), "val": (x, y), ...}; None
    for a memory-mapped workload (the trial opens its files)."""
    cfg = TrainConfig.from_dict(config)
    trial = trial_device(tf32=cfg.tf32, benchmark=False)  # benchmark off: an epoch's last batch is smaller
    run_workload(cfg, resolve(cfg.workload), data, trial.device, reporter(trial.placement), load_start(),
                 memory_budget=trial.memory_budget, packed=trial.packed)


def to_device(split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (x, y) as tensors on the device (np.array copies: the object store's arrays are read-only)."""
    x, y = split
    return torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device)


# The splits of the latest trial on this worker's device. Tune reuses a worker for the next trial of the same
# stage (reuse_actors), which then finds its data there instead of copying it again; one study's data at most.
_ON_DEVICE: dict = {}


def identity(name: str, options: dict, splits: dict, device: torch.device) -> tuple:
    """What tells one study's data from another's: the workload, its options, the device, and per split its shape,
    dtype and a checksum of its first and last 64 KiB (a file changed under the same options)."""
    def sample(a) -> int:
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return zlib.crc32(raw[-65536:].tobytes(), zlib.crc32(raw[:65536].tobytes()))
    return (name, json.dumps(options, sort_keys=True, default=str), str(device),
            tuple((k, *((p.shape, str(p.dtype), sample(p)) if p is not None else None for p in v))
                  for k, v in sorted(splits.items())))


def on_device(name: str, options: dict, splits: dict, device: torch.device) -> dict:
    """{split: (x, y) on the device}, from this worker's cache when its last trial held the same data."""
    key = identity(name, options, splits, device)
    if key not in _ON_DEVICE:
        _ON_DEVICE.clear()  # the tensors go before the next study's arrive: never two studies' data at once
        _ON_DEVICE[key] = {name: to_device(split, device) for name, split in splits.items()}
    return dict(_ON_DEVICE[key])


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


class WorkloadTrial:
    """A workload's trial set up on its device, what the run trial and the steps trial share: the seed, the model
    (in NHWC on CUDA when the workload asks), the optimizer, the splits (on the device, or streamed from memory
    maps within the trial's memory budget), bf16 autocast (cfg.amp, CUDA only), the training batches' preparation
    and augmentation, and the evaluation of the held splits. `fit` runs the one loop on it.

    splits None: a memory-mapped workload's, opened here. scored: the splits evaluated besides training (the test
    split is scored once, at the end: `test_at_end`). memory_budget: bytes the trial may allocate on its GPU (None
    on CPU); packed: it shares its GPU. model_factory: options -> model, instead of workload.model."""

    def __init__(self, cfg: TrainConfig, workload: Workload, splits: dict | None, device: torch.device, *,
                 memory_budget: int | None = None, packed: bool = False, model_factory=None,
                 scored: tuple = ("val", "test")):
        seed_everything(cfg.seed)
        self.cfg, self.workload, self.device = cfg, workload, device
        self.options = workload.option_values(cfg.options)
        if splits is None:
            splits = workload.load(self.options)
        splits = {name: splits[name] for name in ("train", *scored) if name in splits}
        cuda = device.type == "cuda"
        self.amp = torch.bfloat16 if cuda and cfg.amp else None
        self.model = (model_factory or workload.model)(self.options).to(device)
        if cuda and workload.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.momentum, device,
                                        cfg.weight_decay)
        if workload.memory_mapped:
            held = streamed(cfg, workload, splits, self.model, device, self.amp, memory_budget, packed)
            self.batches = held.pop("train")
        else:
            held = on_device(workload.name, self.options, splits, device)
            self.batches = DeviceBatches(*held.pop("train"), cfg.batch_size)
            held = {name: InMemory(x, y, cfg.eval_batch_size) for name, (x, y) in held.items()}
        self.test = held.pop("test", None)
        self.labelled_test = self.test is not None and splits["test"][1] is not None
        self.held = held
        self.bounds = {m.name: m.bounds for m in workload.metrics if m.bounds is not None}

    @torch.no_grad()
    def outputs_of(self, split, settles=None) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(outputs, labels, examples scored) over the split in order; with `settles`, (None, None, n) when after n
        examples settles(lows, highs) holds for the metrics' possible means over the whole split (the screen,
        study.engine.eval_schedule)."""
        model, prepare = self.model, self.workload.prepare
        model.eval()
        outs, ys, sums, seen, total = [], [], {}, 0, len(split.x)
        for x, y in split.epoch():
            if prepare is not None:
                x = prepare(x)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                outs.append(model(x).float())
            ys.append(y)
            seen += len(x)
            if settles is not None and y is not None and seen < total:
                for name, value in self.workload.evaluate(outs[-1], y).items():  # each a mean of per-example terms
                    sums[name] = sums.get(name, 0.0) + value * len(y)
                if settles(*bounds(sums, seen, total, self.bounds)):
                    model.train()
                    return None, None, seen
        model.train()
        return torch.cat(outs), None if ys[0] is None else torch.cat(ys), seen

    def scores(self, split: str, outputs, y) -> dict:
        if not torch.isfinite(outputs).all():  # a diverged model has no score, only NaN
            return {f"{split}_{m.name}": math.nan for m in self.workload.metrics}
        return {f"{split}_{name}": float(value) for name, value in self.workload.evaluate(outputs, y).items()}

    def evaluate(self, model, settles=None) -> dict:
        """The held splits' metrics; with `settles`, the validation split's screened (outputs_of): a screened row
        has them NaN, M.SCREENED True and M.EVAL_EXAMPLES the examples it scored."""
        cuda = self.device.type == "cuda"
        out = {M.GPU_MEMORY_MB: torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else math.nan}
        for split, batches_of in self.held.items():
            screen = (lambda lows, highs: settles(*(
                {f"{split}_{k}": v for k, v in side.items()} for side in (lows, highs)))) if settles else None
            outputs, y, seen = self.outputs_of(batches_of, screen if split == "val" else None)
            if outputs is None:
                out.update({f"{split}_{m.name}": math.nan for m in self.workload.metrics})
            else:
                out.update(self.scores(split, outputs, y))
            if settles is not None and split == "val":
                out.update({M.SCREENED: outputs is None, M.EVAL_EXAMPLES: seen})
        if self.labelled_test:  # scored once, at the end (test_at_end)
            out.update({f"test_{m.name}": math.nan for m in self.workload.metrics})
        return out

    def test_at_end(self, metrics, state) -> tuple[dict, dict]:
        """The tested weights (the best epoch's when the workload selects one) on the test split, and its files."""
        workload, model = self.workload, self.model
        if workload.select and state["best_model"] is None:
            return metrics, {}
        if workload.select:  # the checkpoint's state references the live weights: they are put back afterwards
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(state["best_model"])
        outputs, y, _ = self.outputs_of(self.test)
        if workload.select:
            model.load_state_dict(last)
        if self.labelled_test:
            metrics = {**metrics, **self.scores("test", outputs, y)}
        return metrics, workload.files(outputs, y, self.options) if workload.files is not None else {}

    def prepare_train(self):
        """prepare(x, generator) for the loop's training batches: the workload's prepare_train, or its prepare and
        augment; None when it has neither."""
        workload, options = self.workload, self.options
        if workload.prepare_train is not None:
            return lambda x, generator: workload.prepare_train(x, generator, options)
        if workload.prepare is None and workload.augment is None:
            return None

        def prepare(x, generator):
            if workload.prepare is not None:
                x = workload.prepare(x)
            return x if workload.augment is None else workload.augment(x, generator)
        return prepare

    def fit(self, report, start: dict | None = None, **schedule) -> dict:
        """study.engine.loop.fit on this trial; schedule: its eval_steps and stop (default: every epoch, to cfg.epochs)."""
        select = self.workload.select or None
        return fit(self.model, self.optimizer, self.batches, self.workload.loss, self.evaluate, report,
                   cfg=self.cfg, device=self.device, prepare=self.prepare_train(), start=start, select=select,
                   maximise=self.workload.metric(select).higher_is_better if select else True,
                   autocast_dtype=self.amp, **schedule)


def run_workload(cfg: TrainConfig, workload: Workload, splits: dict | None, device: torch.device, report,
                 start: dict | None = None, *, memory_budget: int | None = None, packed: bool = False,
                 model_factory=None) -> dict:
    """Train the workload's model with cfg; report(metrics, state) after every epoch (epoch 0 included), with a
    third argument, {file name: write(path)}, on the last row when the workload writes files of its own. The other
    arguments: WorkloadTrial's."""
    trial = WorkloadTrial(cfg, workload, splits, device, memory_budget=memory_budget, packed=packed,
                          model_factory=model_factory)

    def report_epoch(metrics, state):
        files = {}
        if metrics[M.STATUS] != M.STATUS_RUNNING and trial.test is not None:
            metrics, files = trial.test_at_end(metrics, state)
        report(metrics, state, files) if files else report(metrics, state)

    return trial.fit(report_epoch, start)
