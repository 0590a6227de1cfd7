"""Progress of long data preparation (converting and decompressing a data set's files, downloads).

    with Progress("converting Kaggle train patches", total=220_025, unit="patches") as bar:
        bar.update(1024)

On a terminal it is a tqdm bar. In a log (stderr not a TTY: a Ray job, nohup, CI) a bar's carriage returns make
one endless line, so it writes a line every LOG_EVERY_S seconds instead, as the study console does: what is being
done, how far, the time left at the rate so far; and one line at the end.
"""

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between progress lines in a log


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """A bar on a terminal, a line every `every_s` seconds otherwise; `clock` is injectable for tests."""

    def __init__(self, what: str, total: int, unit: str, *, stream=None, every_s: float = LOG_EVERY_S,
                 clock=time.monotonic):
        self.what, self.total, self.unit = what, max(int(total), 0), unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.started = self._last = clock()
        live = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=self.total, desc=what, unit=unit, unit_scale=True, file=self.stream) if live else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def advance_to(self, done: int) -> None:
        """Set the count reached (e.g. the compressed bytes read so far)."""
        self.update(done - self.done)

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        share = self.done / self.total if self.total else 0.0
        left = f", about {_duration(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
        print(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * share:.0f} %), "
              f"{_duration(elapsed)} so far{left}", file=self.stream, flush=True)

    def close(self, finished: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        elif finished:
            print(f"{self.what}: {self.done:,} {self.unit} in {_duration(self.clock() - self.started)}",
                  file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self.close(finished=kind is None)
