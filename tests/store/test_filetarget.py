"""File targets: FIEMAP parsing and checks (pure), the extent map format (round trip, fuzz), and `target init FILE
--size` on this host's filesystem (the raw-device proof needs root)."""

import os
import subprocess
import zlib

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.cli import cli
from khibernate.store import extentmap, fiemap, filetarget
from khibernate.store.errors import FileTargetError, StoreCorruptError, StoreError
from khibernate.store.extentmap import ExtentMap
from khibernate.store.fiemap import (
    BTRFS_MAGIC,
    EXT4_MAGIC,
    FS_COMPR_FL,
    FS_ENCRYPT_FL,
    FS_NOCOW_FL,
    XFS_MAGIC,
    Extent,
    FilesystemFacts,
)

MiB = 1 << 20
UUID = bytes(range(16))


def test_parse_fiemap_buffer():
    buf = fiemap.FIEMAP.pack(fm_mapped_extents=2, fm_extent_count=2)
    buf += fiemap.FIEMAP_EXTENT.pack(fe_logical=0, fe_physical=8 * MiB, fe_length=MiB)
    buf += fiemap.FIEMAP_EXTENT.pack(fe_logical=MiB, fe_physical=20 * MiB, fe_length=MiB, fe_flags=1)
    extents, last = fiemap.parse_fiemap(buf)
    assert extents == [Extent(0, 8 * MiB, MiB), Extent(MiB, 20 * MiB, MiB, 1)] and last


def test_contiguous_extents_merge():
    ext = [Extent(0, 8 * MiB, MiB), Extent(MiB, 9 * MiB, MiB), Extent(2 * MiB, 30 * MiB, MiB, 1)]
    assert fiemap.check_extents(ext, 3 * MiB) == [Extent(0, 8 * MiB, 2 * MiB), Extent(2 * MiB, 30 * MiB, MiB)]


@pytest.mark.parametrize("flag,word", [(0x800, "unwritten"), (0x4, "delayed"), (0x2000, "shared"),
                                       (0x8, "compressed"), (0x200, "inline"), (0x80, "encrypted"),
                                       (0x2, "not known")])
def test_refused_extent_flags_name_the_reason(flag, word):
    with pytest.raises(FileTargetError, match=word):
        fiemap.check_extents([Extent(0, 0, MiB, flag)], MiB)


def test_holes_and_short_maps_are_refused():
    with pytest.raises(FileTargetError, match="hole at 0x100000"):
        fiemap.check_extents([Extent(0, 0, MiB), Extent(2 * MiB, 4 * MiB, MiB)], 3 * MiB)
    with pytest.raises(FileTargetError, match="only 1048576 of"):
        fiemap.check_extents([Extent(0, 0, MiB)], 2 * MiB)


@pytest.mark.parametrize("facts,word", [
    (FilesystemFacts(BTRFS_MAGIC, 0), "nodatacow"),
    (FilesystemFacts(BTRFS_MAGIC, FS_NOCOW_FL), "btrfs-logical"),
    (FilesystemFacts(0x01021994, None), "not ext4 or xfs"),  # tmpfs
    (FilesystemFacts(EXT4_MAGIC, FS_COMPR_FL), "compression"),
    (FilesystemFacts(EXT4_MAGIC, FS_ENCRYPT_FL), "encrypted"),
])
def test_filesystems_that_move_or_transform_data_are_refused(facts, word):
    with pytest.raises(FileTargetError, match=word):
        fiemap.check_filesystem(facts)


def test_ext4_and_xfs_are_accepted():
    assert fiemap.check_filesystem(FilesystemFacts(EXT4_MAGIC, 0)) == "ext4"
    assert fiemap.check_filesystem(FilesystemFacts(XFS_MAGIC, None)) == "xfs"


def sample_map() -> ExtentMap:
    return ExtentMap(UUID, 6 * MiB, 1 << 30, (Extent(0, 16 * MiB, 4 * MiB), Extent(4 * MiB, 100 * MiB, 2 * MiB)))


