"""What a workload declares: its data, model, loss, metrics and default grid, as data and plain functions.

A workload file defines `workload = Workload(...)` and imports nothing of Ray; the engine (study.commands.driver,
study.engine.run_workload) supplies the loop, the optimizers, the grid, checkpoints, TensorBoard and the console.
`resolve` finds one by a shipped name (`python -m study list`), a path to a .py file, or `module:name`.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from study.errors import StudyError

SPLITS = ("train", "val", "test")  # what load() returns; "test" is optional
OPTION_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Metric:
    name: str  # without its split prefix: "error" is reported as val_error and test_error
    higher_is_better: bool
    # (lo, hi): the metric is a mean of per-example terms each within [lo, hi] (error and accuracy: (0, 1); a
    # squared error or cross-entropy: (0, inf)), so `evaluate` on a part of a split gives that part's mean. It
    # lets a steps trial stop an evaluation early once the split's remaining examples cannot bring the metric to
    # the goal (study.engine.eval_schedule). None: no such promise; the metric is always evaluated whole.
    bounds: tuple[float, float] | None = None


@dataclass(frozen=True)
class Goal:
    """A value of a validation metric that counts as a result. Its direction is the declared metric's: a workload
    writes Goal("val_error", 0.01) and the Workload holding it fills in higher_is_better. Stored (workload.json,
    study.json, a steps trial's config) as to_dict()'s {"metric", "value", "higher_is_better"}."""
    metric: str  # a declared metric with its split prefix, e.g. "val_error"
    value: float
    higher_is_better: bool | None = None  # None until a Workload fills in its metric's

    def reached(self, value: float) -> bool:
        """Whether a value of the metric meets the goal (equal to it does); NaN never does."""
        if self.higher_is_better is None:
            raise ValueError(f"goal {self.metric} = {self.value:g} has no direction: build it with its Workload")
        return value >= self.value if self.higher_is_better else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": float(self.value), "higher_is_better": self.higher_is_better}

    @classmethod
    def from_dict(cls, stored: dict) -> "Goal":
        return cls(str(stored["metric"]), float(stored["value"]), bool(stored["higher_is_better"]))


@dataclass(frozen=True)
class Option:
    """One flag of the workload's own: --name-with-dashes on the CLI, options["name"] in load() and model()."""
    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple = ()  # the allowed values, when they are few (the flag refuses others)
    # The value a study stored before this option existed ran with, when that is not `default` (a new default that
    # changes results): resuming such a study keeps it (Workload.options_before, study.commands.driver.resumed). None: default.
    before: Any = None


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str  # one line for `python -m study list`
    load: Callable[[dict], dict]  # options -> {"train": (x, y), "val": (x, y), optional "test": (x, y)}, numpy
    model: Callable[[dict], Any]  # options -> a fresh torch.nn.Module
    loss: Callable  # (outputs, y) -> scalar tensor, the mean over the batch
    metrics: tuple[Metric, ...]
    primary: str  # a prefixed metric, e.g. "val_error": what the console and the report lead with
    evaluate: Callable  # (outputs, y) -> {metric name: float} for one split; the engine adds val_/test_
    goals: tuple[Goal, ...] = ()
    chance: dict = field(default_factory=dict)  # prefixed metric -> the value of a model that learned nothing
    prepare: Callable | None = None  # x on the device -> model input (uint8 -> float, normalise); also for eval
    augment: Callable | None = None  # (prepared x, torch.Generator on the device) -> x; batched, training only
    defaults: dict = field(default_factory=dict)  # batch_sizes, optimizers, lrs, epochs, seeds, ... (grid flags)
    smoke: dict = field(default_factory=dict)  # what --smoke sets: a tiny grid, and "options" of the workload's own
    options: tuple[Option, ...] = ()
    report: str = ""  # "module:function": the workload's own report section (analysis imports only this of it)
    unit: str = "examples"  # what one training example is, in the figures' axes ("images" for image data sets)
    # For large data sets and fine-tuning; each is optional and off by default.
    memory_mapped: bool = False  # load() returns memory maps (uint8 x); each trial opens them itself and the engine
    # streams batches from them (study.data.batches), uploading a split whole when the trial's memory plan allows
    prepare_train: Callable | None = None  # (raw x, generator, options) -> training input, prepare and augment in
    # one pass (a uint8 pipeline on the device); replaces prepare + augment on training batches
    select: str = ""  # a prefixed validation metric: the best epoch's weights by it are kept and tested
    files: Callable | None = None  # (outputs, y or None, options) -> {file name: write(path)}: extra files of the
    # final checkpoint, from the tested model's outputs on the test split (predictions, a submission)
    channels_last: bool = False  # on CUDA the model's weights in NHWC (when prepare delivers NHWC batches)
    # Stages before the sweep, as data: {"lr_search": {"lr_grid", "fine_factors", "batch_size", "select"}}, a
    # learning-rate search (study.commands.lr_search) that `python -m study run WORKLOAD --lr-search` runs first.
    stages: dict = field(default_factory=dict)

    def __post_init__(self):
        # Each goal takes its metric's direction here, so every Goal a workload holds can say reached(value); one
        # on an undeclared metric stays without and check() refuses it, as it does a direction given wrong.
        object.__setattr__(self, "goals", tuple(
            dataclasses.replace(g, higher_is_better=self._declared(g.metric).higher_is_better)
            if isinstance(g, Goal) and g.higher_is_better is None and self._declared(g.metric) else g
            for g in self.goals))

    def _declared(self, prefixed) -> Metric | None:
        for split in SPLITS:
            if isinstance(prefixed, str) and prefixed.startswith(split + "_"):
                for m in self.metrics:
                    if m.name == prefixed[len(split) + 1:]:
                        return m
        return None

    def metric(self, prefixed: str) -> Metric:
        """The declared Metric behind a prefixed name (val_error -> Metric("error", ...))."""
        found = self._declared(prefixed)
        if found is not None:
            return found
        raise StudyError(f"workload {self.name}: {prefixed!r} is no declared metric with a split prefix "
                         f"(declared: {', '.join(m.name for m in self.metrics)}; prefixes {', '.join(SPLITS)})")

    def goal(self, prefixed: str, value: float) -> Goal:
        """A goal on a declared metric (--goal METRIC=VALUE), with the metric's direction."""
        return Goal(prefixed, float(value), self.metric(prefixed).higher_is_better)

    def options_before(self) -> dict:
        """The options whose value in a study stored without them is not today's default: name -> that value."""
        return {o.name: o.before for o in self.options if o.before is not None and o.before != o.default}

    def option_values(self, given: dict | None = None) -> dict:
        """Every option of the workload, the defaults with `given` on top; unknown names and wrong types refused."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given or {}) - set(known))
        if unknown:
            raise StudyError(f"workload {self.name} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(known) or 'none'}")
        values = {o.name: o.default for o in self.options}
        for name, value in (given or {}).items():
            want = known[name].type
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise StudyError(f"workload {self.name}: option {name} must be {want.__name__}, got {value!r}")
            if known[name].choices and value not in known[name].choices:
                raise StudyError(f"workload {self.name}: option {name} must be one of "
                                 f"{', '.join(map(str, known[name].choices))}, got {value!r}")
            values[name] = value
        return values


def _papers_workloads() -> dict:
    """Each paper package's workload (a package under study/ whose __init__ sets WORKLOAD, its name; the workload
    itself is the package's `workload` module): found, not named, so the engine names no paper."""
    import pkgutil

    found = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.ispkg:
            package = importlib.import_module(f"study.{info.name}")  # a paper's __init__ imports nothing
            if isinstance(getattr(package, "WORKLOAD", None), str):
                found[package.WORKLOAD] = f"study.{info.name}.workload:workload"
    return found


# The shipped workloads, by name: where each one is defined (imported only when asked for).
WORKLOADS = {
    "mnist-cnn": "study.workloads.mnist_cnn:workload",
    "cifar10-resnet8": "study.workloads.cifar10_resnet8:workload",
    "least-squares": "study.workloads.least_squares:workload",
    **_papers_workloads(),
}


def resolve(spec: str) -> Workload:
    """A Workload from a shipped name, a path to a .py file that defines `workload`, or `module:name`."""
    if not isinstance(spec, str) or not spec.strip():
        raise StudyError(f"no workload given; pass a shipped name ({', '.join(WORKLOADS)}), a file.py or module:name")
    if spec in WORKLOADS:
        found = _from_module(*WORKLOADS[spec].split(":"), spec)
    elif spec.endswith(".py"):
        found = _from_file(Path(spec))
    elif ":" in spec:
        module, _, name = spec.partition(":")
        found = _from_module(module, name, spec)
    else:
        raise StudyError(f"unknown workload {spec!r}; shipped: {', '.join(WORKLOADS)} (python -m study list), "
                         f"or pass a path/to/file.py or module:name")
    check(found, spec)
    return found


def _from_file(path: Path) -> Workload:
    if not path.is_file():
        raise StudyError(f"workload file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_workload_{path.stem}_{digest}"  # one module per file: resolving it again finds the same
    if module_name in sys.modules and hasattr(sys.modules[module_name], "workload"):
        return sys.modules[module_name].workload
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise StudyError(f"importing workload file {path} failed: {type(err).__name__}: {err}")
    if not hasattr(module, "workload"):
        raise StudyError(f"{path} defines no `workload`; end it with workload = Workload(...)")
    return module.workload


def _from_module(module: str, name: str, spec: str) -> Workload:
    if not module or not name:
        raise StudyError(f"workload {spec!r} is not module:name (e.g. mypackage.tasks:workload)")
    try:
        loaded = importlib.import_module(module)
    except ImportError as err:
        raise StudyError(f"cannot import module {module!r} of workload {spec!r}: {err}")
    if not hasattr(loaded, name):
        raise StudyError(f"module {module} has no {name!r} (workload {spec!r})")
    return getattr(loaded, name)


def check(w, spec: str) -> None:
    """What a study relies on, checked once when the workload is resolved."""
    if not isinstance(w, Workload):
        raise StudyError(f"{spec!r} is a {type(w).__name__}, not a study.workload.Workload")
    if not w.metrics:
        raise StudyError(f"workload {w.name} declares no metrics")
    w.metric(w.primary)
    for goal in w.goals:
        if not isinstance(goal, Goal):
            raise StudyError(f"workload {w.name}: goals must be Goal(metric, value), got {goal!r}")
        declared = w.metric(goal.metric)
        if not goal.metric.startswith("val_"):  # steps trials evaluate the validation split only
            raise StudyError(f"workload {w.name}: a goal must be on a validation metric (val_...), "
                             f"got {goal.metric!r}")
        if isinstance(goal.value, bool) or not isinstance(goal.value, (int, float)) or not math.isfinite(goal.value):
            raise StudyError(f"workload {w.name}: goal {goal.metric}'s value must be a finite number, "
                             f"got {goal.value!r}")
        if goal.higher_is_better != declared.higher_is_better:
            raise StudyError(f"workload {w.name}: goal {goal.metric} says higher_is_better={goal.higher_is_better}, "
                             f"its metric {declared.name} {declared.higher_is_better}; leave it out (the "
                             f"metric's direction is the goal's)")
    for name in w.chance:
        w.metric(name)
    for m in w.metrics:
        lo, hi = m.bounds if m.bounds is not None and len(m.bounds) == 2 else (math.nan, math.nan)
        if m.bounds is not None and not (lo <= hi and lo < math.inf and hi > -math.inf):
            raise StudyError(f"workload {w.name}: metric {m.name}'s bounds must be (lo, hi) with lo <= hi (a mean of "
                             f"per-example terms in that range; math.inf for none above), got {m.bounds!r}")
    if w.select and not w.select.startswith("val_"):
        raise StudyError(f"workload {w.name}: select must be a validation metric (val_...), got {w.select!r}")
    if w.select:
        w.metric(w.select)
    for o in w.options:
        if o.type not in OPTION_TYPES or not isinstance(o.default, o.type):
            raise StudyError(f"workload {w.name}: option {o.name} needs a type of bool/int/float/str and a default "
                             f"of that type, got {o.type!r} and {o.default!r}")
        if o.choices and o.default not in o.choices:
            raise StudyError(f"workload {w.name}: option {o.name}'s default {o.default!r} is not one of its choices")
        if o.before is not None and (not isinstance(o.before, o.type) or (o.choices and o.before not in o.choices)):
            raise StudyError(f"workload {w.name}: option {o.name}'s before {o.before!r} is not a {o.type.__name__}"
                             f"{' of its choices' if o.choices else ''}")
    w.option_values(w.smoke.get("options", {}))
    unknown = sorted(set(w.stages) - {"lr_search"})
    if unknown:
        raise StudyError(f"workload {w.name}: unknown stages {', '.join(unknown)}; the engine runs lr_search")
    if "lr_search" in w.stages:
        search = w.stages["lr_search"]
        missing = sorted({"lr_grid", "fine_factors", "batch_size", "select"} - set(search))
        if missing:
            raise StudyError(f"workload {w.name}: stages['lr_search'] lacks {', '.join(missing)}")
        w.metric(search["select"])


def describe(w: Workload, splits) -> dict:
    """What the study stores of the workload (workload.json) so the report needs no workload code: each metric by
    the name its result rows carry (val_error, test_error, ...); the caller adds the grid's axes."""
    return {"name": w.name, "summary": w.summary, "splits": [s for s in SPLITS if s in splits and s != "train"],
            "metrics": [{"name": f"{s}_{m.name}", "higher_is_better": m.higher_is_better}
                        for s in SPLITS if s in splits and s != "train" for m in w.metrics],
            "primary": w.primary,
            "goals": [g.to_dict() for g in w.goals],
            "chance": dict(w.chance), "unit": w.unit, **({"report": w.report} if w.report else {})}
