"""The layout `python -m study.pcam` stores a trial's config in (params.json, Tune's param_space and experiment
state), and `train_config`, the one mapping from it to the engine's TrainConfig and the pcam workload's options.

Studies stored before the workload redesign (tests/data/pcam-v1) and those stored today share this flat layout:
the readers (analysis, the report, TensorBoard's run names, the console) keep reading config["optimizer"], and a
trial, resumed or new, of either age is mapped here alone. Names that changed: the layout's flip and rot90 are the
workload's no_flip and no_rot90, inverted. Imports no torch: analysis may read these names.
"""

import dataclasses

from study.engine.config import NOISE_EVERY, TrainConfig, stored_keys
from study.errors import StudyError

WORKLOAD = "pcam"  # study/pcam/workload.py
STAGE = "grid"  # the study's one stage (the layout stores none)
# Every stored key with the value a trial that stores none ran with (the stored layout's defaults).
DEFAULTS = dict(
    batch_size=32, optimizer="sgd", lr=0.002, momentum=0.9, epochs=55, seed=0, run=0, data_dir="", download=False,
    weights="imagenet", freeze_blocks=2, flip=True, rot90=True, zoom=0.1, brightness=0.1, amp=True,
    eval_batch_size=512, train_limit=0, noise_scale=True, noise_every=NOISE_EVERY, lr_scaling="none",
    lr_reference_batch=32, warmup_epochs=0.0, tf32=False,
    checkpoint_every=1,  # epochs between checkpoints: the trial bridge's cadence, no TrainConfig field
    code_version="")
OPTIONS = ("data_dir", "download", "train_limit", "weights", "freeze_blocks", "zoom", "brightness")  # same names
INVERTED = {"flip": "no_flip", "rot90": "no_rot90"}  # stored key -> the workload option that is its negation
FIXED = dict(workload=WORKLOAD, stage=STAGE, weight_decay=0.0, schedule="constant", final_lr_factor=1.0)


def train_config(stored: dict) -> TrainConfig:
    """A stored trial config (any age of the layout) as the TrainConfig its trial runs; unknown keys refused."""
    values = _complete(stored)
    values.pop("checkpoint_every")
    options = {k: _plain(values.pop(k)) for k in OPTIONS}
    options.update({option: not values.pop(key) for key, option in INVERTED.items()})
    return TrainConfig.from_dict(dict(values, **FIXED, options=options))


def checkpoint_every(stored: dict) -> int:
    """The stored config's epochs between checkpoints (study.engine.bridge.reporter's `every`)."""
    every = _complete(stored)["checkpoint_every"]
    if isinstance(every, bool) or not isinstance(_plain(every), int) or every < 1:
        raise StudyError(f"checkpoint_every must be an int >= 1, got {every!r}")
    return int(every)


def stored_config(cfg: TrainConfig, checkpoint_every: int = 1) -> dict:
    """The stored layout of a trial's TrainConfig (train_config maps it back): every key, as params.json holds."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(FIXED)
    out = {}
    for key in DEFAULTS:
        if key in fields:
            out[key] = getattr(cfg, key)
        elif key in INVERTED:
            out[key] = not cfg.options[INVERTED[key]]
        else:
            out[key] = checkpoint_every if key == "checkpoint_every" else cfg.options[key]
    return out


def _complete(stored: dict) -> dict:
    return stored_keys(stored, DEFAULTS, "PCam trial config")


def _plain(value):
    """Tune may hand numpy scalars; the workload's options take Python's."""
    return value.item() if hasattr(value, "item") else value
