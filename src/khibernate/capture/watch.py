"""`khibernate watch`: follow the kernel log and take an analysis snapshot when the kernel reports trouble.

The pure parts, tested with real kernel log lines: ``parse_kmsg`` (one /dev/kmsg record), ``classify`` (which
line starts which kind of report), ``ReportCollector`` (the records of one report, complete at its
``---[ end trace`` line or after a quiet second), ``RateLimiter`` (--min-interval, --max) and ``panic_policy``
(the kinds this kernel turns into panics: those never reach user space, kdump's job).  The edge is ``follow_kmsg``
(reads /dev/kmsg) and ``Watcher.run`` (the loop: collect -> decide -> capture -> write the event record).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import select
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from khibernate.capture.analysis import dated_folder
from khibernate.capture.errors import WatchError as WatchError
from khibernate.errors import KhibernateError
from khibernate.lock import capture_lock as capture_lock
from khibernate.lock import capture_lock_holder

KINDS = ("oops", "warn", "bug", "hung-task", "softlockup")

# kind -> the sysctl (in /proc/sys/kernel) that turns it into a panic
PANIC_SYSCTLS = {"oops": "panic_on_oops", "bug": "panic_on_oops", "warn": "panic_on_warn",
                 "softlockup": "softlockup_panic", "hung-task": "hung_task_panic"}

_DIE_HEADER = re.compile(r"(?:^|: )[0-9a-f]{4} \[#\d+\](?: |$)")  # x86 __die_header: "Oops: 0002 [#1] SMP ..."
_OOPS_HEADS = re.compile(r"^(?:BUG: unable to handle |BUG: kernel NULL pointer dereference|Oops: |"
                         r"general protection fault)")
_SOFTLOCKUP = re.compile(r"^(?:watchdog: )?BUG: soft lockup - CPU#\d+ stuck for ")
_HUNG_TASK = re.compile(r"^INFO: task .+:\d+ blocked for more than \d+ seconds\.")
_BUG = re.compile(r"^(?:kernel BUG at .+!|BUG: )")
_WARN = re.compile(r"^WARNING: ")
_END_TRACE = re.compile(r"^---\[ end (?:trace|Kernel panic)")
_CUT_HERE = "------------[ cut here ]------------"


@dataclasses.dataclass(frozen=True)
class Record:
    """One kernel log record as /dev/kmsg gives it: syslog level, sequence number, timestamp (µs), text."""

    level: int
    seq: int
    ts_us: int
    text: str

    def line(self) -> str:
        """The record as dmesg prints it."""
        return f"[{self.ts_us // 1_000_000:5d}.{self.ts_us % 1_000_000:06d}] {self.text}"


def parse_kmsg(raw: str) -> Record | None:
    """A /dev/kmsg record ("prio,seq,ts_us,flags[,...];text" + " KEY=value" lines), or None when malformed.

    Escapes (``\\x0a``) in the text are undone; the dictionary lines (SUBSYSTEM=, DEVICE=) are dropped.
    """
    head, sep, rest = raw.partition(";")
    if not sep:
        return None
    fields = head.split(",")
    try:
        prio, seq, ts = int(fields[0]), int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None
    text = rest.split("\n", 1)[0]
    text = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
    return Record(prio & 7, seq, ts, text)


def classify(text: str) -> str | None:
    """The kind of report a log line starts (one of KINDS), or None when it starts none."""
    if _SOFTLOCKUP.match(text):
        return "softlockup"
    if _HUNG_TASK.match(text):
        return "hung-task"
    if _OOPS_HEADS.match(text) or _DIE_HEADER.search(text):
        return "oops"
    if _BUG.match(text):
        return "bug"
    if _WARN.match(text):
        return "warn"
    return None


@dataclasses.dataclass
class Event:
    """One report: its kind, the line that started it, and every record up to its end."""

    kind: str
    head: Record
    records: list[Record]
    complete: bool = False  # its end-of-trace line was seen (else it ended by quiet time)

    def text(self) -> str:
        """The report as dmesg prints it."""
        return "\n".join(r.line() for r in self.records)

    def to_json(self) -> dict[str, Any]:
        """The event record stored beside the capture."""
        return {"kind": self.kind, "trigger": self.head.text, "seq": self.head.seq, "ts_us": self.head.ts_us,
                "ended_by": "end trace" if self.complete else "quiet", "records": [r.line() for r in self.records]}


def _continues(open_kind: str, open_records: list[Record], kind: str) -> bool:
    """Whether a new head line of ``kind`` belongs to the open report (BUG() and page faults die: one Oops)."""
    if kind != "oops":
        return False
    if open_kind == "oops":
        return not any(_DIE_HEADER.search(r.text) for r in open_records)  # "BUG: unable to handle" -> "Oops: ..."
    return open_kind == "bug" and any(r.text.startswith("kernel BUG at ") for r in open_records)


class ReportCollector:
    """Groups records into reports: a report opens at a classified head line and closes at its end-of-trace line,
    when the next report starts, after ``quiet`` seconds without records, or ``longest`` seconds after it opened."""

    def __init__(self, quiet: float = 1.0, longest: float = 10.0):
        self.quiet, self.longest = quiet, longest
        self._open: Event | None = None
        self._opened = self._last = 0.0
        self._before: Record | None = None  # the record before a head ("cut here" belongs to the report)

    def feed(self, rec: Record, now: float) -> list[Event]:
        """Take one record; returns the reports it completed (oldest first)."""
        done = self.tick(now)
        kind = classify(rec.text)
        if self._open is not None:
            if kind is not None and not _continues(self._open.kind, self._open.records, kind):
                cut = self._open.records.pop() if self._open.records[-1].text == _CUT_HERE else None
                done.append(self._close(False))
                self._before = cut  # "cut here" opens the next report, not the end of this one
            else:
                self._open.records.append(rec)
                self._last = now
                if _END_TRACE.match(rec.text):
                    done.append(self._close(True))
                return done
        if kind is not None:
            records = [self._before, rec] if self._before and self._before.text == _CUT_HERE else [rec]
            self._open, self._opened, self._last = Event(kind, rec, records), now, now
        self._before = rec
        return done

    def tick(self, now: float) -> list[Event]:
        """The open report, if it is complete by time alone."""
        if self._open is not None and (now - self._last >= self.quiet or now - self._opened >= self.longest):
            return [self._close(False)]
        return []

    def pending(self) -> bool:
        """Whether a report is open (the loop then wakes up in time to close it)."""
        return self._open is not None

    def _close(self, complete: bool) -> Event:
        assert self._open is not None
        ev, self._open, self._before = self._open, None, None
        ev.complete = complete
        return ev


@dataclasses.dataclass
class RateLimiter:
    """At most one capture per ``min_interval`` seconds (counted from the end of the last one), ``max_captures``
    in all (None: no limit)."""

    min_interval: float
    max_captures: int | None
    captures: int = 0
    last_end: float | None = None

    def decide(self, now: float) -> str | None:
        """None to capture now, else why not."""
        if self.exhausted():
            return f"--max {self.max_captures} captures reached"
        if self.last_end is not None and now - self.last_end < self.min_interval:
            return (f"rate limit: {now - self.last_end:.1f} s since the last capture, "
                    f"--min-interval {self.min_interval:g} s")
        return None

    def taken(self, end: float) -> None:
        """A capture was attempted and ended at ``end`` (failed ones count: a failing capture must not loop)."""
        self.captures += 1
        self.last_end = end

    def exhausted(self) -> bool:
        """Whether --max is reached."""
        return self.max_captures is not None and self.captures >= self.max_captures


def parse_kinds(spec: str) -> tuple[str, ...]:
    """``oops,warn,...`` -> the kinds, in KINDS order; WatchError naming an unknown one."""
    asked = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in asked if w not in KINDS]
    if bad or not asked:
        raise WatchError(f"unknown event kind(s) {', '.join(bad) or '(none given)'}: use any of {','.join(KINDS)}")
    return tuple(k for k in KINDS if k in asked)


def panic_policy(read_int: Callable[[str], int | None]) -> dict[str, str]:
    """kind -> the sysctl that turns it into a panic here (those events never reach user space)."""
    out = {}
    for kind, name in PANIC_SYSCTLS.items():
        if read_int(f"/proc/sys/kernel/{name}"):
            out[kind] = f"kernel.{name}=1"
    return out


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """What the watcher claims, what it leaves to kdump, and what it says at start."""

    claimed: tuple[str, ...]
    panics: dict[str, str]
    kdump_loaded: bool

    def describe(self) -> list[str]:
        """The start-up lines."""
        lines = [f"watch: capturing on {','.join(self.claimed)}" if self.claimed else "watch: nothing to capture"]
        for kind, why in self.panics.items():
            lines.append(f"watch: {kind} events panic this kernel ({why}): they never reach user space and are not "
                         f"claimed; kdump captures panics (kdump capture kernel "
                         f"{'loaded' if self.kdump_loaded else 'NOT loaded: `khibernate kdump load`'})")
        if "hung-task" in self.claimed:
            lines.append("watch: hung-task: a capture freezes user space before the jump, and a user task stuck in "
                         "D state (what the detector reports) cannot be frozen: while it stays stuck the capture "
                         "fails safely (freezer EBUSY after 20 s: nothing is written, the slot is marked bad, the "
                         "kernel runs on); the freezer waits for user tasks only, so a hung kernel thread does "
                         "not block it")
        if "softlockup" in self.claimed:
            lines.append("watch: softlockup: a CPU spinning in the kernel cannot be frozen either, so a capture is "
                         "refused the same way while the lockup lasts; on one CPU the watcher itself cannot run "
                         "until it ends")
        return lines


def plan_start(kinds: Iterable[str], panics: dict[str, str], kdump_loaded: bool) -> StartPlan:
    """The kinds asked for minus those that panic here; WatchError when none is left."""
    asked = tuple(kinds)
    plan = StartPlan(tuple(k for k in asked if k not in panics), {k: v for k, v in panics.items() if k in asked},
                     kdump_loaded)
    if not plan.claimed:
        raise WatchError("every event kind asked for panics this kernel ("
                         + ", ".join(sorted(set(plan.panics.values()))) + "): nothing for `watch` to capture; "
                         "set those sysctls to 0 or leave these events to kdump")
    return plan


# ---- the edge: /dev/kmsg, the capture lock, the loop

def follow_kmsg(path: str = "/dev/kmsg", from_start: bool = False,
                poll: float = 0.25) -> Iterator[tuple[Record | None, float]]:
    """(record or None on a quiet ``poll``, monotonic time) forever; only records logged after the start unless
    ``from_start``.  Records overwritten before they were read (EPIPE) are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise WatchError(f"cannot open {path}: {e.strerror} (needs root or CAP_SYSLOG)") from None
    try:
        if not from_start:
            os.lseek(fd, 0, os.SEEK_END)
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                select.select([fd], [], [], poll)
                yield None, time.monotonic()
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    continue
                raise
            rec = parse_kmsg(raw.decode("utf-8", "replace"))
            if rec is not None:
                yield rec, time.monotonic()
    finally:
        os.close(fd)


