"""The PCam paper's plain function trainable (`python -m study.pcam`): `train_pcam(config, data)` runs the pcam
workload (study.pcam.workload) through the workload engine's trial (study.engine.run_workload) inside the trial
bridge (study.engine.bridge). Tune restarts a failed trial from its latest checkpoint.
"""

from pathlib import Path

import torch

from study.engine.bridge import load_start, reporter, trial_device, trial_entry
from study.engine.config import TrainConfig
from study.engine.run_workload import run_workload
from study.pcam import data as pcam_data
from study.pcam import stored
from study.pcam.model import VGG16Patches
from study.pcam.workload import auc, bce  # noqa: F401 (where the tests find them)
from study.workload import resolve


@trial_entry
def train_pcam(config: dict, data: dict) -> None:
    """One trial of `python -m study.pcam`, as Tune runs it: config is the study's stored layout (study.pcam.stored),
    of today or of an earlier version. data: {"features": VGG16 conv state_dict or None}, loaded once by the driver."""
    cfg = stored.train_config(config)
    trial = trial_device(tf32=cfg.tf32, benchmark=True)  # fixed shapes: cuDNN's autotuning pays once
    every = stored.checkpoint_every(config)
    run_pcam(cfg, data["features"], trial.device, reporter(trial.placement, every=every),
             load_start(), memory_budget=trial.memory_budget, packed=trial.packed)


def run_pcam(cfg: TrainConfig, features: dict | None, device: torch.device, report, start: dict | None = None, *,
             memory_budget: int | None = None, packed: bool = False):
    """The PCam trial without Ray: cfg of the "pcam" workload (study.pcam.workload), run by the workload engine's
    trial with the paper's VGG16 features. report(metrics, state, files) gets every epoch; the last one carries the
    test metrics of the best-on-validation weights and the prediction files. features: the VGG16 conv weights
    (None: random init)."""
    return run_workload(cfg, resolve(cfg.workload), None, device,
                        lambda m, s, files=None: report(m, s, files or {}), start, memory_budget=memory_budget,
                        packed=packed,
                        model_factory=lambda options: VGG16Patches(features, options["freeze_blocks"]))


def locate_or_fetch(cfg: TrainConfig) -> dict:
    """The PCam files on this node; with the download option a node that lacks them fetches them once (under a
    lock)."""
    if cfg.options.get("download"):
        return pcam_data.locate_or_fetch(Path(cfg.options["data_dir"]))
    return pcam_data.locate(cfg.options["data_dir"])
