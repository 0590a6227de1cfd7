"""The CPU path of PCam's augmentation (study.pcam.augment): flips, 90-degree rotations and zoom on a uint8 NHWC
batch, done by grouping the images by their draw instead of one transform per image.

A row-level index_select sorts the images by their symmetry (flipping rows on the way), each group then gets one
half turn or transpose in place, the zoom's crop sizes are grouped the same way for one uint8 bilinear resize each,
and a last index_select restores batch order. Apart from augment.py, which draws the per-image parameters, picks
this path or grid_sample's, and normalises: this is the index arithmetic, in numpy, that only this path needs.
"""

import numpy as np
import torch


def geometry_u8(x_u8: torch.Tensor, t: np.ndarray, sizes, flip: bool, rot90: bool) -> torch.Tensor:
    """The uint8 path's flips, rotations (symmetry t per image) and zoom (sizes: see _crop_sizes, or None)."""
    # The grouping's index arithmetic runs in numpy: on arrays of B values torch's per-op overhead dominates.
    # y[j] holds batch image order[j] (None: j); rows_flipped: flips of rows still owed, applied by the next gather.
    y, order, rows_flipped = x_u8, None, None
    if flip or rot90:
        # t = C^columns R^rows T^transpose = R^rows M R^before with M one of: nothing, C, T (as C T = T R).
        transpose, rows, columns = (t & 1).astype(bool), (t & 2).astype(bool), (t & 4).astype(bool)
        middle = np.where(transpose, 2, columns.astype(np.int64))
        y, order, counts = _sort(y, order, middle, 3, rows_flipped=transpose & columns)
        _middle_in_place(y, counts)
        rows_flipped = rows ^ (middle == 1)  # the column flips were half turns: one more row flip owed
    if sizes is not None:
        y, order = _zoom_u8(y, order, rows_flipped, sizes[0].numpy(), *sizes[1:])
        rows_flipped = None
    if order is not None:
        y = _gather(y, order, np.arange(len(y)), rows_flipped)
    return y


def _inverse(order: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse


def _gather(y: torch.Tensor, order, wanted: np.ndarray, rows_flipped=None, pad: int = 0) -> torch.Tensor:
    """The images of batch positions `wanted` from y (y[j] holds image order[j]; None: j), as one index_select;
    upside down where rows_flipped (indexed by batch position) is set; with pad rows mirrored above and below.
    Index arrays are numpy int64 arrays."""
    source = wanted if order is None else _inverse(order)[wanted]
    if rows_flipped is None and not pad:
        return y.index_select(0, torch.from_numpy(source))
    n, h = len(wanted), y.shape[1]
    i = np.arange(-pad, h + pad)
    i = np.where(i < 0, -1 - i, np.where(i >= h, 2 * h - 1 - i, i))  # mirrored: the edge row repeats
    if rows_flipped is not None:
        i = np.where(rows_flipped[wanted][:, None], h - 1 - i, i)  # symmetric padding commutes with flips
    rows = torch.from_numpy((source[:, None] * h + i).reshape(-1))
    return y.reshape(-1, *y.shape[2:]).index_select(0, rows).view(n, h + 2 * pad, *y.shape[2:])


def _sort(y: torch.Tensor, order, key: np.ndarray, n_keys: int, rows_flipped=None):
    """y's images sorted by key in 0..n_keys-1 (see _gather), their batch positions, the size of each group."""
    by_key = np.argsort(key, kind="stable")
    return _gather(y, order, by_key, rows_flipped), by_key, np.bincount(key, minlength=n_keys).tolist()


def _middle_in_place(y: torch.Tensor, counts: list[int]) -> None:
    """y's images, sorted as [unchanged | to flip columns | to transpose] (counts), get a half turn (the column
    flip and a row flip) or a transpose, in place. Both as measured fastest on CPU: reversing whole images runs
    about 4x faster than flipping columns alone, and a transpose copied channel by channel (a long inner loop
    instead of one over 3-byte pixels) about 1.8x faster than transposing pixels."""
    _, n_flip, n_transpose = counts
    start = len(y) - n_flip - n_transpose
    flipped = y[start:start + n_flip]
    torch.ops.aten.flip.out(flipped.clone(), [1, 2], out=flipped)
    if n_transpose:
        source = y[len(y) - n_transpose:].transpose(1, 2).clone(memory_format=torch.preserve_format)
        for channel in range(y.shape[3]):
            y[len(y) - n_transpose:, ..., channel].copy_(source[..., channel])


def _zoom_u8(y: torch.Tensor, order, rows_flipped, sizes: np.ndarray, s_min: int, s_max: int):
    """Each NHWC image's centred s x s crop resized to h x h, one resize per size; returns images and order."""
    h, key = y.shape[1], (sizes - s_min) // 2
    by_key = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=(s_max - s_min) // 2 + 1).tolist()
    n_inside = sum(counts[:(h - s_min) // 2 + 1])  # sorted by size: crops no larger than the image come first
    pad = (s_max - h) // 2
    sources = [_gather(y, order, by_key[:n_inside], rows_flipped),
               _pad_columns(_gather(y, order, by_key[n_inside:], rows_flipped, pad), pad)]
    out, start = y.new_empty(len(by_key), h, h, y.shape[3]), 0
    for k, n in enumerate(counts):
        s = s_min + 2 * k
        source = sources[s > h]
        first = start if s <= h else start - n_inside
        offset = (pad if s > h else 0) + (h - s) // 2
        crop, dest = source[first:first + n, offset:offset + s, offset:offset + s], out[start:start + n]
        if n and s == h:
            dest.copy_(crop)
        elif n:  # channels_last NCHW views: torch's vectorised uint8 resize, written in place
            torch.ops.aten.upsample_bilinear2d.out(crop.permute(0, 3, 1, 2), [h, h], False, None, None,
                                                   out=dest.permute(0, 3, 1, 2))
        start += n
    return out, by_key


def _pad_columns(x: torch.Tensor, p: int) -> torch.Tensor:
    """NHWC images with p <= w columns mirrored left and right (the edge column repeats, as grid_sample reflects)."""
    if not p:
        return x
    out = x.new_empty(*x.shape[:2], x.shape[2] + 2 * p, x.shape[3])
    out[:, :, p:-p] = x
    out[:, :, :p] = x[:, :, :p].flip(2)
    out[:, :, -p:] = x[:, :, -p:].flip(2)
    return out
