"""A workload's pieces run once on a few examples of each split, in the driver and on the CPU, before any trial
starts: load()'s arrays, prepare, augment (or prepare_train), the model's forward, the loss, backward and evaluate.

`check(workload, splits, options)` takes the splits the driver loaded already (no second load; a memory-mapped
split gives up a few rows) and raises a StudyError naming the workload's file, the function and the fix, e.g.
"load() returned float64 features, which the model's float32 weights refuse: return float32". A bug found here
costs a second, not a grid of trials that each fail, retry and print Ray's tracebacks. The trials do the same work
on the same kinds of batches (study.engine.run_workload), so what passes here fails there only on data it did not see.
"""

import math
import numbers
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from study.errors import StudyError
from study.workload import SPLITS, Workload

FEW = 4  # examples per split: two or more, so batch statistics (BatchNorm) have something to average
CANDIDATES = 64  # rows spread over a split whose labels are read to pick the few: each label value once first
NUMERIC = "biuf"  # numpy dtype kinds a tensor can be made of: bool, int, uint, float


def check(workload: Workload, splits: dict, options: dict) -> None:
    """Raise a StudyError for the first thing of the workload a trial would fail on (see the module's doc)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Run(workload, splits, options).all()


class Run:
    """One pass over the workload's pieces; `fail` words every refusal the same way."""

    def __init__(self, workload: Workload, splits: dict, options: dict):
        self.w, self.splits, self.options = workload, splits, options
        self.source = source_file(workload)

    def fail(self, text: str):
        raise StudyError(f"workload {self.w.name} ({shown(self.source)}): {text}")

    def call(self, what: str, fn, *args, where: str = ""):
        """fn(*args); an exception becomes one line with its type, first line and place in the workload's file."""
        try:
            return fn(*args)
        except StudyError:
            raise
        except Exception as err:
            self.raised(what, err, where)

    def raised(self, what: str, err: Exception, where: str = ""):
        self.fail(f"{what} raised {type(err).__name__}: {first_line(err)} at {self.place(err)}{where}: fix it "
                  f"there (nothing was started or written)")

    def place(self, err: BaseException) -> str:
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if self.source and os.path.abspath(f.filename) == self.source]
        frame = (ours or frames)[-1]
        return f"{shown(frame.filename)}:{frame.lineno} in {frame.name}"

    def all(self) -> None:
        few = {name: self.sample(name) for name in SPLITS if name in self.splits}
        self.same_kinds(few)
        model = self.call("model()", self.w.model, self.options)
        if not isinstance(model, torch.nn.Module):
            self.fail(f"model() returned a {type(model).__name__}: return a torch.nn.Module")
        self.train_step(model, *few.pop("train"))
        model.eval()
        with torch.no_grad():
            for name, (x, y) in few.items():
                self.evaluate(model, name, x, y)

    def sample(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A few rows of a split as the trial's batches hold them (study.engine.run_workload, study.data.batches)."""
        x, y = self.splits[name]
        rows = pick(y, len(x))
        try:
            xs = np.stack([np.asarray(x[i]) for i in rows])
            ys = None if y is None else np.stack([np.asarray(y[i]) for i in rows])
        except ValueError as err:  # examples of different shapes
            self.fail(f"load() returned {name} examples that are not arrays of one shape ({first_line(err)}): return "
                      f"a numpy array per split's x and y")
        for what, a in (("features", xs), ("labels", ys)):
            if a is not None and a.dtype.kind not in NUMERIC:
                self.fail(f"load() returned {name} {what} of dtype {a.dtype}: return a numeric numpy array")
        if self.w.memory_mapped:  # streamed as uint8 patches and float32 labels (PatchBatches)
            if xs.dtype != np.uint8:
                self.fail(f"load() returned {xs.dtype} {name} features of a memory-mapped workload: return uint8 "
                          f"(the engine streams uint8 rows)")
            return torch.from_numpy(xs), None if ys is None else torch.from_numpy(ys.astype(np.float32).reshape(-1))
        return torch.from_numpy(xs), None if ys is None else torch.from_numpy(ys)

    def same_kinds(self, few: dict) -> None:
        """Every split's examples of one shape and dtype, as train's: the model sees them all."""
        x0, y0 = few["train"]
        for name, (x, y) in few.items():
            for what, a, b in (("features", x, x0), ("labels", y, y0)):
                if a is None or b is None:
                    continue
                if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                    self.fail(f"load() returned {name} {what} of {describe(a)} per example, but train's are "
                              f"{describe(b)}: give every split the same shape and dtype")

    def train_step(self, model, x, y) -> None:
        model.train()
        inputs = self.train_input(x)
        outputs = self.forward(model, inputs, x, "training")
        try:
            loss = self.w.loss(outputs, y)
        except Exception as err:
            self.refused_labels(outputs, y, err)
            self.raised("loss()", err, " (on a few training examples)")
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            self.fail(f"loss() returned {got}: return the mean over the batch, a scalar float tensor")
        if not loss.requires_grad:
            self.fail("loss() returned a tensor without a gradient: compute it from the outputs with torch "
                      "operations (no .item(), .detach() or numpy)")
        if not math.isfinite(loss.item()):
            self.fail(f"loss() is {loss.item()} on a few training examples of a freshly initialised model: it "
                      f"must be finite there")
        self.call("backward through the model and loss()", loss.backward)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            self.fail(f"the loss's gradient is not finite in {', '.join(bad[:3])}: check loss() and the model")

    def train_input(self, x):
        gen = torch.Generator().manual_seed(0)
        if self.w.prepare_train is not None:
            return self.call("prepare_train()", self.w.prepare_train, x, gen, self.options)
        if self.w.prepare is not None:
            x = self.call("prepare()", self.w.prepare, x)
        if self.w.augment is not None:
            x = self.call("augment()", self.w.augment, x, gen)
        return x

    def forward(self, model, inputs, raw, split: str):
        """The model's outputs; a forward that fails on input of another dtype than its weights says which
        function made that input and the dtype to return."""
        if not isinstance(inputs, torch.Tensor):
            self.fail(f"{self.maker(split)} returned a {type(inputs).__name__}: return a torch tensor")
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        try:
            outputs = model(inputs)
        except Exception as err:
            if weights is not None and inputs.dtype != weights:
                try:
                    model(inputs.to(weights))
                except Exception:
                    pass
                else:
                    made_by = "load()" if inputs.dtype == raw.dtype else self.maker(split)
                    what = "features" if made_by == "load()" else "input"
                    self.fail(f"{made_by} returned {dtype_name(inputs.dtype)} {what}, which the model's "
                              f"{dtype_name(weights)} weights refuse: return {dtype_name(weights)}"
                              + (f" (x.astype(np.{dtype_name(weights)}), or convert it in prepare())"
                                 if made_by == "load()" else f" (x.to(torch.{dtype_name(weights)}))"))
            self.raised("the model's forward", err, f" (on a few {split} examples)")
        if not isinstance(outputs, torch.Tensor):
            self.fail(f"the model's forward returned a {type(outputs).__name__}: return a tensor of outputs")
        if outputs.ndim == 0 or len(outputs) != len(inputs):
            self.fail(f"the model's forward returned outputs of shape {tuple(outputs.shape)} for {len(inputs)} "
                      f"examples: their first dimension must be the batch")
        if not torch.isfinite(outputs).all():
            self.fail(f"the model's outputs on a few {split} examples are not finite at initialisation: check the "
                      f"model's init and what prepare() makes of the data")
        return outputs

    def maker(self, split: str) -> str:
        """The function that last touched a batch before the model."""
        if split == "training":
            if self.w.prepare_train is not None:
                return "prepare_train()"
            if self.w.augment is not None:
                return "augment()"
        return "prepare()"

    def refused_labels(self, outputs, y, err: Exception) -> None:
        """When loss() refuses the labels but takes them as int64 (class indices) or as the outputs' float dtype,
        the labels' dtype is the bug: say so, naming load()."""
        if not isinstance(y, torch.Tensor):
            return
        for dtype in (torch.int64, outputs.dtype):
            if y.dtype == dtype:
                continue
            try:
                self.w.loss(outputs, y.to(dtype))
            except Exception:
                continue
            self.fail(f"load() returned {dtype_name(y.dtype)} labels, which loss() refuses ({first_line(err)}): "
                      f"return {dtype_name(dtype)} labels (y.astype(np.{dtype_name(dtype)}))")

    def evaluate(self, model, split: str, x, y) -> None:
        inputs = self.call("prepare()", self.w.prepare, x) if self.w.prepare is not None else x
        outputs = self.forward(model, inputs, x, split).float()
        if y is None:  # an unlabelled test split is predicted, never scored
            return
        scores = self.call("evaluate()", self.w.evaluate, outputs, y, where=f" (on a few {split} examples)")
        declared = [m.name for m in self.w.metrics]
        example = "{" + ", ".join(f"{n!r}: float" for n in declared) + "}"
        if not isinstance(scores, dict):
            self.fail(f"evaluate() returned a {type(scores).__name__}: return a dict {example}")
        for name in declared:
            if name not in scores:
                self.fail(f"evaluate() returned no {name!r} (its keys: {', '.join(map(repr, scores)) or 'none'}): "
                          f"return a dict {example}")
            value = scores[name]
            if isinstance(value, (torch.Tensor, np.ndarray)) and math.prod(value.shape) == 1:
                value = value.item()  # the engine's float() takes a one-element tensor or array too
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                self.fail(f"evaluate() returned {name!r} as a {type(value).__name__} ({value!r:.40}): return a "
                          f"float (a tensor's .item())")
            if not math.isfinite(float(value)):
                self.fail(f"evaluate() returned {float(value)} for {name!r} on a few {split} examples of a freshly "
                          f"initialised model with finite outputs: return a finite float (the engine itself "
                          f"reports NaN for a diverged model)")


def pick(y, n: int) -> list[int]:
    """Up to FEW row indices, ascending (memory maps read forwards): from rows spread over the split, first one
    of each label value (so a split's few hold both classes of a binary task, and AUC is defined), then the rest."""
    candidates = sorted({round(i) for i in np.linspace(0, n - 1, min(n, CANDIDATES))})
    chosen = []
    if y is not None:
        labels = np.asarray([np.asarray(y[i]) for i in candidates])
        if labels.ndim == 1 and labels.dtype.kind in NUMERIC:
            _, first = np.unique(labels, return_index=True)
            chosen = [candidates[i] for i in sorted(first)][:FEW]
    chosen += [i for i in candidates if i not in chosen][:FEW - len(chosen)]
    return sorted(chosen)


def source_file(workload: Workload) -> str:
    """The file that defines the workload's functions (its load), absolute; "" when there is none."""
    module = sys.modules.get(getattr(workload.load, "__module__", ""))
    file = getattr(module, "__file__", None)
    return os.path.abspath(file) if file else ""


def shown(path: str) -> str:
    """A path as a user would type it: relative to the working folder when inside it."""
    if not path:
        return "no file"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape[1:])} {dtype_name(t.dtype)}"
