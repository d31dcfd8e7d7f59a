"""The checks a resident capture kernel runs before a save: the next request of the armed first kernel, the same
memory map, the armed store at the generation the first kernel wrote, the slot reserved for this image."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from khibernate.capture.pausecheck import Armed, PauseRefused, check_pause
from khibernate.capture.pauserequest import PauseRequest, ram_digest
from khibernate.ranges import Range
from khibernate.store.superblock import SlotState, Superblock, new_superblock

RAM = [Range(0x100000, 0x2F000000), Range(0x3F000000, 0x40000000)]
STORE = uuid.uuid4()
BOOT = str(uuid.uuid4())


def store_with_reservation(image: str) -> Superblock:
    sb = new_superblock(640 << 20, 2, STORE.bytes, 1)
    rec = dataclasses.replace(sb.slot(1), state=SlotState.WRITING, image_uuid=uuid.UUID(image).bytes, seq=3)
    return sb.with_slot(rec)


def armed() -> Armed:
    return Armed("/dev/vda", str(STORE), BOOT, ram_digest(RAM), 0x12345000, seq=2)


def request(sb: Superblock, image: str, **over: object) -> PauseRequest:
    rec = sb.slot(1)
    req = PauseRequest("snapshot", 3, image, 1, rec.offset, rec.capacity, 17, str(STORE), sb.generation,
                       ram_digest(RAM), BOOT, 600.0)
    return dataclasses.replace(req, **over)  # type: ignore[arg-type]


def test_the_next_request_on_the_store_as_written_runs() -> None:
    image = str(uuid.uuid4())
    sb = store_with_reservation(image)
    req = request(sb, image)
    check_pause(armed(), req, sb)
    check_pause(armed(), request(sb, image, extra={"append": "khibernate.fault=hang"}), sb)
    assert armed().after(req).seq == 3


@pytest.mark.parametrize("change,match", [
    ({"seq": 2}, "pause #2, the next one here is #3"),
    ({"seq": 5}, "replayed or lost"),
    ({"boot_id": str(uuid.uuid4())}, "armed by"),
    ({"ram_digest": ram_digest(RAM[:1])}, "memory map changed since arm"),
    ({"store_uuid": str(uuid.uuid4())}, "armed for"),
    ({"store_generation": 1}, "changed under this capture kernel"),
    ({"slot": 0}, "not reserved for image"),
    ({"offset": 0}, "not reserved for image"),
    ({"slot": 9}, "no slot 9"),
    ({"extra": {"append": "init=/bin/sh"}}, "other than khibernate.fault=")])
def test_refused_and_says_why(change: dict[str, object], match: str) -> None:
    image = str(uuid.uuid4())
    sb = store_with_reservation(image)
    with pytest.raises(PauseRefused, match=match) as e:
        check_pause(armed(), request(sb, image, **change), sb)
    assert "nothing written" in str(e.value) and "fresh capture kernel" in str(e.value)


def test_a_reinitialised_store_is_refused() -> None:
    image = str(uuid.uuid4())
    sb = store_with_reservation(image)
    other = dataclasses.replace(sb, uuid=uuid.uuid4().bytes)
    with pytest.raises(PauseRefused, match="re-initialised"):
        check_pause(armed(), request(sb, image), other)
    with pytest.raises(PauseRefused, match="not reserved"):  # another image's reservation
        check_pause(armed(), request(sb, str(uuid.uuid4())), sb)
