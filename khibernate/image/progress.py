"""A progress line with rate and ETA on stderr, shown only on a tty and only for steps longer than a second."""

from __future__ import annotations

import sys
import time


class Progress:
    """Call ``update(nbytes)``; ``close()`` ends the line.  Silent when stderr is not a tty or ``enabled`` is False."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def update(self, n: int) -> None:
        """Account ``n`` more bytes and redraw at most 10 times a second, after the first second."""
        self.done += n
        now = time.monotonic()
        if not self.enabled or now - self.t0 < 1.0 or now - self.last < 0.1:
            return
        self.last = now
        rate = self.done / (now - self.t0)
        eta = (self.total - self.done) / rate if rate else 0
        pct = min(100.0, 100.0 * self.done / self.total)
        sys.stderr.write(f"\r{self.label}: {pct:5.1f}%  {rate / 1e6:7.1f} MB/s  eta {eta:4.0f}s ")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        """Finish the line if one was drawn."""
        if self.shown:
            dt = time.monotonic() - self.t0
            sys.stderr.write(f"\r{self.label}: 100.0%  {self.done / max(dt, 1e-9) / 1e6:7.1f} MB/s  {dt:.1f}s\n")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
