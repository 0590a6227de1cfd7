"""The one trial config of every workload, TrainConfig: the training settings all workloads share, plus the
workload's own options (checked by the workload, study.workload.Workload.option_values).

Tune hands a trainable a plain dict; `from_dict` turns it back into the dataclass and refuses unknown keys, wrong
types and out-of-range values, so a typo in a grid fails loudly instead of silently training the default. The
papers' commands store their trials in layouts of their own and map them here (each paper's stored.py).
"""

import dataclasses
import math
from dataclasses import dataclass

from study.errors import StudyError

LR_SCALING_RULES = ("none", "linear", "sqrt")  # study.engine.lr_scaling.scaled_lr
NOISE_EVERY = 32  # the gradient noise scale is probed on every 32nd training step of an epoch (study.engine.noise)
TRAIN_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")  # sgd and nesterov use momentum; adamw weight_decay
SCHEDULES = ("constant", "linear", "cosine")  # after warmup, the lr decays to final_lr_factor x over the trial


@dataclass(frozen=True)
class TrainConfig:
    """One trial of any workload (study.workload): the training settings every workload shares, plus its own
    options as a dict (checked against the workload's declared options in the trial)."""
    workload: str = ""  # a shipped name, path/to/file.py or module:name (resolved again in the trial's process)
    options: dict = dataclasses.field(default_factory=dict)  # the workload's own flags
    batch_size: int = 32  # examples per optimizer step
    optimizer: str = "sgd"  # sgd | nesterov | adam | adamw
    lr: float = 0.01  # base learning rate (before lr_scaling, warmup and schedule)
    momentum: float = 0.9  # sgd and nesterov only
    weight_decay: float = 0.0  # L2 for sgd/nesterov/adam, decoupled for adamw
    lr_scaling: str = "none"  # none | linear | sqrt: lr = base x f(batch / lr_reference_batch)
    lr_reference_batch: int = 32
    warmup_epochs: float = 0.0  # linear warmup over this many epochs
    schedule: str = "constant"  # constant | linear | cosine decay after warmup, over the trial's steps
    final_lr_factor: float = 0.0  # the schedule's last lr as a multiple of the base lr (not for constant)
    epochs: int = 10
    seed: int = 0  # model init, data order and augmentation
    run: int = 0  # the seed's place in the study's grid (TensorBoard's run names)
    stage: str = "sweep"
    eval_batch_size: int = 1024  # examples per evaluation forward pass (memory only, no effect on results)
    noise_scale: bool = True  # estimate the gradient noise scale B_simple during training
    noise_every: int = NOISE_EVERY
    tf32: bool = False  # CUDA: TF32 for fp32 convolutions and matmuls
    amp: bool = False  # CUDA: bf16 autocast for the forward passes (ignored on CPU)
    code_version: str = ""

    def __post_init__(self):
        _choice("optimizer", self.optimizer, TRAIN_OPTIMIZERS)
        _choice("lr_scaling", self.lr_scaling, LR_SCALING_RULES)
        _choice("schedule", self.schedule, SCHEDULES)
        if not self.workload:
            raise StudyError("workload is empty: the driver passes the workload's name, file or module:name")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise StudyError(f"learning rate must be a positive number, got {self.lr}")
        for name in ("batch_size", "epochs", "eval_batch_size", "lr_reference_batch", "noise_every"):
            if getattr(self, name) < 1:
                raise StudyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise StudyError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise StudyError("nesterov needs a momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise StudyError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise StudyError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.final_lr_factor <= 1:
            raise StudyError(f"final_lr_factor must be in [0, 1], got {self.final_lr_factor}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return _from_dict(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name, value, allowed):
    if value not in allowed:
        raise StudyError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def stored_keys(stored, known: dict, what: str) -> dict:
    """A trial config stored in a layout of its own (a paper's) completed with `known`'s defaults; not a dict, or a
    key `known` lacks, refused in one line."""
    if not isinstance(stored, dict):
        raise StudyError(f"{what} must be a dict, got {type(stored).__name__}")
    unknown = sorted(set(stored) - set(known))
    if unknown:
        raise StudyError(f"unknown {what} keys: {', '.join(unknown)}; known: {', '.join(known)}")
    return {**known, **stored}


def _from_dict(cls, values: dict):
    if not isinstance(values, dict):
        raise StudyError(f"{cls.__name__} needs a dict, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StudyError(f"unknown {cls.__name__} keys: {', '.join(unknown)}; known: {', '.join(fields)}")
    clean = {}
    for key, value in values.items():
        want = fields[key].type
        # Tune and JSON hand back ints for whole floats and numpy scalars; accept those, refuse the rest.
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif want is int and hasattr(value, "item") and not isinstance(value, bool):
            value = value.item()
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise StudyError(f"{cls.__name__}.{key} must be {want.__name__}, got {value!r}")
        clean[key] = value
    return cls(**clean)