def test_extent_map_round_trip_and_translation():
    m = sample_map()
    assert extentmap.parse(m.pack()) == m
    assert m.resume_offset == 16 * MiB
    assert m.to_device(4 * MiB - 4096, 8192) == [(20 * MiB - 4096, 4096), (100 * MiB, 4096)]
    with pytest.raises(StoreError, match="outside"):
        m.to_device(6 * MiB - 4096, 8192)
    assert m.dm_table("/dev/vda1") == "0 8192 linear /dev/vda1 32768\n8192 4096 linear /dev/vda1 204800\n"


def test_extent_map_damage_is_detected():
    data = bytearray(sample_map().pack())
    data[70] ^= 1
    with pytest.raises(StoreCorruptError, match="checksum"):
        extentmap.parse(bytes(data))
    with pytest.raises(StoreCorruptError, match="no extent map"):
        extentmap.parse(bytes(len(data)))


def test_map_whose_first_piece_cannot_hold_the_header_is_refused():
    m = ExtentMap(UUID, 2 * MiB, 1 << 30, (Extent(0, 16 * MiB, 8192), Extent(8192, 64 * MiB, 2 * MiB - 8192)))
    with pytest.raises(FileTargetError, match="one piece"):
        m.check_fits()


def test_a_moved_file_is_refused():
    m = sample_map()
    extentmap.same_place(m, list(m.extents))
    with pytest.raises(FileTargetError, match="moved on the device"):
        extentmap.same_place(m, [Extent(0, 16 * MiB, 4 * MiB), Extent(4 * MiB, 200 * MiB, 2 * MiB)])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 399))
def test_extent_map_parser_never_crashes(noise, cut):
    good = sample_map().pack()
    for data in (noise, good[:cut], good[:cut] + noise):
        try:
            extentmap.parse(data)
        except StoreError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=20), st.data())
def test_extent_map_round_trips_any_valid_layout(lengths, data):
    pos, phys, ext = 0, 0, []
    for n in lengths:
        phys += data.draw(st.integers(0, 8)) * 4096
        ext.append(Extent(pos, phys, n * 4096))
        pos += n * 4096
        phys += n * 4096
    m = ExtentMap(UUID, pos, phys + MiB, tuple(ext))
    assert extentmap.parse(m.pack() + os.urandom(16)) == m
    body = m.pack()
    at = extentmap.EXTMAP.offsets["crc32"]
    assert zlib.crc32(body[:at] + bytes(4) + body[at + 4:]) == int.from_bytes(body[at:at + 4], "little")