@dataclasses.dataclass
class Watcher:
    """The loop: follow the log, collect reports, capture claimed ones within the limits, record each."""

    plan: StartPlan
    limiter: RateLimiter
    capture: Callable[[Event], dict[str, Any]]  # takes the snapshot; returns its report (raises on failure)
    out_dir: Path
    run_dir: Path
    say: Callable[[str], None] = print
    busy: Callable[[], str | None] = lambda: None  # why a capture cannot run now (e.g. a kexec image is loaded)
    export: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None  # vmcore + dmesg.txt into the folder

    def handle(self, ev: Event, now: float) -> dict[str, Any] | None:
        """One completed report: capture it or say why not; returns the event record written (None if skipped)."""
        if ev.kind not in self.plan.claimed:
            return None
        why = self.limiter.decide(now) or self.busy()
        if why:
            self.say(f"watch: {ev.kind} not captured ({why}): {ev.head.text}")
            return None
        with capture_lock(self.run_dir) as got:
            if not got:
                self.say(f"watch: {ev.kind} not captured (another capture is running: "
                         f"{capture_lock_holder(self.run_dir)}): {ev.head.text}")
                return None
            self.say(f"watch: {ev.kind}: {ev.head.text} -> capture {self.limiter.captures + 1}"
                     + (f" of {self.limiter.max_captures}" if self.limiter.max_captures else ""))
            t0 = time.time()
            record: dict[str, Any] = {"event": ev.to_json(), "captured_at": t0}
            try:
                record["snapshot"] = self.capture(ev)
                record["ok"] = True
            except KhibernateError as e:
                record.update(ok=False, error=str(e))
                self.say(f"watch: capture failed: {e}")
            finally:
                self.limiter.taken(time.monotonic())
        folder = dated_folder(self.out_dir, t0, ev.kind)
        folder.mkdir(parents=True)
        if record["ok"] and self.export is not None:
            try:
                record["export"] = self.export(record["snapshot"], folder)
            except (KhibernateError, OSError) as e:
                record["export"] = {"error": str(e)}
                self.say(f"watch: export to {folder} failed: {e}")
            except Exception as e:  # noqa: BLE001 - a bug in the export must not stop the watcher; the image is kept
                record["export"] = {"error": f"{type(e).__name__}: {e}", "bug": True}
                self.say(f"watch: export to {folder} failed on a bug (please report it with this trace; the image "
                         f"stays in slot {record['snapshot'].get('slot')}, 'khibernate target export' retries it):\n"
                         + traceback.format_exc())
        (folder / "event.json").write_text(json.dumps(record, indent=1) + "\n")
        snap = record.get("snapshot") or {}
        self.say(f"watch: {ev.kind} recorded in {folder}/event.json"
                 + (f"; image {snap['image']} in slot {snap['slot']} of {snap['target']}, paused "
                    f"{snap['pause_seconds']:.2f} s, {snap['bytes'] / 1e6:.1f} MB at -d {snap['dump_level']}"
                    if record["ok"] else ""))
        return record

    def run(self, records: Iterable[tuple[Record | None, float]], collector: ReportCollector) -> int:
        """Loop until --max captures were taken (or the records end); returns the number of captures."""
        for rec, now in records:
            done = collector.feed(rec, now) if rec is not None else collector.tick(now)
            for ev in done:
                self.handle(ev, time.monotonic())
            if self.limiter.exhausted():
                self.say(f"watch: --max {self.limiter.max_captures} captures taken; stopping")
                break
        return self.limiter.captures
