"""`khibernate watch`'s pure parts over kernel log records as /dev/kmsg gives them, and the loop with a fake capture.

tests/capture/kmsg/{warning,exception,bug}.txt were read from /dev/kmsg of the 6.12.118 test kernel in QEMU while
LKDTM provoked WARNING, EXCEPTION and BUG (one read(2) per line); the hung-task and soft-lockup lines are written
after the kernel's format strings (kernel/hung_task.c, kernel/watchdog.c), not recorded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from khibernate.capture import watch
from khibernate.capture.watch import (
    Event,
    RateLimiter,
    Record,
    ReportCollector,
    WatchError,
    classify,
    panic_policy,
    parse_kinds,
    parse_kmsg,
    plan_start,
)
from khibernate.errors import KhibernateError

KMSG = Path(__file__).parent / "kmsg"


def records(name: str) -> list[Record]:
    """The /dev/kmsg records of one saved file (one record per line, as read(2) returns them)."""
    out = []
    for raw in (KMSG / name).read_text().splitlines():
        if raw and not raw.startswith(" "):
            rec = parse_kmsg(raw)
            assert rec is not None, raw
            out.append(rec)
    return out


def collect(recs: list[Record], step: float = 0.01, quiet: float = 1.0) -> list[Event]:
    c = ReportCollector(quiet=quiet)
    out: list[Event] = []
    t = 0.0
    for r in recs:
        t += step
        out += c.feed(r, t)
    out += c.tick(t + quiet)
    return out


def test_parse_kmsg_record_with_escapes_and_dictionary() -> None:
    r = parse_kmsg("4,812,93456789,-,caller=T176;WARNING: CPU: 0 PID: 176 at x.c:1 f+0x1/0x2\\x0a\n"
                   " SUBSYSTEM=misc\n DEVICE=+misc:lkdtm\n")
    assert r == Record(4, 812, 93456789, "WARNING: CPU: 0 PID: 176 at x.c:1 f+0x1/0x2\n")
    assert r.line() == "[   93.456789] WARNING: CPU: 0 PID: 176 at x.c:1 f+0x1/0x2\n"
    assert parse_kmsg("no semicolon here") is None
    assert parse_kmsg("x,1,2,-;text") is None


@pytest.mark.parametrize("text,kind", [
    ("WARNING: CPU: 0 PID: 176 at drivers/misc/lkdtm/bugs.c:119 lkdtm_WARNING+0x10/0x20", "warn"),
    ("WARNING: possible circular locking dependency detected", "warn"),
    ("kernel BUG at drivers/misc/lkdtm/bugs.c:99!", "bug"),
    ("BUG: scheduling while atomic: sh/176/0x00000002", "bug"),
    ("BUG: kernel NULL pointer dereference, address: 0000000000000000", "oops"),
    ("BUG: unable to handle page fault for address: ffffffffffffffff", "oops"),
    ("Oops: 0002 [#1] SMP NOPTI", "oops"),
    ("Oops: invalid opcode: 0000 [#1] SMP NOPTI", "oops"),
    ("invalid opcode: 0000 [#1] SMP", "oops"),
    ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:180]", "softlockup"),
    ("BUG: soft lockup - CPU#1 stuck for 23s! [kworker/1:1:40]", "softlockup"),
    ("INFO: task sh:181 blocked for more than 10 seconds.", "hung-task"),
    ("lkdtm: Performing direct entry WARNING", None),
    ("Call Trace:", None),
    ("khibernate: back in this kernel (pid 300), away 31.20 s CLOCK_BOOTTIME", None),
    ("---[ end trace 0000000000000000 ]---", None),
])
def test_classify(text: str, kind: str | None) -> None:
    assert classify(text) == kind


def test_lkdtm_warning_is_one_report_up_to_its_end_trace() -> None:
    evs = collect(records("warning.txt"))
    assert [e.kind for e in evs] == ["warn"]
    ev = evs[0]
    assert ev.complete and ev.head.text.startswith("WARNING: CPU: ")
    assert ev.records[0].text == "------------[ cut here ]------------"
    assert ev.records[-1].text.startswith("---[ end trace")
    assert any("lkdtm_WARNING" in r.text for r in ev.records)
    assert "Call Trace:" in ev.text()


def test_lkdtm_exception_is_one_oops_not_a_bug_and_an_oops() -> None:
    evs = collect(records("exception.txt"))
    assert [e.kind for e in evs] == ["oops"]
    assert evs[0].head.text.startswith("BUG: kernel NULL pointer dereference")
    assert any(watch._DIE_HEADER.search(r.text) for r in evs[0].records)


def test_lkdtm_bug_is_one_bug_report_with_its_oops() -> None:
    evs = collect(records("bug.txt"))
    assert [e.kind for e in evs] == ["bug"]
    assert evs[0].head.text.startswith("kernel BUG at ")
    assert any(watch._DIE_HEADER.search(r.text) for r in evs[0].records)


def test_burst_of_warnings_is_one_report_each() -> None:
    recs = records("warning.txt")
    evs = collect(recs * 10)
    assert [e.kind for e in evs] == ["warn"] * 10
    assert all(e.complete for e in evs)


def test_report_without_end_trace_closes_when_quiet_or_too_long() -> None:
    hung = [Record(3, 1, 10, "INFO: task sh:181 blocked for more than 10 seconds."),
            Record(3, 2, 11, "      Not tainted 6.12.118 #1"),
            Record(6, 3, 12, "task:sh              state:D stack:0     pid:181   tgid:181   ppid:1")]
    c = ReportCollector(quiet=1.0, longest=10.0)
    assert c.feed(hung[0], 0.0) == [] and c.feed(hung[1], 0.2) == [] and c.feed(hung[2], 0.4) == []
    assert c.pending() and c.tick(1.3) == []
    (ev,) = c.tick(1.5)
    assert ev.kind == "hung-task" and len(ev.records) == 3 and not ev.complete
    c.feed(hung[0], 20.0)
    for i in range(1, 20):  # a report that never goes quiet still closes after `longest`
        done = c.feed(hung[2], 20.0 + i * 0.6)
        if done:
            break
    assert done and 20.0 + i * 0.6 - 20.0 >= 10.0


def test_rate_limiter_min_interval_from_the_end_of_a_capture_and_max() -> None:
    rl = RateLimiter(min_interval=30, max_captures=2)
    assert rl.decide(0.0) is None
    rl.taken(40.0)  # the capture ended at 40 s
    assert "rate limit" in (rl.decide(69.0) or "")
    assert rl.decide(70.0) is None
    rl.taken(100.0)
    assert rl.exhausted() and "--max 2" in (rl.decide(1000.0) or "")
    assert RateLimiter(0, None).decide(0.0) is None


def test_kinds_and_panic_policy() -> None:
    assert parse_kinds("warn,oops") == ("oops", "warn")
    with pytest.raises(WatchError, match="unknown event kind.*panic"):
        parse_kinds("oops,panic")
    sysctl = {"/proc/sys/kernel/panic_on_warn": 1, "/proc/sys/kernel/panic_on_oops": 0}
    panics = panic_policy(sysctl.get)
    assert panics == {"warn": "kernel.panic_on_warn=1"}
    plan = plan_start(("oops", "warn"), panics, kdump_loaded=False)
    assert plan.claimed == ("oops",)
    text = "\n".join(plan.describe())
    assert "warn events panic this kernel (kernel.panic_on_warn=1)" in text and "not claimed" in text
    assert "kdump capture kernel NOT loaded" in text
    with pytest.raises(WatchError, match="nothing for `watch` to capture"):
        plan_start(("warn",), panics, kdump_loaded=True)


def test_capture_lock_is_exclusive(tmp_path: Path) -> None:
    with watch.capture_lock(tmp_path) as a:
        assert a
        with watch.capture_lock(tmp_path) as b:
            assert not b
    with watch.capture_lock(tmp_path) as c:
        assert c


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watcher_captures_once_per_interval_records_the_trigger_and_stops_at_max(tmp_path: Path,
                                                                                monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(watch.time, "monotonic", clock)
    taken: list[Event] = []

    def capture(ev: Event) -> dict:
        taken.append(ev)
        clock.t += 30  # the capture takes 30 s
        return {"image": f"img-{len(taken)}", "slot": len(taken) % 2, "target": "/dev/vda", "pause_seconds": 29.5,
                "bytes": 40e6, "dump_level": 31}

    exported: list[Path] = []

    def export(report: dict, folder: Path) -> dict:
        exported.append(folder)
        (folder / "vmcore").write_bytes(b"KDUMP   ")
        return {"vmcore": str(folder / "vmcore")}

    said: list[str] = []
    plan = plan_start(("warn",), {}, kdump_loaded=False)
    w = watch.Watcher(plan, RateLimiter(60, 2), capture, tmp_path / "out", tmp_path / "run", said.append,
                      export=export)
    warning = records("warning.txt")

    def stream():
        for _burst in range(3):  # three bursts of ten WARNINGs, 100 s apart
            for _ in range(10):
                for r in warning:
                    clock.t += 0.01
                    yield r, clock.t
            clock.t += 2
            yield None, clock.t
            clock.t += 100
        raise AssertionError("the watcher must stop at --max")

    assert w.run(stream(), ReportCollector()) == 2
    assert len(taken) == 2 and len(exported) == 2
    assert sum("not captured (rate limit" in s for s in said) == 9  # burst 2: it stops at --max
    assert any("--max 2 captures taken; stopping" in s for s in said)
    folders = sorted((tmp_path / "out").iterdir())
    assert [f.name.endswith("-warn") or "-warn-" in f.name for f in folders] == [True, True]
    rec = json.loads((folders[0] / "event.json").read_text())
    assert rec["ok"] and rec["snapshot"]["image"] == "img-1"
    assert rec["event"]["kind"] == "warn" and rec["event"]["trigger"].startswith("WARNING: CPU: ")
    assert rec["event"]["ended_by"] == "end trace" and any("lkdtm_WARNING" in s for s in rec["event"]["records"])


def test_watcher_skips_unclaimed_busy_and_counts_a_failed_capture(tmp_path: Path) -> None:
    said: list[str] = []
    calls = []

    def capture(ev: Event) -> dict:
        calls.append(ev)
        raise KhibernateError("the capture job failed: disk full")

    plan = plan_start(("oops", "warn"), {"warn": "kernel.panic_on_warn=1"}, kdump_loaded=True)
    busy = ["a kexec image is loaded"]
    w = watch.Watcher(plan, RateLimiter(0, 1), capture, tmp_path / "out", tmp_path / "run", said.append,
                      busy=lambda: busy[0] if busy else None)
    (warn,) = collect(records("warning.txt"))
    (oops,) = collect(records("exception.txt"))
    assert w.handle(warn, 0.0) is None and not calls  # WARNs panic here: not claimed, not even logged as skipped
    assert w.handle(oops, 0.0) is None and "a kexec image is loaded" in said[-1]
    busy.clear()
    with watch.capture_lock(tmp_path / "run") as got:  # `snapshot` holds the lock
        assert got and w.handle(oops, 0.0) is None and "another capture is running" in said[-1]
    rec = w.handle(oops, 0.0)
    assert rec is not None and rec["ok"] is False and "disk full" in rec["error"] and len(calls) == 1
    assert w.limiter.exhausted()


def test_snapshot_refuses_the_whole_crash_region_while_kdump_is_loaded() -> None:
    from khibernate.capture.snapshot import Options, SnapshotError, check_kdump_sharing

    with pytest.raises(SnapshotError, match="kdump capture kernel is loaded.*--mem-min/--mem-max"):
        check_kdump_sharing(Options("/dev/vda"), True)
    check_kdump_sharing(Options("/dev/vda", mem_min=0x38000000, mem_max=0x3fffffff), True)
    check_kdump_sharing(Options("/dev/vda"), False)


def test_snapshot_for_analysis_defaults_to_level_31_and_waits_for_no_other_capture(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import types

    from click.testing import CliRunner

    from khibernate.capture import snapshot
    from khibernate.cli import cli
    from khibernate.jump import api

    monkeypatch.setattr(api, "RUN_DIR", tmp_path)
    seen = []

    def fake_snapshot(opts, say=print):
        seen.append(opts)
        return types.SimpleNamespace(slot=0, to_json=lambda: {"slot": 0, "level": opts.level},
                                     describe=lambda: "described")

    monkeypatch.setattr(snapshot, "snapshot", fake_snapshot)
    for args, level in ((["--for-analysis"], 31), ([], 17), (["--for-analysis", "-d", "19"], 19)):
        r = CliRunner().invoke(cli, ["snapshot", "--target", "/dev/vda", "--json", *args])
        assert r.exit_code == 0, r.output
        assert seen[-1].level == level
    from khibernate.capture import analysis

    exported = []
    monkeypatch.setattr(analysis, "export_folder", lambda t, slot, folder: exported.append((t, slot, folder)) or {
        "folder": str(folder), "vmcore_bytes": 10e6, "dmesg_lines": 300, "export_seconds": 8.0})
    r = CliRunner().invoke(cli, ["snapshot", "--target", "/dev/vda", "--for-analysis", "--export-dir",
                                 str(tmp_path / "crash")])
    assert r.exit_code == 0 and "exported to" in r.output and "10.0 MB (kdump-compressed)" in r.output, r.output
    (t, slot, folder), = exported
    assert t == "/dev/vda" and slot == 0 and folder.parent == tmp_path / "crash"
    with watch.capture_lock(tmp_path) as got:
        assert got
        r = CliRunner().invoke(cli, ["snapshot", "--target", "/dev/vda", "--for-analysis"])
    assert r.exit_code != 0 and "another capture is running" in r.output and len(seen) == 4


def test_hung_task_watch_says_at_start_that_a_stuck_user_task_blocks_the_freezer() -> None:
    text = "\n".join(plan_start(("warn", "hung-task"), {}, kdump_loaded=False).describe())
    assert "hung-task" in text and "D state" in text and "cannot be frozen" in text and "slot is marked bad" in text
    assert "D state" not in "\n".join(plan_start(("warn",), {}, kdump_loaded=False).describe())
    assert "cannot be frozen either" in "\n".join(plan_start(("softlockup",), {}, kdump_loaded=False).describe())


def test_a_bug_in_the_export_is_recorded_and_the_watcher_runs_on(tmp_path: Path) -> None:
    """The capture is in the store when the export runs: whatever the export raises (here a bare struct.error, as
    a kdump header field that did not fit once did) goes into event.json and the journal; the watcher goes on."""
    said: list[str] = []

    def capture(ev: Event) -> dict:
        return {"image": "img-1", "slot": 1, "target": "/dev/vda", "pause_seconds": 3.0, "bytes": 1e6,
                "dump_level": 31}

    def export(report: dict, folder: Path) -> dict:
        raise struct.error("argument out of range")

    w = watch.Watcher(plan_start(("oops",), {}, kdump_loaded=False), RateLimiter(0, 3), capture,
                      tmp_path / "out", tmp_path / "run", said.append, export=export)
    (oops,) = collect(records("exception.txt"))
    for n in range(2):
        rec = w.handle(oops, 1e12 + n)  # later than the monotonic clock the limiter stamps the capture with
        assert rec is not None and rec["ok"] and rec["export"]["bug"]
        assert rec["export"]["error"] == "error: argument out of range"
    assert sum("failed on a bug" in s and "stays in slot 1" in s and "struct.error" in s for s in said) == 2
    events = sorted((tmp_path / "out").glob("*/event.json"))
    assert len(events) == 2 and json.loads(events[0].read_text())["export"]["bug"] is True
