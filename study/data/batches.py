"""Shuffled batches on the training device, from arrays that may be memory maps of multi-GB files.

With on_device (the trial decides it against its memory budget: study.engine.memory.plan_uploads) the split is
uploaded once and every batch is an index into a permutation on the device. Otherwise each batch is one bulk
read of its sorted indices from the memory map (sorted so the read walks the file forwards), into pinned memory,
copied asynchronously, with a background thread reading the next batches while the model computes. Both paths
deliver the same batches for a generator.
"""

import math
import queue
import threading
from typing import Iterator

import numpy as np
import torch

UPLOAD_ROWS = 8192  # patches per host-to-device copy when uploading a split (8192 * 27 KiB = 226 MiB)


class PatchBatches:
    """Batches of (uint8 (B, 96, 96, 3), float32 (B,)) on `device`; y may be None (unlabelled), giving None."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, batch_size: int, device, *, shuffle: bool = True,
                 drop_last: bool = False, prefetch: int = 2, on_device: bool = False):
        if y is not None and len(y) != len(x):
            raise ValueError(f"{len(x)} patches but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.batch_size, self.device = x, batch_size, torch.device(device)
        self.shuffle, self.drop_last, self.prefetch = shuffle, drop_last, prefetch
        self.y = None if y is None else np.asarray(y, dtype=np.float32).reshape(-1)
        self.on_device = on_device
        self.pin = self.device.type == "cuda"
        self._x_dev = self._y_dev = None

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _upload(self) -> None:
        """The whole split onto the device, once, in slices so no second full copy is made on the host."""
        if self.device.type == "cpu":
            self._x_dev = torch.from_numpy(np.array(self.x))
        else:
            self._x_dev = torch.empty(self.x.shape, dtype=torch.uint8, device=self.device)
            for start in range(0, len(self.x), UPLOAD_ROWS):
                part = torch.from_numpy(np.ascontiguousarray(self.x[start:start + UPLOAD_ROWS]))
                self._x_dev[start:start + len(part)].copy_(part)
        if self.y is not None:
            self._y_dev = torch.from_numpy(self.y).to(self.device)

    def order(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """This epoch's batches as index tensors (CPU): a permutation drawn from generator, each batch sorted."""
        n = len(self.x)
        perm = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        full = n // self.batch_size * self.batch_size
        # Order inside a batch does not matter to a gradient; sorted, a host read walks the file forwards.
        batches = list(perm[:full].view(-1, self.batch_size).sort(dim=1).values.unbind(0))
        if full < n and not self.drop_last:
            batches.append(perm[full:].sort().values)
        return batches

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass over the split in the order drawn from generator (a CPU torch.Generator)."""
        batches = self.order(generator)
        if self.on_device:
            return self._device_epoch(batches)
        return self._host_epoch(batches)

    def _device_epoch(self, batches):
        if self._x_dev is None:
            self._upload()
        if not batches:
            return
        sizes = [len(b) for b in batches]
        for index in torch.cat(batches).to(self.device).split(sizes):
            yield self._x_dev[index], None if self._y_dev is None else self._y_dev[index]

    def _read(self, index: torch.Tensor):
        """One batch read from the (memory-mapped) arrays in one fancy-index call, pinned when on CUDA."""
        rows = index.numpy()
        x = torch.empty((len(rows), *self.x.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        # mode="clip" lets take write straight into `out` (mode="raise" buffers a copy); rows are always valid.
        np.take(self.x, rows, axis=0, out=x.numpy(), mode="clip")
        y = None
        if self.y is not None:
            y = torch.empty(len(rows), dtype=torch.float32, pin_memory=self.pin)
            np.take(self.y, rows, out=y.numpy(), mode="clip")
        return x, y

    def _host_epoch(self, batches):
        to_device = lambda t: None if t is None else t.to(self.device, non_blocking=self.pin)
        if self.prefetch < 1:
            for index in batches:
                x, y = self._read(index)
                yield to_device(x), to_device(y)
            return
        ready, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def produce():
            try:
                for index in batches:
                    item = self._read(index)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # re-raised in the consumer, so a read error is not swallowed
                ready.put(err)
            ready.put(None)

        reader = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                yield to_device(x), to_device(y)
        finally:
            # The consumer may stop early (break, exception): let the reader finish instead of blocking forever.
            stop.set()
            while reader.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            reader.join()
