"""Batched augmentation and normalisation of PCam patches on their device: uint8 (B, 96, 96, 3) in, model input out.

Every random draw is one (B, 5) tensor per batch from the caller's generator, on the batch's device, so an
epoch's augmentation is fixed by its generator. Per image: a flip/rotation (the 8 symmetries of a square; tissue
has no up or left), a zoom about the centre and a brightness factor. Two ways to apply them, same distribution:

- CPU (fast path): the geometry runs on the uint8 NHWC batch, where a copy moves a quarter of the bytes of floats
  and torch has a vectorised uint8 bilinear resize. A row-level index_select sorts the images by their draw
  (flipping rows on the way), each group is then one half turn, transpose or resize, and one more
  index_select restores batch order. The zoom factor is quantised to h / s for a crop size s
  of h's parity (so every crop is exactly centred): steps of 2 px, about 2% at 96 px, 10 sizes for zoom 0.1.
  Resized pixels are rounded to whole levels, as torchvision's uint8 transforms do, and the outermost ones
  interpolate within the crop (up to 4% of a neighbour outside it is left out). Brightness is clamped at white
  on the bytes too (see _saturate_u8: a factor f above 1 is rounded down, by less than f / 255). The batch is
  cut into one share per intra-op thread, each processed on one core by its own Python thread (_run_parts).
- CUDA, or a zoom with too few or too many crop sizes: one grid_sample on floats does flip, rotation and zoom
  (exact factor) in one kernel, without host synchronisation. With zoom=0 it samples nearest, so flips stay exact.
  Brightness is exact there, clamped on the floats.

Brightness and the ImageNet normalisation are then one fused multiply-add per element, so a brightened pixel
stays at most white (255), as torchvision's ColorJitter clamps. Zooming out reflects the image at its edges.
The CPU path's grouping (sorting by draw, half turns, transposes, resizes) is augment_u8.py's; this module draws,
chooses the path, runs the shares and normalises.
"""

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from study.pcam.augment_u8 import geometry_u8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SHARE = 16  # images per thread's share of a batch at least (below, per-op overheads dominate)
MAX_CROP_SIZES = 32  # resize calls per batch at most (zoom <= 0.3 at 96 px: still 2x faster than grid_sample)


