"""The per-pause request of a resident capture kernel: round trip, refusals, and any mutation of a page refused with
a MailboxError (never another exception, never a request that differs silently)."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.capture import mailbox, pauserequest
from khibernate.capture.errors import MailboxError
from khibernate.capture.pauserequest import PAUSE, PauseRequest
from khibernate.layout import LayoutError
from khibernate.ranges import Range
from tests.image.fuzzing import Mutation
from tests.image.test_fuzz import PROFILE


def request(**over: object) -> PauseRequest:
    base = PauseRequest(kind="hibernate", seq=3, image=str(uuid.uuid4()), slot=1, offset=0x10000, capacity=0x400000,
                        level=17, store_uuid=str(uuid.uuid4()), store_generation=42,
                        ram_digest=pauserequest.ram_digest([Range(0x100000, 0x3f000000)]),
                        boot_id=str(uuid.uuid4()), deadline=600.0, zero_free=True,
                        extra={"filesystems": [{"source": "/dev/vda1", "fstype": "ext4"}]})
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_round_trip_by_field_name() -> None:
    req = request()
    page = pauserequest.pack(req)
    assert len(page) == mailbox.PAGE
    assert pauserequest.unpack(page) == req
    plain = request(kind="snapshot", zero_free=False, extra={})
    assert pauserequest.unpack(pauserequest.pack(plain)) == plain
    kind, image, body = mailbox.unpack_raw(page)
    assert kind == mailbox.PAUSE and image == uuid.UUID(req.image).bytes
    f = PAUSE.unpack(body)
    assert (f["seq"], f["slot"], f["store_generation"], f["deadline"]) == (3, 1, 42, 600.0)


def test_job_for_the_capture_side_savers() -> None:
    req = request()
    job = req.job("/dev/vda", 0x5000)
    assert (job.kind, job.target, job.slot, job.image, job.mailbox, job.zero_free) == \
        ("hibernate", "/dev/vda", 1, req.image, 0x5000, True)
    assert job.restorable


def test_ram_digest_sees_a_changed_map() -> None:
    a = [Range(0x100000, 0x3f000000), Range(0x100000000, 0x140000000)]
    assert pauserequest.ram_digest(a) == pauserequest.ram_digest(list(reversed(a)))
    assert pauserequest.ram_digest(a) != pauserequest.ram_digest(a[:1])  # memory unplugged


def _with_body(page: bytes, change: dict[str, object]) -> bytes:
    kind, image, body = mailbox.unpack_raw(page)
    f = dict(PAUSE.unpack(body))
    f.update(change)
    return mailbox.pack_raw(kind, image, PAUSE.pack(**f) + body[PAUSE.size:])


@pytest.mark.parametrize("change,match", [
    ({"version": 2}, "version 2"), ({"kind": 7}, "unknown kind"), ({"flags": 0x80}, "unknown flags"),
    ({"deadline": float("nan")}, "deadline"), ({"deadline": -1.0}, "deadline"),
    ({"offset": 1 << 63}, "beyond"), ({"extra_length": 3}, "extra JSON")])
def test_refused_fields(change: dict[str, object], match: str) -> None:
    with pytest.raises(MailboxError, match=match):
        pauserequest.unpack(_with_body(pauserequest.pack(request()), change))


def test_refused_records() -> None:
    with pytest.raises(MailboxError, match="no khibernate record"):
        pauserequest.unpack(bytes(4096))
    with pytest.raises(MailboxError, match="not a pause request"):
        pauserequest.unpack(mailbox.pack(mailbox.RESULT, bytes(16), {"ok": True}))
    with pytest.raises(MailboxError, match="cut short"):
        pauserequest.unpack(mailbox.pack_raw(mailbox.PAUSE, bytes(16), b"\0" * 10))
    with pytest.raises(MailboxError, match="does not fit"):
        pauserequest.pack(request(extra={"x": "y" * 5000}))
    with pytest.raises(MailboxError, match="not 'restore'"):
        pauserequest.pack(request(kind="restore"))
    page = pauserequest.pack(request())
    bad = bytearray(page)
    bad[mailbox.HEAD.size + 5] ^= 1
    with pytest.raises(MailboxError, match="checksum"):
        pauserequest.unpack(bytes(bad))


def test_a_result_in_the_page_is_not_a_request_and_a_request_is_no_result() -> None:
    req = request()
    page = pauserequest.pack(req)
    img = uuid.UUID(req.image).bytes
    with pytest.raises(MailboxError, match="left no result"):
        mailbox.result_in(page, img, lambda: True)
    answered = mailbox.pack(mailbox.RESULT, img, {"ok": False, "message": "refused", "refused": True})
    assert mailbox.result_in(answered, img, lambda: True)["refused"] is True


@settings(settings.get_profile(PROFILE))
@given(st.lists(st.builds(Mutation, st.sampled_from(["truncate", "flip", "set"]), st.integers(0, 4095),
                          st.integers(0, (1 << 64) - 1), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=4),
       st.booleans())
def test_fuzz_mutated_pages_refused_or_equal(muts: list[Mutation], fix_crc: bool) -> None:
    """Any mutation of the page: a MailboxError with a message, or (the CRC made to agree again, the mutation inside
    the record) a request that parses — never another exception."""
    req = request()
    page = pauserequest.pack(req)
    for m in muts:
        page = m.apply(page)
    if fix_crc and len(page) >= mailbox.HEAD.size and page[:8] == mailbox.MAGIC:
        h = mailbox.HEAD.unpack(page)
        n = min(h["length"], max(0, len(page) - mailbox.HEAD.size))
        data = page[mailbox.HEAD.size:mailbox.HEAD.size + n]
        page = mailbox.pack_raw(h["kind"], h["image_uuid"], data) if mailbox.HEAD.size + n <= mailbox.PAGE else page
    try:
        got = pauserequest.unpack(page)
    except MailboxError as e:
        assert str(e)
        return
    assert fix_crc or got == req  # without a matching CRC only an unchanged record may parse
    assert got.kind in pauserequest.KINDS and got.deadline > 0


def test_fuzz_fields_round_trip() -> None:
    for seq, gen, dl in [(0, 0, 1e-3), ((1 << 32) - 1, (1 << 64) - 1, 7 * 24 * 3600.0)]:
        req = request(seq=seq, store_generation=gen, deadline=dl)
        assert pauserequest.unpack(pauserequest.pack(req)) == req
    with pytest.raises(LayoutError, match=r"pause request\.seq = 4294967296 does not fit"):
        pauserequest.pack(request(seq=1 << 32))
