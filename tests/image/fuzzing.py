"""Mutations of real files and the reader contract every mutated input must keep (shared by the hypothesis tests
and benchmarks/fuzz_campaign.py): any error is a khibernate ImageError with a message, nothing else."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path

from khibernate.image import vmcoreinfo
from khibernate.image.errors import ImageError
from khibernate.image.sources import MemorySource, open_source
from khibernate.image.sources.raw import RawSource

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 50, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One change to a file: cut it at ``offset``, xor one byte, or overwrite ``width`` bytes with ``value``."""

    kind: str  # "truncate" | "flip" | "set"
    offset: int
    value: int = 0
    width: int = 1

    def apply(self, data: bytes) -> bytes:
        """The mutated bytes (offset taken modulo the length; a flip always changes the byte)."""
        if not data:
            return data
        off = self.offset % len(data)
        if self.kind == "truncate":
            return data[:off]
        out = bytearray(data)
        if self.kind == "flip":
            out[off] ^= (self.value % 255) + 1
            return bytes(out)
        w = min(self.width, len(data) - off)
        out[off:off + w] = (self.value % (1 << 64)).to_bytes(8, "little")[:w]
        return bytes(out)


def open_any(path: Path, elfcorehdr: Path | None = None) -> MemorySource:
    """The source as ``image`` commands open it (raw memory when an elfcorehdr is given)."""
    if elfcorehdr is not None:
        return RawSource.with_elfcorehdr(path, elfcorehdr.read_bytes())
    return open_source(path)


def exercise(src: MemorySource) -> dict[str, object]:
    """What every command does with a source: metadata, VMCOREINFO fields, a read of each range's first page,
    a full verify.  Returns what it saw (for comparison with the unmutated file)."""
    seen: dict[str, object] = {"describe": src.describe(), "ranges": src.ranges, "dump_level": src.dump_level}
    try:
        v = vmcoreinfo.from_source(src)
        seen["vmci"] = (v.osrelease, v.page_size, v.kerneloffset, v.crashtime)
    except ImageError as e:
        seen["vmci"] = type(e).__name__
    pages = []
    for r in src.ranges[:4]:
        try:
            pages.append(src.read(r.start, min(r.size, 4096)))
        except ImageError as e:
            pages.append(type(e).__name__)
    seen["pages"] = pages
    seen["verify"] = src.verify()
    return seen


def run_contract(path: Path, elfcorehdr: Path | None = None,
                 action: Callable[[MemorySource], object] = exercise) -> tuple[str, object]:
    """("ok", result) or ("error", ImageError); any other exception propagates (a contract violation)."""
    try:
        with open_any(path, elfcorehdr) as src:
            return "ok", action(src)
    except ImageError as e:
        assert str(e), f"{type(e).__name__} without a message"
        return "error", e


def le(value: int, width: int) -> bytes:
    """``value`` as ``width`` little-endian bytes."""
    return struct.pack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width], value % (1 << (8 * width)))
