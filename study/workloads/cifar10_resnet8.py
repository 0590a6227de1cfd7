"""CIFAR-10 with ResNet-8 as in Shallue et al. 2019: a 3x3 conv of 16 filters, three stages of one residual block
each (16, 32, 64 filters; the second and third halve the resolution), global average pooling, fc 10. ResNet-(6n+2)
with --blocks n (n=3: ResNet-20). Augmentation: pad 4 and random 32x32 crop, random horizontal flip, batched on the
device.

`python -m study run cifar10-resnet8 --data-dir DIR` (the cifar-10-batches-py folder, or its parent; --download
fetches it), or `--smoke` on generated CIFAR-10 files (study.data.cifar.load_synthetic). The validation split is
--val-size training images drawn at random, stratified by class and seeded by --split-seed (study.data.validation;
--val-split tail takes the last ones, as studies stored before 2026-12-07 did and resume with); the test split is
CIFAR-10's own.
"""

import math

import torch
from torch import nn

from study.data import cifar, validation
from study.errors import StudyError
from study.workload import Goal, Metric, Option, Workload

MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's per-channel pixel mean and standard deviation on the 0..1 scale
STD = (0.2470, 0.2435, 0.2616)


def load(options: dict) -> dict:
    if options["synthetic"]:
        data = cifar.load_synthetic()
    elif not options["data_dir"]:
        raise StudyError("no data: pass --data-dir DIR (add --download to fetch CIFAR-10 there), or --smoke")
    else:
        try:
            data = cifar.load(options["data_dir"])
        except StudyError:
            if not options["download"]:
                raise
            cifar.download(options["data_dir"])
            data = cifar.load(options["data_dir"])
    train, val = validation.carve(*data["train"], options, classes=True)
    if options["train_limit"]:
        train = train[0][:options["train_limit"]], train[1][:options["train_limit"]]
    as_long = lambda split: (split[0], split[1].astype("int64"))  # noqa: E731
    return {"train": as_long(train), "val": as_long(val), "test": as_long(data["test"])}


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def model(options: dict) -> nn.Module:
    layers, c_in = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(options["blocks"]):
            layers.append(Block(c_in, width, 2 if stage > 0 and i == 0 else 1))
            c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def prepare(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> float, normalised per channel."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad 4 (zeros: the mean after normalising), crop 32x32 at a random offset, flip half the images; one gather
    for the whole batch."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    dy, dx = (torch.randint(0, 9, (b,), generator=generator, device=x.device) for _ in range(2))
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    rows = torch.arange(h, device=x.device) + dy[:, None]
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channel last


def evaluate(outputs: torch.Tensor, y: torch.Tensor) -> dict:
    return {"error": (outputs.argmax(1) != y).float().mean().item(),
            "loss": nn.functional.cross_entropy(outputs, y).item()}


workload = Workload(
    name="cifar10-resnet8", unit="images",
    summary="CIFAR-10, ResNet-8 as in Shallue et al. 2019, pad-crop-flip on the device; goal 30 % validation error",
    load=load, model=model, loss=nn.functional.cross_entropy, prepare=prepare, augment=augment, evaluate=evaluate,
    metrics=(Metric("error", False, bounds=(0, 1)), Metric("loss", False, bounds=(0, math.inf))), primary="val_error",
    goals=(Goal("val_error", 0.30),), chance={"val_error": 0.9, "test_error": 0.9},
    defaults=dict(batch_sizes=[32, 64, 128, 256, 512, 1024], optimizers=["nesterov"], lrs=[0.05, 0.1, 0.2],
                  epochs=30, seeds=[0, 1, 2], momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    smoke=dict(batch_sizes=[32, 64], optimizers=["nesterov"], lrs=[0.05], epochs=2, seeds=[0],
               options={"synthetic": True, "val_size": 128, "train_limit": 256}),
    options=(Option("data_dir", str, "", "the cifar-10-batches-py folder, or the folder holding it"),
             Option("download", bool, False, "fetch CIFAR-10 through torchvision into --data-dir"),
             Option("synthetic", bool, False, "generated CIFAR-10 files instead of CIFAR-10 (what --smoke uses)"),
             Option("val_size", int, 5000, "training images held out as the validation split (--val-split)"),
             *validation.options(before="tail", classes=True),
             Option("train_limit", int, 0, "train on the first N of the remaining training images (0: all)"),
             Option("blocks", int, 1, "residual blocks per stage: ResNet-(6n+2), 1 is ResNet-8, 3 ResNet-20")),
)
