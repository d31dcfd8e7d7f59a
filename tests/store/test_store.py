"""The target store on a regular file standing in for the device: layout, slot choice, superblock switch, export."""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.image.sources.khi import KhiSource, save
from khibernate.image.sources.raw import RawSource, parse_ranges
from khibernate.store import api, device, plan
from khibernate.store.errors import NoSpaceError, NotAStoreError, SlotFullError, StoreCorruptError, StoreError
from khibernate.store.superblock import (
    BLOCK,
    COPY_OFFSETS,
    SlotState,
    Superblock,
    new_superblock,
    newest,
)

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    return str(p)


@pytest.fixture(scope="module")
def memfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 MiB of 'physical memory': a pattern, random bytes and zero pages."""
    p = tmp_path_factory.mktemp("mem") / "mem.raw"
    data = bytearray(2 * MiB)
    data[0:MiB // 2] = b"KHB-PATTERN-0123" * (MiB // 32)
    data[MiB:MiB + MiB // 4] = os.urandom(MiB // 4)
    p.write_bytes(bytes(data))
    return p


def write_image(devpath: str, rec_offset: int, capacity: int, memfile: Path) -> device.RegionWriter:
    fd = device.open_device(devpath, write=True)
    try:
        w = device.RegionWriter(fd, rec_offset, capacity)
        with RawSource(memfile, parse_ranges("0-200000")) as src:
            save(src, w, vmci=None, level=1)  # type: ignore[arg-type]
        w.sync()
        return w
    finally:
        os.close(fd)


def test_superblock_round_trip_and_crc() -> None:
    sb = new_superblock(64 * MiB, 3, b"u" * 16, 123)
    data = sb.pack(1)
    back = Superblock.unpack(data)
    assert back.slots == sb.slots and back.copy_index == 1 and back.generation == 1
    bad = bytearray(data)
    bad[200] ^= 1
    with pytest.raises(StoreCorruptError):
        Superblock.unpack(bytes(bad))
    with pytest.raises(NotAStoreError):
        Superblock.unpack(bytes(BLOCK))


def test_newest_takes_highest_valid_generation() -> None:
    sb = new_superblock(64 * MiB, 2, b"u" * 16, 1)
    nxt = sb.with_slot(dataclasses.replace(sb.slots[0], state=SlotState.WRITING))
    assert newest([sb.pack(0), nxt.pack(1)]).generation == 2
    torn = bytearray(nxt.pack(1))
    torn[2000:] = bytes(len(torn) - 2000)  # a write cut short: the old copy still counts
    assert newest([sb.pack(0), bytes(torn)]).generation == 1
    with pytest.raises(StoreCorruptError):
        newest([bytes(torn), bytes(torn)])


def test_geometry_refuses_tiny_device_and_single_slot() -> None:
    with pytest.raises(StoreError, match="too small"):
        new_superblock(8 * MiB, 2, b"u" * 16, 0)
    with pytest.raises(StoreError, match="last good one"):
        new_superblock(64 * MiB, 1, b"u" * 16, 0)


def test_choose_slot_never_takes_the_newest_complete_image() -> None:
    sb = new_superblock(64 * MiB, 2, b"u" * 16, 0)
    assert plan.choose_slot(sb).index == 0
    sb = sb.with_slot(dataclasses.replace(sb.slots[0], state=SlotState.COMPLETE, seq=1))
    assert plan.choose_slot(sb).index == 1
    sb = sb.with_slot(dataclasses.replace(sb.slots[1], state=SlotState.COMPLETE, seq=2))
    assert plan.choose_slot(sb).index == 0  # the oldest complete one; slot 1 (newest) survives
    sb = sb.with_slot(dataclasses.replace(sb.slots[0], state=SlotState.FREE))
    assert plan.choose_slot(sb).index == 0
    one = new_superblock(64 * MiB, 2, b"u" * 16, 0)
    one = one.with_slot(dataclasses.replace(one.slots[0], state=SlotState.COMPLETE, seq=5))
    one = one.with_slot(dataclasses.replace(one.slots[1], state=SlotState.RESUMED, seq=6))
    assert plan.choose_slot(one).index == 1


def test_retire_keeps_newest() -> None:
    sb = new_superblock(64 * MiB, 3, b"u" * 16, 0)
    for i, seq in enumerate((3, 1, 2)):
        sb = sb.with_slot(dataclasses.replace(sb.slots[i], state=SlotState.COMPLETE, seq=seq))
    out, freed = plan.retire(sb, 1)
    assert sorted(freed) == [1, 2] and out.slots[0].state == SlotState.COMPLETE
    assert plan.retire(sb, None)[1] == []
    with pytest.raises(NoSpaceError):
        plan.retire(sb, 0)


def test_estimate_and_fit() -> None:
    sb = new_superblock(64 * MiB, 2, b"u" * 16, 0)
    mi = plan.parse_meminfo("MemTotal:  1000000 kB\nMemFree:  200000 kB\n")
    est = plan.estimate(sb, mi)
    assert est.kept_bytes == 800000 * 1024 and not est.ratio_observed
    with pytest.raises(NoSpaceError, match="bigger target"):
        plan.check_fits(sb.slots[0], est)
    sb = sb.with_slot(dataclasses.replace(sb.slots[0], state=SlotState.COMPLETE, seq=1, length=4096 * 10,
                                          pages_stored=100))
    assert plan.estimate(sb, mi).ratio == pytest.approx(0.1)


def test_init_refuses_existing_store(dev: str) -> None:
    api.init(dev)
    with pytest.raises(StoreError, match="--force"):
        api.init(dev)
    assert api.init(dev, 3, force=True).slots[2].capacity >= 4 * MiB


def test_missing_target(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        api.read(str(tmp_path / "nope"))
    (tmp_path / "blank").write_bytes(bytes(2 * BLOCK))
    with pytest.raises(NotAStoreError, match="target init"):
        api.read(str(tmp_path / "blank"))


def test_update_alternates_copies_and_survives_a_torn_write(dev: str) -> None:
    sb = api.init(dev)
    s2 = api.set_slot(dev, dataclasses.replace(sb.slots[0], state=SlotState.WRITING, seq=1))
    assert s2.generation == 2
    s3 = api.set_slot(dev, dataclasses.replace(s2.slots[0], state=SlotState.BAD))
    assert s3.generation == 3 and s3.copy_index != s2.copy_index
    # tear the newest copy: the store falls back to generation 2, never to garbage
    with open(dev, "r+b") as f:
        f.seek(COPY_OFFSETS[s3.copy_index] + 100)
        f.write(b"\xff" * 50)
    back = api.read(dev)
    assert back.generation == 2 and back.slots[0].state == SlotState.WRITING


def test_image_in_slot_verifies_exports_and_reads(dev: str, memfile: Path, tmp_path: Path) -> None:
    sb = api.init(dev)
    rec = sb.slots[0]
    w = write_image(dev, rec.offset, rec.capacity, memfile)
    chk = api.verify_bytes(dev, rec, w.length, w.crc32)
    assert chk.pages_stored > 0 and chk.dump_level == 1
    api.set_slot(dev, dataclasses.replace(rec, state=SlotState.COMPLETE, seq=1, length=w.length, crc32=w.crc32,
                                          pages_stored=chk.pages_stored))
    out = tmp_path / "out.khi"
    assert api.export(dev, 0, str(out)) == w.length
    src = KhiSource(out)
    try:
        src.verify()
        assert src.read(0x1000, 16) == b"KHB-PATTERN-0123"
        assert src.read(0x100000, 4096) == memfile.read_bytes()[MiB:MiB + 4096]
    finally:
        src.close()
    # one flipped byte inside the slot is caught by the read-back
    with open(dev, "r+b") as f:
        f.seek(rec.offset + 5000)
        b = f.read(1)
        f.seek(rec.offset + 5000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(StoreCorruptError, match="other bytes"):
        api.verify_slot(dev, 0)


def test_region_writer_stops_at_slot_end(dev: str, memfile: Path) -> None:
    sb = api.init(dev)
    rec = sb.slots[0]
    before = Path(dev).read_bytes()[rec.offset + 64 * 1024:]
    with pytest.raises(SlotFullError, match="outgrew"):
        write_image(dev, rec.offset, 64 * 1024, memfile)
    assert Path(dev).read_bytes()[rec.offset + 64 * 1024:] == before  # nothing beyond the region written


def test_region_writer_crc_matches_bytes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(8192))
    fd = os.open(p, os.O_RDWR)
    try:
        w = device.RegionWriter(fd, 100, 5000)
        w.write(b"abc")
        w.write(memoryview(b"defg"))
        assert w.crc32 == zlib.crc32(b"abcdefg") and w.tell() == 7
    finally:
        os.close(fd)
    assert p.read_bytes()[100:107] == b"abcdefg"


def test_cli_init_list_show_drop(dev: str) -> None:
    r = CliRunner()
    res = r.invoke(cli, ["target", "init", dev, "--slots", "3"])
    assert res.exit_code == 0, res.output
    assert "3 slots" in res.output
    res = r.invoke(cli, ["target", "list", dev])
    assert res.exit_code == 0 and "slot 2: free" in res.output
    res = r.invoke(cli, ["target", "drop", dev, "1"])
    assert res.exit_code != 0 and "already free" in res.output
    res = r.invoke(cli, ["target", "show", dev, "7"])
    assert res.exit_code != 0 and "slots 0..2" in res.output


def test_read_only_target_is_refused_before_anything_is_written(tmp_path) -> None:
    """A writable file passes, a missing one is refused (read-only block devices: tests/vm/test_snapshot.py)."""
    import pytest

    from khibernate.store import device
    from khibernate.store.errors import StoreError

    f = tmp_path / "store.img"
    f.write_bytes(bytes(1 << 20))
    device.check_writable(str(f))  # writable: no error
    with pytest.raises(StoreError, match="does not exist"):
        device.check_writable(str(tmp_path / "absent"))


def test_sigterm_during_export_leaves_no_file(dev: str, memfile: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: SIGTERM while `target export --format kdump` runs its exporter (the slot's .khi copy made beside
    DEST) exits 143 and removes the copy; before, the process died and left DEST.khi.partial-src behind.  Run in
    a forked child, so that the signal cannot end the test process."""
    import signal
    import time

    from khibernate.store import handle

    sb = api.init(dev)
    rec = sb.slots[0]
    w = write_image(dev, rec.offset, rec.capacity, memfile)
    chk = api.verify_bytes(dev, rec, w.length, w.crc32)
    api.set_slot(dev, dataclasses.replace(rec, state=SlotState.COMPLETE, seq=1, length=w.length, crc32=w.crc32,
                                          pages_stored=chk.pages_stored))
    out = tmp_path / "out"
    out.mkdir()

    def terminated_meanwhile(khi: str, dest: str, fmt: str, key: object = None) -> int:
        assert os.path.exists(khi)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(handle, "_export_khi", terminated_meanwhile)
    pid = os.fork()
    if pid == 0:  # the child: export, and report how it ended in its exit status
        code = 0
        try:
            api.export(dev, 0, str(out / "vmcore"), "kdump")
        except SystemExit as e:
            code = int(e.code or 0)
        except BaseException:
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143, f"wait status {status:#x}"
    assert list(out.iterdir()) == []