@pytest.fixture
def ext4_dir(tmp_path):
    """A fresh ext4 filesystem on a loop device, mounted (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted ext4 and raw reads of its device need root (CI runs as root)")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", str(img)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_target_init_file_records_a_true_map(ext4_dir):
    store = ext4_dir / "store"
    r = CliRunner().invoke(cli, ["target", "init", str(store), "--size", "16M"])
    assert r.exit_code == 0, r.output
    assert "first byte at device offset" in r.output
    m = filetarget.check_unmoved(str(store))
    assert m.file_bytes == 16 * MiB and store.stat().st_blocks * 512 >= 16 * MiB
    # the raw device holds the file's bytes at every piece the map names
    with open(store, "rb") as f:
        for e in m.extents:
            f.seek(e.logical)
            assert filetarget.read_raw(fiemap.device_of(str(store)), e.physical, 4096) == f.read(4096)
    r = CliRunner().invoke(cli, ["target", "init", str(store), "--size", "16M"])
    assert r.exit_code != 0 and "exists" in r.output


def test_a_copied_store_file_is_refused(ext4_dir):
    store = ext4_dir / "store"
    filetarget.init_file(str(store), 16 * MiB)
    copy = ext4_dir / "copy"
    copy.write_bytes(store.read_bytes())
    os.replace(copy, store)  # what a backup restore or `cp` + `mv` does: same bytes, other blocks
    with pytest.raises(FileTargetError, match="moved on the device"):
        filetarget.check_unmoved(str(store))


def test_sparse_size_and_existing_files_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(FileTargetError, match="multiple of 1 MiB"):
        filetarget.init_file(str(tmp_path / "x"), MiB + 4096)
    (tmp_path / "y").write_bytes(b"keep")
    with pytest.raises(FileTargetError, match="exists"):
        filetarget.init_file(str(tmp_path / "y"), MiB * 8)
    assert (tmp_path / "y").read_bytes() == b"keep"
    # the README's first command on a machine without the package's /var/lib/khibernate: say what to do
    with pytest.raises(FileTargetError, match=r"/nowhere does not exist: create it first \(mkdir -p .*/nowhere\)"):
        filetarget.init_file(str(tmp_path / "nowhere" / "store"), MiB * 8)
    assert not (tmp_path / "nowhere").exists()


def test_target_map_spec_round_trip_and_errors():
    from khibernate.store.filedev import TargetMap

    tm = TargetMap(254, 1, 16 * MiB)
    assert TargetMap.parse(tm.spec()) == tm and tm.spec() == "254:1:16777216"
    for bad in ("", "254:1", "x:1:2", "254:1:-5", "1:2:3:4"):
        with pytest.raises(FileTargetError, match="MAJ:MIN:OFFSET"):
            TargetMap.parse(bad)


def test_read_map_finds_the_store_by_device_and_offset(tmp_path):
    from khibernate.store.filedev import read_map

    m = sample_map()
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(20 * MiB)
        f.seek(m.resume_offset + extentmap.MAP_OFFSET)
        f.write(m.pack())
    assert read_map(str(disk), m.resume_offset) == m
    with pytest.raises(StoreCorruptError):
        read_map(str(disk), m.resume_offset + 4096)


def _mark_slot0_bad(sb):
    import dataclasses

    from khibernate.store.superblock import SlotState

    return sb.with_slot(dataclasses.replace(sb.slot(0), state=SlotState.BAD))


def test_a_store_file_on_a_read_only_mount_is_written_through_its_window(ext4_dir):
    """The resume in the initramfs sees the root mounted read-only: the store file cannot be opened for writing, so
    its image is marked tried through the device under it, at the offsets its proven extent map gives (the write
    handle resume.open_for_resume opens)."""
    from khibernate.restore.resume import open_for_resume
    from khibernate.store import api
    from khibernate.store.superblock import SlotState

    store = ext4_dir / "store"
    filetarget.init_file(str(store), 16 * MiB)
    assert filetarget.raw_window(str(store)) is None  # writable: written as a file
    subprocess.run(["mount", "-o", "remount,ro", str(ext4_dir)], check=True)
    with pytest.raises(StoreError, match="read-only filesystem"):
        api.update(str(store), _mark_slot0_bad)
    win = filetarget.raw_window(str(store))
    assert win is not None and win.device == fiemap.device_of(str(store))
    assert win.offset == filetarget.read_map(str(store)).resume_offset
    with open_for_resume(str(store)) as st:
        assert st.update(_mark_slot0_bad).slot(0).state == SlotState.BAD
    # the resume proves the map once more before the capture kernel is loaded (filedev.for_capture), still on the
    # read-only mount: the file's cached first MiB predates the write through the window (run 10 refused here)
    filetarget.check_unmoved(str(store))
    assert api.read(str(store)).slot(0).state == SlotState.BAD  # read through the file (its cache dropped)
    subprocess.run(["mount", "-o", "remount,rw", str(ext4_dir)], check=True)
    filetarget.check_unmoved(str(store))  # still a store file whose map is true
    assert api.read(str(store)).slot(0).state == SlotState.BAD


def test_a_window_writes_only_the_superblock_at_its_offset(tmp_path):
    """Store.open(window=) reads and writes the superblock at the window's offset of its device and never the file
    (here the 'device' is a plain file holding a copy of the store file at an offset)."""
    from khibernate.store import api
    from khibernate.store.handle import RawWindow, Store
    from khibernate.store.superblock import SlotState

    store = tmp_path / "store"
    with open(store, "wb") as f:
        f.truncate(16 * MiB)
    api.init(str(store), 2, force=True)  # a store in a plain file (no extent map needed for this)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(3 * MiB) + store.read_bytes())
    before_file, before_disk = store.read_bytes(), disk.read_bytes()
    with Store.open(str(store), write=True, window=RawWindow(str(disk), 3 * MiB)) as st:
        assert st.update(_mark_slot0_bad).slot(0).state == SlotState.BAD
    assert store.read_bytes() == before_file
    after = disk.read_bytes()
    assert after[:3 * MiB] == before_disk[:3 * MiB] and after != before_disk
    disk2 = tmp_path / "disk2"
    disk2.write_bytes(after[3 * MiB:])
    assert api.read(str(disk2)).slot(0).state == SlotState.BAD