def to_input(x_u8: torch.Tensor, *, generator: torch.Generator | None = None, flip: bool = True,
             rot90: bool = True, zoom: float = 0.1, brightness: float = 0.1, train: bool = True) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), channels_last, ImageNet-normalised; augmented if train.

    With train, per image: random horizontal and vertical flips, rotation by a random multiple of 90 degrees,
    zoom by a factor in [1-zoom, 1+zoom] (in steps of about 2% on CPU, see the module docstring) and brightness
    scaled by a factor in [1-brightness, 1+brightness] (clamped at white; on CPU a factor above 1 is rounded
    down, by under 0.45 % for brightness 0.1), each switched off by False or 0.
    Images stay in batch order, so labels stay aligned.
    """
    if x_u8.dtype != torch.uint8 or x_u8.dim() != 4 or x_u8.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (B, H, W, 3) batch, got {x_u8.dtype} {tuple(x_u8.shape)}")
    b, h, w, _ = x_u8.shape
    geometric = train and (flip or rot90 or zoom > 0)
    if geometric and h != w:
        raise ValueError(f"flips, rotations and zoom need square patches, got {h}x{w}")
    device = x_u8.device
    scale, shift, white = _channel_constants(device)
    u = torch.rand(b, 5, generator=generator, device=device) if train else None
    factor = 1 - brightness + 2 * brightness * u[:, 4] if train and brightness > 0 else None
    t = _symmetry(u, flip, rot90) if geometric else None
    sizes = _crop_sizes(u[:, 3], h, zoom) if geometric and zoom > 0 else None
    if not _grouped(device, h, sizes):  # floats: CUDA, or a zoom the uint8 path does not take
        if factor is None:
            white = None
        else:
            scale = scale * factor.view(b, 1)
        if not geometric:
            return _normalise(x_u8, scale, shift, white)
        return _grid_path(x_u8, t, u[:, 3], zoom, scale, shift, white)
    out = torch.empty(b, h, w * 3)
    t = t.numpy() if geometric else None

    def part(lo: int, hi: int) -> None:  # images lo..hi-1, written into out[lo:hi]
        y = x_u8[lo:hi]
        if geometric:
            y = geometry_u8(y, t[lo:hi], None if sizes is None else (sizes[0][lo:hi], *sizes[1:]), flip, rot90)
        part_scale = scale
        if factor is not None:
            y, part_factor = _saturate_u8(y, factor[lo:hi], in_place=geometric)  # never the caller's bytes
            part_scale = scale * part_factor.view(-1, 1)
        _normalise(y, part_scale, shift, None, out=out[lo:hi])

    _run_parts(part, b)
    return out.view(b, h, w, 3).permute(0, 3, 1, 2)


def _run_parts(part, b: int) -> None:
    """part(lo, hi) over the batch: cut into one share per intra-op thread, each run by its own Python thread on
    one core (torch ops release the GIL). Many of these ops use a second core poorly (the uint8 resize hardly
    at all), so shares side by side beat each op split over cores: 128 patches in 5.2-5.5 ms instead of 6.5 ms
    on 2 cores (measured). Bitwise the same: every image's draws were made before the cut."""
    threads = torch.get_num_threads()
    shares = max(1, min(threads, b // MIN_SHARE))
    if shares == 1:
        return part(0, b)
    bounds = [(b * k // shares, b * (k + 1) // shares) for k in range(shares)]
    inference = torch.is_inference_mode_enabled()  # threads do not inherit it, and inference tensors need it
    futures = [_pool(shares - 1).submit(_one_core, part, lo, hi, inference) for lo, hi in bounds[1:]]
    torch.set_num_threads(1)  # this thread's OpenMP setting only (and the default for threads made from now)
    try:
        part(*bounds[0])
    finally:
        errors = [f.exception() for f in futures]  # waits for every share: none may outlive this call
        torch.set_num_threads(threads)
    for err in errors:
        if err is not None:
            raise err


def _one_core(part, lo: int, hi: int, inference: bool) -> None:
    torch.set_num_threads(1)
    with torch.inference_mode(inference):
        part(lo, hi)


def _saturate_u8(y: torch.Tensor, factor: torch.Tensor, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness clamped at white in uint8, ahead of normalisation: returns the clamped images and the factors
    to scale them by. A factor f > 1 saturates the levels from c = ceil(255 / f) up, so the images are clamped at
    c and scaled by 255 / c (below f by less than f / 255, relative), which maps c exactly to white. One pass over
    the bytes replaces a clamp over the floats, which move 4x as many bytes."""
    brighter = factor > 1
    c = torch.where(brighter, torch.ceil(255 / factor), 255.0)
    factor = torch.where(brighter, 255 / c, factor)
    c = c.to(torch.uint8).view(-1, 1, 1, 1)
    return torch.minimum(y, c, out=y) if in_place else torch.minimum(y, c), factor


@functools.lru_cache(maxsize=None)
def _channel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: 0..255 -> normalised scale (1, 3), shift (3,), and white normalised (3,). Made once per device:
    building them per batch would copy from the host, which on CUDA waits for all queued kernels."""
    std = torch.tensor(IMAGENET_STD, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    return (1 / (255 * std)).view(1, 3), -mean / std, (1 - mean) / std


def _symmetry(u: torch.Tensor, flip: bool, rot90: bool) -> torch.Tensor:
    """Each image's symmetry as t = transpose + 2 * flip_rows + 4 * flip_columns (transpose first), in 0..7.

    Both switches: all 8 equally likely. rot90 alone: the 4 rotations (identity, both flips, transpose with one
    flip). flip alone: independent horizontal and vertical flips.
    """
    transpose = (u[:, 0] < 0.5) if rot90 else torch.zeros_like(u[:, 0], dtype=torch.bool)
    rows = (u[:, 1] < 0.5) if (flip or rot90) else torch.zeros_like(transpose)
    columns = (u[:, 2] < 0.5) if flip else rows ^ transpose
    return transpose.long() + 2 * rows.long() + 4 * columns.long()


def _crop_sizes(u: torch.Tensor, h: int, zoom: float) -> tuple[torch.Tensor, int, int]:
    """Each image's crop size s, of h's parity so the crop is centred (zoom factor h / s), and the range of s."""
    s_min = h + 2 * math.ceil((h / (1 + zoom) - h) / 2 - 1e-9)
    s_max = h + 2 * math.floor((h / (1 - zoom) - h) / 2 + 1e-9)
    factor = 1 - zoom + 2 * zoom * u
    return (h + 2 * ((h / factor - h) / 2).round().long()).clamp(s_min, s_max), s_min, s_max


def _grouped(device: torch.device, h: int, sizes) -> bool:
    """Whether the uint8 path applies: on CPU, with 2 to MAX_CROP_SIZES crop sizes each padding at most h pixels."""
    if device.type != "cpu":
        return False  # grouping reads the draws on the host: a synchronisation per batch on a GPU
    if sizes is None:
        return True
    _, s_min, s_max = sizes  # one size only: a zoom under 2 px, which quantising would silently switch off
    return s_min < s_max and (s_max - s_min) // 2 < MAX_CROP_SIZES and s_max <= 3 * h


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads for _run_parts, made on first use (importing this module starts nothing). A forked child has the
    pool object but not its threads, so the fork forgets it (see the register_at_fork below)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="augment-share")


os.register_at_fork(after_in_child=_pool.cache_clear)


def _normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, white, out=None) -> torch.Tensor:
    """uint8 NHWC -> x * scale + shift per channel (scale (B or 1, 3)), at most white, float channels_last;
    written into out (float (B, H, W*C)) when given.

    Computed on rows of W*3 interleaved values with the per-channel factors tiled along the row: vectorised
    loops over 288 floats instead of scalar loops over 3 channels, and the rows are already channels_last.
    """
    b, h, w, c = x.shape

    def row(v):  # (B or 1, C) -> (B or 1, 1, W*C), the channel pattern of one image row
        return v.reshape(-1, 1, 1, c).expand(-1, 1, w, c).reshape(-1, 1, w * c)

    if out is None:
        out = x.reshape(b, h, w * c).float()
    else:
        out.copy_(x.reshape(b, h, w * c))
    torch.addcmul(row(shift), out, row(scale), out=out)
    if white is not None:
        torch.minimum(out, row(white), out=out)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def _grid_path(x_u8, t, u_zoom, zoom, scale, shift, white) -> torch.Tensor:
    """Flip, rotation and zoom (exact factor) as one grid_sample; then brightness and normalisation."""
    b, h = x_u8.shape[:2]
    base = (torch.arange(h, device=x_u8.device, dtype=torch.float32) * 2 + 1) / h - 1  # pixel centres
    zoomed = base / (1 - zoom + 2 * zoom * u_zoom.view(b, 1)) if zoom > 0 else base.expand(b, h)
    # Output pixel (i, j) samples the input at (row, column) = (r_i, c_j), or (c_j, r_i) for a transposed image.
    r = torch.where((t & 2).bool().view(b, 1), -zoomed, zoomed)
    c = torch.where((t & 4).bool().view(b, 1), -zoomed, zoomed)
    transpose = (t & 1).bool().view(b, 1, 1)
    grid = torch.empty(b, h, h, 2, device=x_u8.device)
    torch.where(transpose, r.view(b, h, 1), c.view(b, 1, h), out=grid[..., 0])  # column (x) coordinate
    torch.where(transpose, c.view(b, 1, h), r.view(b, h, 1), out=grid[..., 1])  # row (y) coordinate
    mode = "bilinear" if zoom > 0 else "nearest"  # nearest at pixel centres: flips and rotations stay exact
    x = F.grid_sample(x_u8.permute(0, 3, 1, 2).float(), grid, mode=mode, padding_mode="reflection",
                      align_corners=False)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    torch.addcmul(shift.view(1, 3, 1, 1), x, scale.view(-1, 3, 1, 1), out=out)
    if white is not None:
        torch.minimum(out, white.view(1, 3, 1, 1), out=out)
    return out
