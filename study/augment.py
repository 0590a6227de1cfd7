"""Batched, on-device augmentation and normalisation of PCam patches: uint8 (B, 96, 96, 3) in, model input out.

Every random draw is one tensor per batch from the caller's generator, on the batch's device: no per-image
Python, so augmenting costs a few kernels per batch and an epoch's augmentation is fixed by its generator.
Flips and 90-degree rotations (the symmetries of a tissue patch, which has no up or left) are one exact pixel
gather on the uint8 batch; brightness and normalisation are two elementwise passes; zoom is one bilinear resample.
"""

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=like.device)


def _dihedral(x: torch.Tensor, flip: bool, rot90: bool, generator) -> torch.Tensor:
    """Per image, a random flip and/or rotation by k*90 degrees of the (B, C, H, W) batch, as one exact gather."""
    b, c, h, w = x.shape  # square patches: a quarter turn keeps the shape
    # The 8 symmetries of a square as pixel maps: rotations by k*90 degrees (k = 0..3), then the same mirrored.
    pixels = torch.arange(h * w, device=x.device).view(h, w)
    rotations = [torch.rot90(pixels, k, (0, 1)) for k in range(4)]
    maps = torch.stack(rotations + [r.flip(1) for r in rotations]).view(8, h * w)
    draw = lambda high: torch.randint(0, high, (b,), generator=generator, device=x.device)
    k = draw(4) if rot90 else torch.zeros(b, dtype=torch.long, device=x.device)
    if flip:
        # Horizontal flip H = M (mirror); vertical flip V = M R^2. H^h V^v R^k = M^(h xor v) R^(k + 2v).
        h_flip, v_flip = draw(2), draw(2)
        k = (k + 2 * v_flip) % 4 + 4 * (h_flip ^ v_flip)
    index = maps[k].view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def _zoom(x: torch.Tensor, zoom: float, generator) -> torch.Tensor:
    """Scale each (B, C, H, W) image about its centre by a factor in [1-zoom, 1+zoom]; zooming out reflects."""
    b, _, h, w = x.shape
    factor = _uniform(b, 1 - zoom, 1 + zoom, x, generator)
    # grid_sample's coordinates of the pixel centres (align_corners=False), shrunk by the factor to magnify.
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    base = torch.stack(torch.broadcast_tensors(xs.view(1, w), ys.view(h, 1)), dim=-1)  # (H, W, (x, y))
    grid = base.unsqueeze(0) / factor.view(b, 1, 1, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def to_input(x_u8: torch.Tensor, *, generator: torch.Generator | None = None, flip: bool = True,
             rot90: bool = True, zoom: float = 0.1, brightness: float = 0.1, train: bool = True) -> torch.Tensor:
    """uint8 (B, 96, 96, 3) -> float32 (B, 3, 96, 96), channels_last, ImageNet-normalised; augmented if train.

    With train, per image: random horizontal and vertical flips, rotation by a random multiple of 90 degrees,
    zoom by a factor in [1-zoom, 1+zoom] and brightness scaled by a factor in [1-brightness, 1+brightness], each
    switched off by False or 0. Images stay in batch order, so labels stay aligned.
    """
    if x_u8.dtype != torch.uint8 or x_u8.dim() != 4 or x_u8.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (B, H, W, 3) batch, got {x_u8.dtype} {tuple(x_u8.shape)}")
    b = x_u8.shape[0]
    # NHWC permuted to NCHW: channels_last in memory, the layout the model's convolutions run fastest in.
    x = x_u8.permute(0, 3, 1, 2)
    if train and (flip or rot90):
        x = _dihedral(x, flip, rot90, generator)  # on uint8: a quarter of the bytes of floats to move
    x = x.float()
    if train and brightness > 0:
        factor = _uniform(b, 1 - brightness, 1 + brightness, x, generator)
        x = x.mul_(factor.view(b, 1, 1, 1)).clamp_(0, 255)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    x = torch.addcmul(-mean / std, x, 1 / (255 * std))  # (x / 255 - mean) / std in one pass
    if train and zoom > 0:
        # After normalising: resampling is a weighted average, so it commutes with the per-channel affine map.
        x = _zoom(x, zoom, generator)
    return x.contiguous(memory_format=torch.channels_last)
