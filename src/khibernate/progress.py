"""How every long operation reports, in both kernels: one :class:`Reporter` with three styles.

- ``line``: a plain line per message, and a progress line every few seconds — the capture kernel's console (read
  on a serial port or in a VM's log) and a first-kernel command whose stderr is not a terminal;
- ``bar``: messages as lines and a progress bar redrawn in place (rate, ETA) — a terminal;
- ``json``: one JSON object per line, ``{"message": ...}`` or ``{"progress": LABEL, "done": N, "total": N,
  "mb_s": R}`` — for a program reading stderr.

Callers say what happens (``say``) and count the bytes of a long step through a :class:`Meter`
(``with rep.meter("save", total) as m: ... m.update(n)``); the style decides what the user sees.  Meters are
silent for steps shorter than a second.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

Style = Literal["line", "bar", "json"]
Say = Callable[[str], None]


class Reporter:
    """Messages and progress of one operation on ``stream`` (stderr): ``prefix: message`` lines (no prefix when
    empty).  ``style`` None: a bar on a terminal, lines elsewhere."""

    def __init__(self, prefix: str = "", style: Style | None = None, stream: TextIO | None = None,
                 interval: float = 2.0, meters: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.style: Style = style or ("bar" if self.stream.isatty() else "line")
        self.interval = interval  # seconds between progress lines (line and json styles)
        self.meters = meters  # False: meters count silently (messages are still said)

    @classmethod
    def for_terminal(cls, prefix: str = "", as_json: bool = False) -> Reporter:
        """A first-kernel command's reporter: a bar on a terminal, JSON lines with ``as_json``, and otherwise
        messages only (a command's output read by a program or a log stays free of progress lines)."""
        if as_json:
            return cls(prefix, "json")
        tty = sys.stderr.isatty()
        return cls(prefix, "bar" if tty else "line", meters=tty)

    def say(self, msg: str) -> None:
        """One message."""
        if self.style == "json":
            line = {"message": msg, **({"from": self.prefix} if self.prefix else {})}
            self._write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            self._write(f"{self.prefix}: {msg}\n" if self.prefix else f"{msg}\n")

    def meter(self, label: str, total: int = 0, detail: Callable[[], str] | None = None) -> Meter:
        """A meter for one step of ``total`` bytes (0: unknown); ``detail`` adds to each line (e.g. bytes written)."""
        return Meter(self, label, total, detail)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class Meter:
    """Counts the bytes of one step (``update``) and shows them in its reporter's style; ``close`` ends it."""

    def __init__(self, rep: Reporter, label: str, total: int, detail: Callable[[], str] | None):
        self.rep, self.label, self.total, self.detail = rep, label, total, detail
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self._last_done = 0
        self.shown = False

    def update(self, n: int) -> None:
        """Account ``n`` more bytes; redraws at most 10 times a second (bar) or every ``interval`` (line, json),
        after the first second."""
        self.done += n
        now = time.monotonic()
        every = 0.1 if self.rep.style == "bar" else self.rep.interval
        if not self.rep.meters or now - self.t0 < 1.0 or now - self.last < every:
            return
        rate = (self.done - self._last_done) / (now - self.last)
        self._show(now, rate)
        self.last, self._last_done, self.shown = now, self.done, True

    def _show(self, now: float, rate: float) -> None:
        if self.rep.style == "json":
            self.rep._write(json.dumps({"progress": self.label, "done": self.done, "total": self.total,
                                        "mb_s": round(rate / 1e6, 1)}) + "\n")
            return
        extra = f", {self.detail()}" if self.detail else ""
        if self.rep.style == "line":  # "812 MiB of memory read, 240 MiB written (95 MB/s)"
            of = f" (of {self.total >> 20} MiB)" if self.total else ""
            self.rep.say(f"{self.done >> 20} MiB of {self.label}{of}{extra} ({rate / 1e6:.0f} MB/s)")
            return
        avg = self.done / (now - self.t0)
        pct = min(100.0, 100.0 * self.done / self.total) if self.total else 0.0
        eta = (self.total - self.done) / avg if self.total and avg else 0
        lead = f"{self.rep.prefix}: " if self.rep.prefix else ""
        self.rep._write(f"\r{lead}{self.label}: {pct:5.1f}%  {avg / 1e6:7.1f} MB/s  eta {eta:4.0f}s{extra} ")

    def close(self) -> None:
        """End the step: the bar's last state and a newline, if one was drawn."""
        if self.shown and self.rep.style == "bar":
            dt = time.monotonic() - self.t0
            lead = f"{self.rep.prefix}: " if self.rep.prefix else ""
            self.rep._write(f"\r{lead}{self.label}: 100.0%  {self.done / max(dt, 1e-9) / 1e6:7.1f} MB/s  {dt:.1f}s\n")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
