"""The kernel inside a bzImage: every compression the kernel's extract-ikconfig knows, made by the same tools the
kernel build uses (gzip, xz --x86, lzma, zstd --ultra -22, bzip2, lz4 -l), with the build's 4-byte size appended;
the embedded config and the build id read back; and the real kernels: the test kernel (gzip, IKCONFIG) and
Debian's (xz, no IKCONFIG, its build id equal to its debug vmlinux's)."""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
import struct
import subprocess

import pytest

from khibernate.elfcore import EHDR64, PHDR64, Note, pack_notes
from khibernate.jump import payload
from khibernate.jump.payload import PayloadError
from tests.tiers import unavailable

BUILD_ID = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
CONFIG = "# test kernel\nCONFIG_KEXEC=y\nCONFIG_KEXEC_JUMP=y\nCONFIG_IKCONFIG=y\n"


def fake_vmlinux(config: str | None = CONFIG, filler: int = 200_000) -> bytes:
    """An ELF vmlinux with a PT_NOTE holding the build id, some text, and the IKCONFIG blob."""
    notes = pack_notes([Note("Xen", 1, b"abcd"), Note("GNU", 3, BUILD_ID)])
    body = bytes(range(256)) * (filler // 256) + os.urandom(4096)
    if config is not None:
        body += b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED"
    note_off = EHDR64.size + PHDR64.size
    ehdr = EHDR64.pack(e_ident=b"\x7fELF\x02\x01\x01" + bytes(9), e_type=2, e_machine=62, e_version=1,
                       e_phoff=EHDR64.size, e_ehsize=EHDR64.size, e_phentsize=PHDR64.size, e_phnum=1)
    phdr = PHDR64.pack(p_type=4, p_offset=note_off, p_filesz=len(notes), p_memsz=len(notes), p_align=4)
    return ehdr + phdr + notes + body


def fake_bzimage(compressed: bytes, size: int) -> bytes:
    """A bzImage-shaped file: setup sectors with the header fields payload() reads, then the payload as the kernel
    build lays it out (compressed data + 4-byte little-endian decompressed size)."""
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    blob = compressed + struct.pack("<I", size)
    struct.pack_into("<II", data, 0x248, 0x100, len(blob))
    return bytes(data) + bytes(0x100) + blob


def tool(name: str, *args: str, data: bytes) -> bytes:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (scripts/setup.sh installs it)")
    return subprocess.run([path, *args], input=data, capture_output=True, check=True).stdout


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, 9),
    "xz": lambda d: tool("xz", "--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c", data=d),
    "lzma": lambda d: tool("xz", "--format=lzma", "-9", "-c", data=d),
    "zstd": lambda d: tool("zstd", "--ultra", "-22", "-q", "-c", data=d),
    "bzip2": lambda d: bz2.compress(d, 9),
    "lz4": lambda d: tool("lz4", "-l", "-9", "-q", "-c", data=d),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_every_compression_gives_the_kernel_back(kind: str) -> None:
    vmlinux = fake_vmlinux()
    bz = fake_bzimage(COMPRESSORS[kind](vmlinux), len(vmlinux))
    blob = payload.payload(bz)
    assert payload.compression(blob) == kind
    out = payload.decompress(blob)
    assert out == vmlinux
    assert payload.ikconfig(out) == CONFIG and payload.build_id(out) == BUILD_ID.hex()


def test_lz4_long_matches_and_several_blocks() -> None:
    """Overlapping matches (runs), long literal and match lengths, and more than one 8 MiB legacy block."""
    vmlinux = b"A" * 70_000 + os.urandom(3000) + b"xyz" * 40_000 + bytes(9 << 20) + b"end"
    assert payload.decompress(payload.payload(fake_bzimage(COMPRESSORS["lz4"](vmlinux), len(vmlinux)))) == vmlinux


def test_no_config_no_build_id_and_refusals() -> None:
    bare = fake_vmlinux(config=None)
    assert payload.ikconfig(bare) is None and payload.build_id(b"not an elf") == ""
    assert payload.ikconfig(b"IKCFG_ST not gzip IKCFG_ED") is None
    with pytest.raises(PayloadError, match="protocol 2.08"):
        payload.payload(bytes(4096))
    bz = bytearray(fake_bzimage(b"\x89LZO" + bytes(100), 104))
    with pytest.raises(PayloadError, match="lzo"):
        payload.decompress(payload.payload(bytes(bz)))
    with pytest.raises(PayloadError, match="unknown"):
        payload.decompress(b"\0" * 64)
    with pytest.raises(PayloadError, match="does not decompress"):
        payload.decompress(b"\xfd7zXZ\x00" + bytes(64))
    struct.pack_into("<I", bz, 0x24C, 1 << 30)
    with pytest.raises(PayloadError, match="outside the file"):
        payload.payload(bytes(bz))


def test_test_kernel_has_ikconfig_with_kexec_jump(test_bzimage: bytes) -> None:
    vmlinux = payload.decompress(payload.payload(test_bzimage))
    config = payload.ikconfig(vmlinux)
    assert config is not None and "CONFIG_KEXEC_JUMP=y" in config and "CONFIG_IKCONFIG=y" in config
    assert len(payload.build_id(vmlinux)) == 40


def test_debian_kernel_has_no_ikconfig_and_its_build_id(debian_bzimage: bytes) -> None:
    """Debian's kernel: xz, no embedded config; its build id is its debug vmlinux's (readelf, when cached)."""
    from vmtest import debian

    blob = payload.payload(debian_bzimage)
    assert payload.compression(blob) == "xz"
    vmlinux = payload.decompress(blob)
    assert payload.ikconfig(vmlinux) is None
    bid = payload.build_id(vmlinux)
    assert len(bid) == 40
    k = debian.cached_kernel()
    if k is not None and k.vmlinux.exists() and shutil.which("readelf"):
        notes = subprocess.run(["readelf", "-n", str(k.vmlinux)], capture_output=True, text=True).stdout
        assert f"Build ID: {bid}" in notes
