"""The old kernel's log from the lockless printk ring buffer (Linux 5.10+), found through VMCOREINFO alone.

Output matches ``makedumpfile --dump-dmesg``: ``[seconds.micros] text``, continuation lines indented, bytes that
are neither printable nor space written as ``\\xNN``.
"""

from __future__ import annotations

import dataclasses

from khibernate.image.errors import CorruptImageError, UnsupportedError
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.image.x86_64 import X86_64

DESC_FLAGS_SHIFT = 62
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
DESC_COMMITTED, DESC_FINALIZED = 1, 2
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b" \t\n\v\f\r")


@dataclasses.dataclass(frozen=True)
class Record:
    """One log record: sequence number, timestamp (ns), caller id and text bytes."""

    seq: int
    ts_nsec: int
    caller_id: int | None
    text: bytes


def _u(data: bytes, off: int, size: int) -> int:
    """Little-endian unsigned integer of ``size`` bytes at ``off``."""
    return int.from_bytes(data[off:off + size], "little")


MAX_COUNT_BITS, MAX_SIZE_BITS = 24, 31  # the kernel's CONFIG_LOG_BUF_SHIFT is at most 25 (descriptors: 2 fewer)
MAX_STRUCT = 4096  # bytes of any printk struct the reader copies
MAX_RECORD = 256  # prb_desc (24 bytes) and printk_info (88) are read once per descriptor: 2^24 of them at most


def _bits(value: int, limit: int, what: str) -> int:
    """``1 << value`` when ``value`` is a plausible ring size exponent; CorruptImageError otherwise."""
    if value > limit:
        raise CorruptImageError(f"printk ring buffer {what} is 2^{value}, beyond any kernel's 2^{limit}; the dump "
                                "or its VMCOREINFO is corrupt")
    return 1 << value


def records(source: MemorySource, vmci: Vmcoreinfo) -> list[Record]:
    """All committed/finalized records from tail to head, oldest first."""
    if not vmci.has("SYMBOL(prb)"):
        raise UnsupportedError("VMCOREINFO has no SYMBOL(prb): kernels before 5.10 (log_buf) are not supported")
    kx = X86_64(source, vmci)
    o = vmci.offset

    def s(name: str) -> int:
        return vmci.size(name, (1, MAX_RECORD if name in ("prb_desc", "printk_info") else MAX_STRUCT))

    counter = vmci.offset_or("atomic_long_t.counter", 0) or 0
    prb_addr = kx.read_u64(vmci.symbol("prb"))
    prb = kx.read(prb_addr, s("printk_ringbuffer"))
    ring = o("printk_ringbuffer.desc_ring")
    count = _bits(_u(prb, ring + o("prb_desc_ring.count_bits"), 4), MAX_COUNT_BITS, "descriptor count")
    descs = kx.read(_u(prb, ring + o("prb_desc_ring.descs"), 8), count * s("prb_desc"))
    infos = kx.read(_u(prb, ring + o("prb_desc_ring.infos"), 8), count * s("printk_info"))
    head = _u(prb, ring + o("prb_desc_ring.head_id") + counter, 8)
    tail = _u(prb, ring + o("prb_desc_ring.tail_id") + counter, 8)
    tdr = o("printk_ringbuffer.text_data_ring")
    size = _bits(_u(prb, tdr + o("prb_data_ring.size_bits"), 4), MAX_SIZE_BITS, "text size")
    text_data = kx.read(_u(prb, tdr + o("prb_data_ring.data"), 8), size)
    d_size, i_size = s("prb_desc"), s("printk_info")
    off_sv = o("prb_desc.state_var") + counter
    off_lpos = o("prb_desc.text_blk_lpos")
    off_begin, off_next = o("prb_data_blk_lpos.begin"), o("prb_data_blk_lpos.next")
    off_seq, off_ts, off_len = o("printk_info.seq"), o("printk_info.ts_nsec"), o("printk_info.text_len")
    off_caller = vmci.offset_or("printk_info.caller_id", None)
    out: list[Record] = []
    rid = tail
    for _ in range(count + 1):
        d = (rid % count) * d_size
        sv = _u(descs, d + off_sv, 8)
        state = (sv >> DESC_FLAGS_SHIFT) & 3
        if (sv & DESC_ID_MASK) == rid and state in (DESC_COMMITTED, DESC_FINALIZED):
            begin = _u(descs, d + off_lpos + off_begin, 8) % size
            nxt = _u(descs, d + off_lpos + off_next, 8) % size
            if begin != nxt:
                i = (rid % count) * i_size
                text_len = _u(infos, i + off_len, 2)
                if begin > nxt:
                    begin = 0
                begin += 8  # the data block starts with its descriptor id
                text_len = min(text_len, max(0, nxt - begin))
                caller = _u(infos, i + off_caller, 4) if off_caller is not None else None
                out.append(Record(_u(infos, i + off_seq, 8), _u(infos, i + off_ts, 8), caller,
                                  text_data[begin:begin + text_len]))
        if rid == head:
            break
        rid = (rid + 1) & DESC_ID_MASK
    return out


def format_record(r: Record, *, caller: bool) -> str:
    """One record as makedumpfile --dump-dmesg prints it."""
    secs, rem = divmod(r.ts_nsec, 1_000_000_000)
    prefix = f"[{secs:5d}.{rem // 1000:06d}] "
    if caller and r.caller_id is not None:
        cid = f"{'C' if r.caller_id & 0x80000000 else 'T'}{r.caller_id & 0x7FFFFFFF}"
        prefix += f"[{cid:>6}] "
    parts = [prefix]
    for b in r.text:
        if b == 0x0A:
            parts.append("\n" + " " * len(prefix))
        elif b in _PRINTABLE:
            parts.append(chr(b))
        else:
            parts.append(f"\\x{b:02x}")
    parts.append("\n")
    return "".join(parts)


def kernel_log(source: MemorySource, vmci: Vmcoreinfo, *, caller: bool = False) -> str:
    """The whole log as text (caller ids like newer makedumpfile when ``caller``)."""
    return "".join(format_record(r, caller=caller) for r in records(source, vmci))
