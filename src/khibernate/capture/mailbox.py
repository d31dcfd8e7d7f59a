"""The mailbox: one locked page of the first kernel that the capture kernel fills with a checksummed status record.

Why a page of memory and not a status block in the store: the result must come back also when the store is the
thing that failed (missing in the capture kernel, read-only, full, I/O errors), and the first kernel then trusts
nothing but memory it allocated itself.  The first kernel writes a *request* (magic, image id) into an mlocked
anonymous page and hands its physical address (from /proc/self/pagemap) on the capture kernel's command line; the
capture kernel overwrites the page through /dev/mem only if it finds that very request there, so a page that moved
or a stale address is never scribbled on.  The record is small JSON behind a fixed header with a CRC32.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Mapping, Sequence

from khibernate.capture.errors import MailboxError as MailboxError
from khibernate.layout import Layout
from khibernate.ranges import Range

PAGE = 4096
MAGIC = b"KHMBOX\x00\x01"
HEAD = Layout("mailbox record header", "<", [
    ("magic", "8s"), ("kind", "I"), ("image_uuid", "16s"), ("length", "I"),  # of the JSON body that follows
    ("crc32", "I")])  # of (this header with crc32 0 + body)
REQUEST, RESULT, PAUSE = 1, 2, 3  # PAUSE: a resident capture kernel's per-pause request (capture/pauserequest.py)
LOW_MEMORY = 1 << 20  # the capture kernel owns low memory while it runs: a mailbox there is unreachable


def pack_raw(kind: int, image_uuid: bytes, data: bytes) -> bytes:
    """A record of ``kind`` for image ``image_uuid`` carrying ``data`` as it is, padded to a page (MailboxError when
    it does not fit)."""
    if HEAD.size + len(data) > PAGE:
        raise MailboxError(f"the record ({len(data)} bytes) does not fit the mailbox page")
    crc = zlib.crc32(HEAD.pack(magic=MAGIC, kind=kind, image_uuid=image_uuid, length=len(data)) + data)
    return (HEAD.pack(magic=MAGIC, kind=kind, image_uuid=image_uuid, length=len(data), crc32=crc)
            + data).ljust(PAGE, b"\0")


def pack(kind: int, image_uuid: bytes, body: Mapping[str, object], truncate: bool = True) -> bytes:
    """A record of ``kind`` for image ``image_uuid`` carrying ``body`` as JSON, padded to a page (a body too big for
    the page is cut to its message, or MailboxError without ``truncate``)."""
    data = json.dumps(body, sort_keys=True).encode()
    if HEAD.size + len(data) > PAGE and not truncate:
        raise MailboxError(f"the request ({len(data)} bytes of JSON) does not fit the mailbox page")
    if HEAD.size + len(data) > PAGE:
        data = json.dumps({**{k: body[k] for k in ("ok",) if k in body},
                           "message": str(body.get("message", ""))[:1500], "truncated": True}).encode()
    return pack_raw(kind, image_uuid, data)


def unpack_raw(page: bytes) -> tuple[int, bytes, bytes]:
    """(kind, image uuid, body bytes) of a record; MailboxError when the page holds none or it is damaged."""
    if len(page) < HEAD.size or page[:8] != MAGIC:
        raise MailboxError("the mailbox page holds no khibernate record")
    h = HEAD.unpack(page, error=MailboxError)
    kind, image_uuid, n = h["kind"], h["image_uuid"], h["length"]
    if HEAD.size + n > len(page):
        raise MailboxError("the mailbox record is longer than its page; it is damaged")
    data = page[HEAD.size:HEAD.size + n]
    if zlib.crc32(HEAD.pack(magic=MAGIC, kind=kind, image_uuid=image_uuid, length=n) + data) != h["crc32"]:
        raise MailboxError("the mailbox record's checksum does not match; it is damaged")
    return kind, image_uuid, data


def unpack(page: bytes) -> tuple[int, bytes, dict[str, object]]:
    """(kind, image uuid, body) of a record with a JSON body; MailboxError when the page holds none, it is damaged,
    or its body is not a JSON object."""
    kind, image_uuid, data = unpack_raw(page)
    try:
        body = json.loads(data)
    except ValueError:
        raise MailboxError("the mailbox record is not valid JSON; it is damaged") from None
    if not isinstance(body, dict):
        raise MailboxError("the mailbox record is not a JSON object; it is damaged")
    return kind, image_uuid, body


def physical_address(vaddr: int, pagemap: str = "/proc/self/pagemap") -> int:
    """Physical address of this process's resident page at vaddr (needs CAP_SYS_ADMIN to see PFNs)."""
    with open(pagemap, "rb") as f:
        f.seek((vaddr // PAGE) * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    if not entry >> 63 & 1:
        raise MailboxError("the mailbox page is not resident")
    pfn: int = entry & ((1 << 55) - 1)
    if pfn == 0:
        raise MailboxError("/proc/self/pagemap hides physical addresses: run as root (CAP_SYS_ADMIN)")
    return pfn * PAGE


def mlock(buf: mmap.mmap) -> None:
    """Lock the page of ``buf`` in memory (MailboxError saying how to allow it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE)) != 0:
        err = ctypes.get_errno()
        raise MailboxError(f"mlock of the mailbox page failed: {os.strerror(err)} (run as root or raise "
                           "RLIMIT_MEMLOCK)")


class Mailbox:
    """A locked page of this process, outside low memory and the ``avoid`` ranges (memory the jump swaps out: the
    capture kernel would find its own pages there), holding a request for image ``image_uuid`` (``request``: what
    the capture job should know beyond its command line; MailboxError if it does not fit the page)."""

    def __init__(self, image_uuid: bytes, request: Mapping[str, object] | None = None, avoid: Sequence[Range] = ()):
        self.image_uuid = image_uuid
        page = pack(REQUEST, image_uuid, request or {"request": "snapshot"}, truncate=False)
        spare: list[mmap.mmap] = []
        for _ in range(4096 if avoid else 64):
            buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf[:] = page
            mlock(buf)
            paddr = physical_address(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
            if paddr >= LOW_MEMORY and not any(paddr in r for r in avoid):
                self.buf, self.paddr = buf, paddr
                break
            spare.append(buf)  # keep it allocated so the next try gets another page
        else:
            raise MailboxError("could not get a mailbox page above 1 MiB"
                               + (f" outside {', '.join(map(str, avoid))}" if avoid else ""))
        for b in spare:
            b.close()

    def vaddr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buf))

    def still_at(self) -> bool:
        """Whether the page is still at the physical address handed out (it is locked; migration would move it)."""
        return physical_address(self.vaddr()) == self.paddr

    def result(self) -> dict[str, object]:
        """The capture job's result; MailboxError if it never wrote one (hung, killed, crashed, or page moved)."""
        return result_in(bytes(self.buf[:]), self.image_uuid, self.still_at)


def result_in(page: bytes, image_uuid: bytes, still_at: Callable[[], bool]) -> dict[str, object]:
    """The RESULT record for ``image_uuid`` in a mailbox page (``still_at``: whether the page is still where the
    capture kernel was told); MailboxError when there is none."""
    kind, found, _ = unpack_raw(page)
    if found != image_uuid:
        raise MailboxError("the mailbox holds a record for another image")
    if kind != RESULT:
        moved = "" if still_at() else " (the mailbox page moved in physical memory during the jump)"
        raise MailboxError("the capture job left no result in the mailbox: it did not run, hung past the "
                           f"watchdog, or could not reach the page{moved}; see the console log")
    return unpack(page)[2]


def read_page(paddr: int, devmem: str = "/dev/mem") -> bytes:
    """Capture side: the first kernel's mailbox page at paddr, as it is."""
    if paddr % PAGE:
        raise MailboxError(f"mailbox address {paddr:#x} is not page aligned")
    fd = os.open(devmem, os.O_RDONLY | os.O_SYNC)
    try:
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=paddr) as m:
            return bytes(m[:])
    finally:
        os.close(fd)


def read_request(paddr: int, image_uuid: bytes, devmem: str = "/dev/mem") -> dict[str, object]:
    """Capture side: the first kernel's request for this job's image in its mailbox page at paddr."""
    kind, found, body = unpack(read_page(paddr, devmem))
    if kind != REQUEST or found != image_uuid:
        raise MailboxError(f"the mailbox at {paddr:#x} holds no request for this job's image")
    return body


def post(paddr: int, image_uuid: bytes, body: Mapping[str, object], devmem: str = "/dev/mem",
         kind: int = RESULT) -> None:
    """Capture side: write a RESULT record (or, ``kind`` REQUEST, the request again: a secret taken out of it) over
    the whole of the first kernel's mailbox page at paddr, if it holds a record of our image."""
    if paddr % PAGE:
        raise MailboxError(f"mailbox address {paddr:#x} is not page aligned")
    fd = os.open(devmem, os.O_RDWR | os.O_SYNC)
    try:
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=paddr) as m:
            try:
                _, found, _ = unpack_raw(bytes(m[:]))
            except MailboxError as e:
                raise MailboxError(f"no mailbox at {paddr:#x} ({e}); nothing written") from None
            if found != image_uuid:
                raise MailboxError(f"the mailbox at {paddr:#x} belongs to image {uuidlib.UUID(bytes=found)}, not "
                                   "this job's; nothing written")
            m[:] = pack(kind, image_uuid, body)  # a shared /dev/mem mapping is the memory itself: no msync
    finally:
        os.close(fd)
