"""PatchBatches: coverage, reproducible order, drop_last, both paths agree, memmap input, read-ahead, early exit."""

import threading
import time

import numpy as np
import pytest
import torch

from study.pcam import data as pcam, writer as pcam_writer
from study.data.batches import PatchBatches


def indexed(n: int):
    """Patches whose first pixel encodes their row, labels equal to the row (float32 holds them exactly)."""
    x = np.zeros((n, 96, 96, 3), np.uint8)
    rows = np.arange(n)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = rows % 256, rows // 256
    return x, rows.astype(np.float32)


def rows_of(xb: torch.Tensor) -> torch.Tensor:
    return xb[:, 0, 0, 0].long() + 256 * xb[:, 0, 0, 1].long()


def collect(batches: PatchBatches, seed: int | None = 0):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return list(batches.epoch(g))


@pytest.mark.parametrize("on_device", [False, True])
def test_every_patch_once_per_epoch_with_labels_aligned(on_device):
    x, y = indexed(300)
    batches = PatchBatches(x, y, 32, "cpu", on_device=on_device)
    out = collect(batches)
    assert len(out) == len(batches) == 10
    for xb, yb in out:
        assert xb.dtype == torch.uint8 and xb.shape[1:] == (96, 96, 3)
        assert yb.dtype == torch.float32
        assert torch.equal(rows_of(xb).float(), yb)
    seen = torch.cat([yb for _, yb in out])
    assert torch.equal(seen.sort().values, torch.arange(300, dtype=torch.float32))
    assert not torch.equal(seen, seen.sort().values)  # shuffled


def test_same_seed_same_order_other_seed_differs():
    x, y = indexed(100)
    batches = PatchBatches(x, y, 16, "cpu")
    order = lambda seed: torch.cat([yb for _, yb in collect(batches, seed)])
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))


def test_no_shuffle_is_sequential():
    x, y = indexed(50)
    seen = torch.cat([yb for _, yb in collect(PatchBatches(x, y, 8, "cpu", shuffle=False), None)])
    assert torch.equal(seen, torch.arange(50, dtype=torch.float32))


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_drop_last(drop_last, sizes):
    x, y = indexed(10)
    batches = PatchBatches(x, y, 4, "cpu", drop_last=drop_last)
    out = collect(batches)
    assert [len(yb) for _, yb in out] == sizes and len(batches) == len(sizes)
    assert len(set(torch.cat([yb for _, yb in out]).tolist())) == sum(sizes)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_host_and_device_paths_give_identical_batches(prefetch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 96, 96, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 70).astype(np.uint8)
    host = collect(PatchBatches(x, y, 16, "cpu", on_device=False, prefetch=prefetch), 9)
    device = collect(PatchBatches(x, y, 16, "cpu", on_device=True), 9)
    assert len(host) == len(device) == 5
    for (hx, hy), (dx, dy) in zip(host, device):
        assert torch.equal(hx, dx) and torch.equal(hy, dy)


def test_reads_a_memmapped_split(tmp_path):
    x, y = indexed(40)
    pcam_writer.write_split(tmp_path, "train", x, y % 2)
    mx, my = pcam.load_split(tmp_path / pcam.file_name("train", "x"), tmp_path / pcam.file_name("train", "y"))
    assert isinstance(mx, np.memmap)
    out = collect(PatchBatches(mx, my, 16, "cpu"))
    rows = torch.cat([rows_of(xb) for xb, _ in out])
    assert torch.equal(rows.sort().values, torch.arange(40))
    assert torch.equal(torch.cat([yb for _, yb in out]), (rows % 2).float())


def test_unlabelled_split_yields_none():
    x, _ = indexed(12)
    for on_device in (False, True):
        out = collect(PatchBatches(x, None, 5, "cpu", on_device=on_device))
        assert all(yb is None for _, yb in out) and sum(len(xb) for xb, _ in out) == 12


def test_stopping_early_ends_the_reader_thread():
    x, y = indexed(200)
    batches = PatchBatches(x, y, 4, "cpu", on_device=False, prefetch=2)
    stream = batches.epoch(torch.Generator().manual_seed(0))
    next(stream)
    stream.close()
    assert not any(t.name == "pcam-prefetch" for t in threading.enumerate())


def test_reader_thread_reads_ahead_while_the_consumer_works():
    class Counted(np.ndarray):
        reads = 0

        def take(self, *args, **kwargs):
            Counted.reads += 1
            return super().take(*args, **kwargs)

    x, y = indexed(64)
    stream = PatchBatches(x.view(Counted), y, 8, "cpu", on_device=False, prefetch=2).epoch()
    next(stream)
    deadline = time.monotonic() + 5
    while Counted.reads < 3 and time.monotonic() < deadline:  # the batch handed out + 2 queued behind it
        time.sleep(0.01)
    assert Counted.reads >= 3
    stream.close()


def test_read_error_reaches_the_consumer():
    class Broken(np.ndarray):
        def take(self, *args, **kwargs):
            raise OSError("disk went away")

    x, y = indexed(20)
    with pytest.raises(OSError, match="disk went away"):
        collect(PatchBatches(x.view(Broken), y, 4, "cpu", on_device=False))


def test_cpu_defaults_to_host_path():
    x, y = indexed(8)
    assert PatchBatches(x, y, 4, "cpu").on_device is False
    with pytest.raises(ValueError, match="labels"):
        PatchBatches(x, y[:3], 4, "cpu")
