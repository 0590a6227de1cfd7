"""The training loop's helpers, free of Ray: the device, seeds and each epoch's random stream, optimizers, batches
held on the device, the random states a checkpoint keeps, and batched prediction. The loop itself is
study.engine.loop.fit.

Because the data order and the augmentation are drawn from (seed, epoch) alone (`epoch_generator`), a trial resumed
from a checkpoint continues exactly as an uninterrupted one would (bit for bit on CPU).
"""

import math
import random
from typing import Callable, Iterator

import numpy as np
import torch


def pick_device(gpus_requested: float = 0.0) -> torch.device:
    """CUDA when Tune gave this trial a GPU share (Ray sets CUDA_VISIBLE_DEVICES to it, so it is the process's
    current device, index 0), CPU otherwise. With its index: the allocator's calls refuse a bare "cuda"."""
    if gpus_requested > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one epoch: data order and augmentation depend on (seed, epoch) only."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def make_optimizer(name: str, params, lr: float, momentum: float, device: torch.device, weight_decay: float = 0.0):
    """SGD (with momentum, or Nesterov's), Adam or AdamW (decoupled weight decay) on the fused path on CUDA (one
    kernel per step), the foreach path on CPU."""
    params = [p for p in params if p.requires_grad]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fast)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)
    if name not in ("sgd", "nesterov"):
        raise ValueError(f"unknown optimizer {name!r}; choose one of sgd, nesterov, adam, adamw")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay,
                           **fast)


class DeviceBatches:
    """A dataset held on the device as tensors, batched by indexing a shuffled permutation there."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=generator).to(self.x.device)
        for idx in order.split(self.batch_size):
            yield self.x[idx], self.y[idx]


def rng_state(device: torch.device) -> dict:
    """The random streams a resumed trial must continue: the CPU one, and on CUDA the device's (dropout there)."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int, prepare: Callable | None = None,
            autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Model outputs for all of x (on the device), in batches, as float32."""
    model.eval()
    outs = []
    for chunk in x.split(batch_size):
        if prepare is not None:
            chunk = prepare(chunk)
        with torch.autocast(chunk.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outs.append(model(chunk).float())
    model.train()
    return torch.cat(outs)
