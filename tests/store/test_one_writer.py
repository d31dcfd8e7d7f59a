"""One writer at a time (issue 18): concurrent store updates from separate processes never lose one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from khibernate.store import api

MiB = 1 << 20
UPDATES = 100

# one process: UPDATES read-modify-writes of its own slot, each one seq higher than the store held before
WRITER = """
import dataclasses, sys
from khibernate.store import api
path, index, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    api.update(path, lambda sb: sb.with_slot(dataclasses.replace(sb.slot(index), seq=sb.slot(index).seq + 1)))
"""


@pytest.fixture
def dev(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    return str(p)


def test_two_processes_updating_the_store_lose_nothing(dev: str) -> None:
    """Two processes x UPDATES slot updates on a file target: every update lands (generation and both slots'
    counters add up).  Without the store lock a read-modify-write races another and loses generations."""
    api.init(dev)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, dev, str(i), str(UPDATES)], stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    sb = api.read(dev)
    assert (sb.slot(0).seq, sb.slot(1).seq) == (UPDATES, UPDATES)
    assert sb.generation == 1 + 2 * UPDATES


HOLD = """
import sys, time
from khibernate.store.handle import Store
with Store.open(sys.argv[1], write=True) as st:
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_waits_then_says_who_holds_the_store(dev: str) -> None:
    from khibernate.store.errors import StoreBusyError
    from khibernate.store.handle import Store

    api.init(dev)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, dev, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        said: list[str] = []
        with pytest.raises(StoreBusyError, match=rf"pid {holder.pid} \(.*python.*\) still holds the store"):
            Store.open(dev, write=True, wait=1.5, say=said.append)
        assert said and f"pid {holder.pid}" in said[0] and "waiting up to 1.5 s" in said[0]
        assert api.read(dev).generation == 1  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    short = subprocess.Popen([sys.executable, "-c", HOLD, dev, "0.5"], stdout=subprocess.PIPE, text=True)
    assert short.stdout is not None and short.stdout.readline().strip() == "holding"
    with Store.open(dev, write=True, wait=30) as st:  # waits for the holder's end, then writes
        assert st.update(lambda sb: sb.with_slot(sb.slot(0))).generation == 2
    short.wait()


def test_drop_init_force_hibernate_and_snapshot_refuse_while_a_capture_runs(dev: str, run_dir: Path) -> None:
    """The capture lock (what snapshot and watch hold) is taken by hibernate, target drop and target init --force
    too; a second one refuses at once, naming the capture's pid and command."""
    from click.testing import CliRunner

    from khibernate.cli import cli
    from khibernate.lock import capture_lock

    api.init(dev)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from khibernate.lock import capture_lock\n"
                               "with capture_lock(Path(sys.argv[1])) as got:\n"
                               "    print(got, flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        for args in (["target", "drop", dev, "0"], ["target", "init", dev, "--force"],
                     ["hibernate", "--target", dev], ["snapshot", "--target", dev]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 1 and "another capture is running" in r.output, (args, r.output)
            assert f"pid {holder.pid} (" in r.output and "capture_lock" in r.output, (args, r.output)
    finally:
        holder.kill()
        holder.wait()
    with capture_lock(run_dir) as got:
        assert got
    r = CliRunner().invoke(cli, ["target", "init", dev, "--force"])
    assert r.exit_code == 0, r.output
