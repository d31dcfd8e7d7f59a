"""Pure parts of the capture side: the job on the command line, mailbox records, the annotated source."""

from __future__ import annotations

import uuid

import pytest

from khibernate.capture import mailbox
from khibernate.capture.errors import JobError
from khibernate.capture.jobspec import Job, parse
from khibernate.elfcore import Note
from khibernate.image.sources.adapters import AnnotatedSource
from khibernate.image.sources.base import MemorySource, MemRange

JOB = Job("snapshot", "/dev/vdb", str(uuid.uuid4()), 1, 0x100000, 0x4000000, 17, str(uuid.uuid4()),
          str(uuid.uuid4()), 120.0, 0x1234000)


def test_job_round_trips_through_a_command_line_with_trailing_init_args() -> None:
    line = "console=ttyS0 nokaslr " + " ".join(JOB.args()) + " -- elfcorehdr=0x3f000000 kexec_jump_back_entry=0x1"
    assert parse(line) == JOB
    assert parse("console=ttyS0 root=/dev/sda") is None


def test_malformed_job_is_refused() -> None:
    with pytest.raises(JobError, match="malformed"):
        parse("khibernate.job=snapshot khibernate.slot=x")


def test_mailbox_record_round_trip_and_checksum() -> None:
    img = uuid.uuid4().bytes
    page = mailbox.pack(mailbox.RESULT, img, {"ok": True, "length": 5})
    assert len(page) == mailbox.PAGE
    assert mailbox.unpack(page) == (mailbox.RESULT, img, {"ok": True, "length": 5})
    bad = bytearray(page)
    bad[mailbox.HEAD.size + 2] ^= 1
    with pytest.raises(mailbox.MailboxError, match="checksum"):
        mailbox.unpack(bytes(bad))
    with pytest.raises(mailbox.MailboxError, match="no khibernate record"):
        mailbox.unpack(bytes(4096))


def test_oversized_result_is_truncated_not_lost() -> None:
    page = mailbox.pack(mailbox.RESULT, bytes(16), {"ok": False, "message": "x" * 10000})
    _, _, body = mailbox.unpack(page)
    assert body["ok"] is False and body["truncated"] and len(body["message"]) == 1500


def test_post_refuses_a_page_without_our_request(tmp_path) -> None:  # noqa: ANN001
    mem = tmp_path / "mem"
    img = uuid.uuid4().bytes
    mem.write_bytes(bytes(4096) + mailbox.pack(mailbox.REQUEST, img, {"request": "snapshot"}))
    with pytest.raises(mailbox.MailboxError, match="nothing written"):
        mailbox.post(0, img, {"ok": True}, devmem=str(mem))
    with pytest.raises(mailbox.MailboxError, match="another|belongs"):
        mailbox.post(4096, uuid.uuid4().bytes, {"ok": True}, devmem=str(mem))
    mailbox.post(4096, img, {"ok": True}, devmem=str(mem))
    assert mailbox.unpack(mem.read_bytes()[4096:]) == (mailbox.RESULT, img, {"ok": True})
    assert mem.read_bytes()[:4096] == bytes(4096)


def test_capture_job_reads_the_request_of_its_image(tmp_path) -> None:  # noqa: ANN001
    """A hibernation's request (its filesystems) travels in the mailbox page; a request too big for it is refused
    at the start rather than cut."""
    mem = tmp_path / "mem"
    img = uuid.uuid4().bytes
    req = {"request": "hibernate", "filesystems": [{"mount": "/mnt", "fstype": "ext4", "device": "vdb"}]}
    mem.write_bytes(bytes(4096) + mailbox.pack(mailbox.REQUEST, img, req))
    assert mailbox.read_request(4096, img, devmem=str(mem)) == req
    with pytest.raises(mailbox.MailboxError, match="no request for this job"):
        mailbox.read_request(4096, uuid.uuid4().bytes, devmem=str(mem))
    with pytest.raises(mailbox.MailboxError, match="no khibernate record"):
        mailbox.read_request(0, img, devmem=str(mem))
    with pytest.raises(mailbox.MailboxError, match="does not fit the mailbox page"):
        mailbox.pack(mailbox.REQUEST, img, {"filesystems": ["x" * 100] * 50}, truncate=False)


class _Mem(MemorySource):
    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return (MemRange(0, 8192),)

    def read(self, paddr: int, size: int) -> bytes:
        return bytes([paddr & 0xFF]) * size

    @property
    def notes(self) -> tuple[Note, ...]:
        return (Note("VMCOREINFO", 0, b"OSRELEASE=x\n"),)


def test_annotated_source_adds_a_note_and_reads_through() -> None:
    src = AnnotatedSource(_Mem(), "KHIBERNATE", b"{}")
    assert [n.name for n in src.notes] == ["VMCOREINFO", "KHIBERNATE"]
    assert src.read(5, 3) == b"\x05\x05\x05" and src.max_pfn == 2 and src.vmcoreinfo_text == "OSRELEASE=x\n"


def test_capture_initrd_cache_key_is_stable() -> None:
    from khibernate.capture.initrd import cache_key

    assert cache_key() == cache_key() and len(cache_key()) == 16


def test_fault_injection_words() -> None:
    import pytest

    from khibernate.capture.errors import JobError
    from khibernate.capture.save import inject_fault

    inject_fault("console=ttyS0 khibernate.job=snapshot")  # no fault word: nothing happens
    with pytest.raises(RuntimeError, match="raised on purpose"):
        inject_fault("khibernate.job=snapshot -- khibernate.fault=raise")
    with pytest.raises(JobError, match="raise, hang, panic-early"):
        inject_fault("khibernate.fault=explode")
    for other in ("panic-early", "poweroff-fails", "restore-raise"):  # injected by /init, the hibernate job, restore
        inject_fault(f"khibernate.fault={other}")
