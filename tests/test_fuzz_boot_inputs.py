"""Fuzzing the two boot-side readers with mutations of small valid inputs made in-process: the newc cpio reader
(initramfs) and the bzImage setup-header parser (jump).  Contract: any truncation or corruption gives the reader's
khibernate error (CpioError, NotABzImage) with a message, never another exception; what parses is sane.

Profiles as in tests/image/test_fuzz.py: ``fast`` by default, ``ci`` when KHIBERNATE_FUZZ_PROFILE=ci.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khibernate.initramfs import cpio
from khibernate.jump.bzimage import MAX_KERNEL_SIZE, XLF_KERNEL_64, parse_bzimage
from khibernate.jump.errors import NotABzImage
from tests.image.fuzzing import INTERESTING, Mutation

# no deadline: correctness, not speed, is asserted (CI runs these beside TCG guests)
settings.register_profile("fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("KHIBERNATE_FUZZ_PROFILE", "fast")


def mutations(size: int) -> st.SearchStrategy[list[Mutation]]:
    """1-3 truncations, byte flips or field overwrites, biased to the first KiB (headers)."""
    offset = st.one_of(st.integers(0, min(size, 1024)), st.integers(0, size))
    one = st.one_of(st.builds(Mutation, st.just("truncate"), offset),
                    st.builds(Mutation, st.just("flip"), offset, st.integers(0, 254)),
                    st.builds(Mutation, st.just("set"), offset, st.sampled_from(INTERESTING),
                              st.sampled_from([1, 2, 4, 8])))
    return st.lists(one, min_size=1, max_size=3)


def _archive(method: str) -> bytes:
    entries = [cpio.Entry("init", "file", 0o755, b"#!/bin/sh\necho hi\n" * 20),
               cpio.Entry("etc/passwd", "file", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
               cpio.Entry("bin/sh", "symlink", 0o777, b"busybox"),
               cpio.Entry("dev/console", "chardev", 0o600, b"", (5, 1))]
    return cpio.compress(cpio.write(cpio.with_parents(entries)), method)


ARCHIVES = {m: _archive(m) for m in ("none", "gzip", "zstd")}


@pytest.mark.parametrize("method", sorted(ARCHIVES))
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_cpio_reader_refuses_corruption_with_cpio_error(method: str, data: st.DataObject) -> None:
    base = ARCHIVES[method]
    mutated = base
    for m in data.draw(mutations(len(base))):
        mutated = m.apply(mutated)
    try:
        entries = cpio.read(mutated)
    except cpio.CpioError as e:
        assert str(e)
        return
    for e in entries:  # what reads back is well-formed entries, bounded by the input
        assert isinstance(e.path, str) and len(e.data) <= 1 << 20


def test_cpio_base_archives_read_back() -> None:
    for method, blob in ARCHIVES.items():
        assert {e.path for e in cpio.read(blob)} >= {"init", "etc/passwd", "bin/sh", "dev/console"}, method


def synthetic_bzimage() -> bytes:
    """A small file with a valid 64-bit, relocatable boot-protocol 2.15 setup header and a 64 KiB payload."""
    setup_sects = 4
    b = bytearray((setup_sects + 1) * 512 + 0x10000)
    b[0x1F1] = setup_sects
    struct.pack_into("<H", b, 0x1FE, 0xAA55)
    b[0x201] = 0x6A  # setup header ends at 0x26c
    b[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", b, 0x206, 0x020F)
    b[0x211] = 1  # LOADED_HIGH
    struct.pack_into("<I", b, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", b, 0x230, 0x200000)  # kernel_alignment
    b[0x234] = 1  # relocatable
    b[0x235] = 21  # min_alignment 2 MiB
    struct.pack_into("<H", b, 0x236, XLF_KERNEL_64 | 2)
    struct.pack_into("<I", b, 0x238, 2047)
    struct.pack_into("<Q", b, 0x258, 0x1000000)
    struct.pack_into("<I", b, 0x260, 0x800000)
    return bytes(b)


BZIMAGE = synthetic_bzimage()


def test_synthetic_bzimage_parses() -> None:
    k = parse_bzimage(BZIMAGE)
    assert k.version == 0x020F and k.relocatable and k.kernel_alignment == 0x200000 and k.init_size == 0x800000


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_bzimage_parser_refuses_corruption_with_not_a_bzimage(data: st.DataObject) -> None:
    mutated = BZIMAGE
    for m in data.draw(mutations(len(BZIMAGE))):
        mutated = m.apply(mutated)
    try:
        k = parse_bzimage(mutated, "fuzzed")
    except NotABzImage as e:
        assert str(e).startswith("fuzzed: ")
        return
    # what parses is something the loader can place: bounded sizes, power-of-two alignments, a payload
    assert k.kernel_alignment and not k.kernel_alignment & (k.kernel_alignment - 1)
    assert k.min_alignment <= k.kernel_alignment <= MAX_KERNEL_SIZE
    assert k.memsz <= MAX_KERNEL_SIZE + len(mutated) + 0x1000 and k.payload
