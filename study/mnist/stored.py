"""The layout `python -m study.mnist` stores a trial's config in (params.json, Tune's param_space and experiment
state), and `train_config`, the one mapping from it to the engine's TrainConfig and the workload's options.

Studies stored before the workload redesign (tests/data/mnist-v1) and those stored today share this flat layout:
the readers (analysis, the report, TensorBoard's run names, the console) keep reading config["target"], and a
trial, resumed or new, of either age is mapped here alone. Imports no torch: analysis may read these names.
"""

import dataclasses

from study.engine.config import NOISE_EVERY, TrainConfig, stored_keys

WORKLOAD = "mnist-regression"  # study/mnist/workload.py
# Every stored key with the value a trial that stores none ran with (the stored layout's defaults).
DEFAULTS = dict(
    target="mean", lr=1e-3, batch_size=32, epochs=10, optimizer="adam", momentum=0.0, seed=32, run=0, stage="single",
    lr_factor=1.0,  # stage lr_fine's multiple of the best coarse lr, already applied to lr: a label, not a setting
    input_scale="raw", target_scale="raw", val_size=0, eval_batch_size=4096, noise_scale=True,
    noise_every=NOISE_EVERY, lr_scaling="none", lr_reference_batch=32, warmup_epochs=0.0, tf32=False, code_version="")
OPTIONS = ("target", "input_scale", "target_scale", "val_size")  # the workload's options, stored at the top level
LABELS = ("lr_factor",)  # stored for the readers, no TrainConfig field
# What the paper never set, as it trained: no weight decay, a constant lr after warmup, fp32.
FIXED = dict(workload=WORKLOAD, weight_decay=0.0, schedule="constant", final_lr_factor=1.0, amp=False)


def train_config(stored: dict) -> TrainConfig:
    """A stored trial config (any age of the layout) as the TrainConfig its trial runs; unknown keys refused."""
    values = {k: v for k, v in stored_keys(stored, DEFAULTS, "MNIST trial config").items() if k not in LABELS}
    options = {k: _plain(values.pop(k)) for k in OPTIONS}
    return TrainConfig.from_dict(dict(values, **FIXED, options=options))


def stored_config(cfg: TrainConfig, lr_factor: float = 1.0) -> dict:
    """The stored layout of a trial's TrainConfig (train_config maps it back): every key, as params.json holds."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: getattr(cfg, k) if k in fields else cfg.options[k] if k in OPTIONS else lr_factor for k in DEFAULTS}


def _plain(value):
    """Tune may hand numpy scalars; the workload's options take Python's."""
    return value.item() if hasattr(value, "item") else value
