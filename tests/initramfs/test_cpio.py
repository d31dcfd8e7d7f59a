"""newc cpio writer/reader: round trips, determinism, compression framings, concatenated segments."""

from __future__ import annotations

import pytest

from khibernate.initramfs import cpio

ENTRIES = [
    cpio.Entry("bin/sh", "symlink", 0o777, b"/bin/busybox"),
    cpio.Entry("bin/busybox", "file", 0o755, b"\x7fELF" + bytes(range(256)) * 3),
    cpio.Entry("dev/console", "chardev", 0o600, b"", (5, 1)),
    cpio.Entry("etc/empty", "file", 0o644, b""),
    cpio.Entry("init", "file", 0o755, b"#!/bin/sh\necho hi\n"),
    cpio.Entry("tmp", "dir", 0o1777),
]


def _by_path(entries):
    return {e.path: e for e in entries}


@pytest.mark.parametrize("compression", cpio.COMPRESSIONS)
def test_round_trip(compression):
    blob = cpio.compress(cpio.write(ENTRIES), compression)
    got = _by_path(cpio.read(blob))
    for e in ENTRIES:
        assert got[e.path] == e
    # parents were added as 0755 directories
    assert got["bin"] == cpio.Entry("bin", "dir", 0o755)
    assert got["dev"].kind == "dir" and got["etc"].kind == "dir"


def test_deterministic_and_sorted():
    a = cpio.write(ENTRIES)
    b = cpio.write(list(reversed(ENTRIES)))
    assert a == b
    names = [e.path for e in next(iter(cpio.segments(a)))[1]]
    assert names == sorted(names)
    assert cpio.compress(a, "gzip") == cpio.compress(b, "gzip")
    assert cpio.compress(a, "zstd") == cpio.compress(b, "zstd")


def test_header_layout():
    blob = cpio.write([cpio.Entry("a", "file", 0o644, b"xyz")])
    assert blob[:6] == b"070701"
    fields = [int(blob[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size = fields[:7]
    assert (ino, mode, uid, gid, nlink, mtime, size) == (1, 0o100644, 0, 0, 1, 0, 3)
    assert fields[11] == 2  # namesize includes the NUL
    assert len(blob) % 4 == 0
    assert b"TRAILER!!!\0" in blob


def test_zstd_frame_has_content_size_and_small_window():
    import zstandard

    data = cpio.write(ENTRIES)
    params = zstandard.get_frame_parameters(cpio.compress(data, "zstd"))
    assert params.content_size == len(data)
    assert params.window_size <= 1 << cpio.ZSTD_WINDOW_LOG


def test_concatenated_segments_later_wins():
    first = cpio.write([cpio.Entry("x", "file", 0o644, b"old"), cpio.Entry("extra", "file", 0o644, b"e")])
    second = cpio.compress(cpio.write([cpio.Entry("x", "file", 0o644, b"new")]), "zstd")
    third = cpio.compress(cpio.write([cpio.Entry("y", "file", 0o644, b"g")]), "gzip")
    segs = list(cpio.segments(first + second + third))
    assert [s[0] for s in segs] == ["none", "zstd", "gzip"]
    got = _by_path(cpio.read(first + second + third))
    assert got["x"].data == b"new" and got["extra"].data == b"e" and got["y"].data == b"g"


def test_errors():
    with pytest.raises(cpio.CpioError):
        cpio.Entry("/abs", "file")
    with pytest.raises(cpio.CpioError):
        cpio.Entry("a/../b", "file")
    with pytest.raises(cpio.CpioError):
        cpio.write([cpio.Entry("a", "file", 0o644, b"1"), cpio.Entry("a/b", "file")])
    with pytest.raises(cpio.CpioError):
        cpio.write([cpio.Entry("a", "file", 0o644, b"1"), cpio.Entry("a", "file", 0o644, b"2")])
    with pytest.raises(cpio.CpioError):
        cpio.read(b"garbage!")
    with pytest.raises(cpio.CpioError):
        cpio.read(cpio.write(ENTRIES)[:200])
