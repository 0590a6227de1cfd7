"""One frozen config per study: what a single trial needs, with the papers' values as defaults.

Tune hands a trainable a plain dict; `from_dict` turns it back into the dataclass and refuses unknown keys, wrong
types and out-of-range values, so a typo in a grid fails loudly instead of silently training the default.
The grids (lists of values to sweep) are module constants here and become the CLIs' defaults.
"""

import dataclasses
import math
from dataclasses import dataclass

from study.errors import StudyError

OPTIMIZERS = ("adam", "sgd")
LR_SCALING_RULES = ("none", "linear", "sqrt")  # study.engine.lr_scaling.scaled_lr
NOISE_EVERY = 32  # the gradient noise scale is probed on every 32nd training step of an epoch (study.engine.noise)

# MNIST regression study ("Is the batch size affecting the performance of regression CNNs?").
MNIST_TARGETS = ("mean", "median", "std", "var")  # statistics of each image's 784 pixels, 0..255 scale
# Its grid and learning-rate search: study/mnist/workload.py.

# PCam study ("The influence of batch size on CNN performance ... for histopathology image categorisation").
PCAM_BATCH_SIZES = (32, 64, 128, 256, 512)
PCAM_LRS = {"sgd": (0.002, 0.0002), "adam": (0.001, 0.0001)}  # the original's tables


@dataclass(frozen=True)
class MnistConfig:
    target: str = "mean"  # mean | median | std | var
    lr: float = 1e-3  # base learning rate (before --lr-scaling)
    lr_factor: float = 1.0  # stage lr_fine: lr is this multiple of the best coarse lr (already applied to lr)
    batch_size: int = 32  # images per optimizer step
    epochs: int = 10
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.0  # SGD only
    seed: int = 32  # model init and data order
    run: int = 0  # index of the repeated run
    stage: str = "single"  # lr_coarse | lr_fine | batch_sweep | single
    input_scale: str = "raw"  # raw: pixels as floats 0..255 (the original); unit: 0..1
    target_scale: str = "raw"  # raw: statistics on the 0..255 scale (the original); unit: on 0..1
    val_size: int = 0  # training images held out for validation (0: train on all of them)
    eval_batch_size: int = 4096  # images per evaluation forward pass (memory only, no effect on results)
    noise_scale: bool = True  # estimate the gradient noise scale B_simple during training
    noise_every: int = NOISE_EVERY  # probe the noise scale on every Nth training step of an epoch
    lr_scaling: str = "none"  # none | linear | sqrt: lr = base x f(batch / lr_reference_batch)
    lr_reference_batch: int = 32
    warmup_epochs: float = 0.0  # linear warmup (Goyal et al. 2017) over this many epochs
    tf32: bool = False  # CUDA: TF32 for fp32 convolutions and matmuls (off: raw 0..255 inputs, targets in 1000s)
    code_version: str = ""  # git SHA or package version, stored with every trial

    def __post_init__(self):
        _choice("target", self.target, MNIST_TARGETS)
        _choice("input_scale", self.input_scale, ("raw", "unit"))
        _choice("target_scale", self.target_scale, ("raw", "unit"))
        _check_common(self)
        if self.val_size < 0:
            raise StudyError(f"val_size must be >= 0, got {self.val_size}")

    @classmethod
    def from_dict(cls, values: dict) -> "MnistConfig":
        return _from_dict(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PcamConfig:
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd (momentum 0.9, as the original) | adam
    lr: float = 0.002
    momentum: float = 0.9  # SGD only
    epochs: int = 55
    seed: int = 0
    run: int = 0  # index of the repeated seed (--seeds)
    data_dir: str = ""  # folder with the official HDF5 layout (prepared once by the driver)
    download: bool = False  # a node without the files fetches them into data_dir once (under a file lock)
    weights: str = "imagenet"  # imagenet | none | path to a VGG16 state_dict
    freeze_blocks: int = 2  # VGG16 conv blocks kept frozen (the original fine-tunes the last three)
    flip: bool = True  # random horizontal and vertical flips
    rot90: bool = True  # random 90-degree rotations
    zoom: float = 0.1  # random zoom factor in [1 - zoom, 1 + zoom]
    brightness: float = 0.1  # random brightness factor in [1 - b, 1 + b]
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    eval_batch_size: int = 512
    train_limit: int = 0  # use only the first N training patches (0: all)
    noise_scale: bool = True
    noise_every: int = NOISE_EVERY
    lr_scaling: str = "none"
    lr_reference_batch: int = 32
    warmup_epochs: float = 0.0
    tf32: bool = False  # CUDA: TF32 for what runs in fp32 (outside bf16 autocast, or all of it with amp off)
    checkpoint_every: int = 1  # epochs between checkpoints (epoch 0 and the last are always checkpointed)
    code_version: str = ""

    def __post_init__(self):
        _check_common(self)
        if self.checkpoint_every < 1:
            raise StudyError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.data_dir:
            raise StudyError("data_dir is empty: the driver must prepare the data and pass its folder")
        if not 0 <= self.freeze_blocks <= 5:
            raise StudyError(f"freeze_blocks must be in 0..5 (VGG16 has five conv blocks), got {self.freeze_blocks}")
        for name in ("zoom", "brightness"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise StudyError(f"{name} must be in [0, 1), got {value}")

    @classmethod
    def from_dict(cls, values: dict) -> "PcamConfig":
        return _from_dict(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _check_common(cfg):
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("lr_scaling", cfg.lr_scaling, LR_SCALING_RULES)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise StudyError(f"learning rate must be a positive number, got {cfg.lr}")
    for name in ("batch_size", "epochs", "eval_batch_size", "lr_reference_batch", "noise_every"):
        if getattr(cfg, name) < 1:
            raise StudyError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.momentum < 0 or cfg.warmup_epochs < 0:
        raise StudyError(f"momentum and warmup_epochs must be >= 0, got {cfg.momentum} and {cfg.warmup_epochs}")


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
