"""A sealed store: `target init` with a key, its key slots on the device, sealed images in its slots bound to
them, what restore accepts from which store, exports that need the key, and captures refused until the capture
kernel can seal."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.image import vmcoreinfo
from khibernate.image.errors import NotAVmcoreError
from khibernate.image.sources import open_source
from khibernate.image.sources.khi import KhiSource, save
from khibernate.seal import policy
from khibernate.seal.errors import KeyRequiredError, TamperedError, UnsealedRefusedError, WrongKeyError
from khibernate.seal.keysource import KeyFile
from khibernate.seal.sealing import Sealing
from khibernate.store import api, device, keyslots
from khibernate.store.superblock import STORE_SEALED, STORE_UNSEALED, SlotState
from tests.image import basefiles
from tests.seal.conftest import key_file

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    return str(p)


@pytest.fixture(scope="module")
def memfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ELF core with VMCOREINFO (tests/image/basefiles.py)."""
    return basefiles.build(tmp_path_factory.mktemp("mem"))["elf64"]


def page(elf: Path, paddr: int) -> bytes:
    with open_source(elf) as src:
        return src.read(paddr, 4096)


def init(dev: str, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["target", "init", dev, *args])
    return r.exit_code, r.stdout + r.stderr


def put_image(dev: str, index: int, memfile: Path, sealing: Sealing | None) -> None:
    """Save ``memfile`` into slot ``index`` (sealed with ``sealing`` unless None) and mark it complete."""
    rec = api.read(dev).slot(index)
    fd = device.open_device(dev, write=True)
    try:
        w = device.RegionWriter(fd, rec.offset, rec.capacity)
        with open_source(memfile) as src:
            save(src, w, vmci=vmcoreinfo.from_source(src), level=1, restorable=True, block_pages=8,
                 seal=sealing)  # type: ignore[arg-type]
        w.sync()
    finally:
        os.close(fd)
    api.set_slot(dev, dataclasses.replace(rec, state=SlotState.COMPLETE, seq=index + 1, length=w.length,
                                          crc32=w.crc32))


def store_sealing(dev: str, key: KeyFile, slot: int) -> Sealing:
    """What a capture into ``slot`` seals with: the store's key, unwrapped from its key slots."""
    fd = device.open_device(dev)
    try:
        return Sealing.from_keyring(keyslots.read(fd, dev), key, slot)
    finally:
        os.close(fd)


def test_init_with_a_key_file_seals_the_store_and_never_writes_the_key(dev: str, tmp_path: Path) -> None:
    key = key_file(tmp_path / "store.key")
    code, out = init(dev, "--key-file", key.path)
    assert code == 0, out
    assert "sealing: sealed" in out and api.read(dev).flags == STORE_SEALED
    store_key = store_sealing(dev, key, 0).store_key
    assert store_key not in Path(dev).read_bytes()
    with pytest.raises(WrongKeyError):
        store_sealing(dev, key_file(tmp_path / "other.key"), 0)


def test_init_without_a_key_says_unsealed_and_refuses_both(dev: str, tmp_path: Path) -> None:
    code, out = init(dev)
    assert code == 0 and "sealing: unsealed" in out and api.read(dev).flags == STORE_UNSEALED
    code, out = init(dev, "--force", "--unsealed", "--key-file", key_file(tmp_path / "k").path)
    assert code == 2 and "contradict" in out


def test_sealed_slot_reads_with_its_key_and_is_bound_to_its_slot(dev: str, memfile: Path, tmp_path: Path) -> None:
    key = key_file(tmp_path / "store.key")
    assert init(dev, "--key-file", key.path)[0] == 0
    put_image(dev, 0, memfile, store_sealing(dev, key, 0))
    rec0 = api.read(dev).slot(0)
    with api.open_slot(dev, rec0, key) as src:
        assert src.read(0x2000, 4096) == page(memfile, 0x2000)
        src.verify()
    with pytest.raises(KeyRequiredError):
        api.open_slot(dev, rec0)
    # the same bytes copied into slot 1 (an attacker replaying an image into another slot)
    rec1 = api.read(dev).slot(1)
    with open(dev, "r+b") as f:
        f.seek(rec0.offset)
        blob = f.read(rec0.length)
        f.seek(rec1.offset)
        f.write(blob)
    api.set_slot(dev, dataclasses.replace(rec1, state=SlotState.COMPLETE, seq=9, length=rec0.length,
                                          crc32=rec0.crc32))
    with pytest.raises(TamperedError, match="in slot 1 was sealed for slot 0"):
        api.open_slot(dev, api.read(dev).slot(1), key)


def test_export_stays_sealed_as_khi_and_needs_the_key_otherwise(dev: str, memfile: Path, tmp_path: Path) -> None:
    key = key_file(tmp_path / "store.key")
    assert init(dev, "--key-file", key.path)[0] == 0
    put_image(dev, 0, memfile, store_sealing(dev, key, 0))
    out = tmp_path / "copy.khi"
    api.export(dev, 0, str(out))
    with pytest.raises(KeyRequiredError):
        KhiSource(out)
    with KhiSource(out, key=key) as src:
        assert src.read(0x2000, 4096) == page(memfile, 0x2000)
    r = CliRunner().invoke(cli, ["target", "export", dev, "0", str(tmp_path / "v.elf"), "--format", "elf"])
    assert r.exit_code == 2 and "is sealed: give the key" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(cli, ["target", "export", dev, "0", str(tmp_path / "v.elf"), "--format", "elf",
                                 "--key-file", key.path])
    assert r.exit_code == 0, r.stderr
    assert page(memfile, 0x2000) in (tmp_path / "v.elf").read_bytes()


@pytest.mark.parametrize("store", ["sealed", "made before sealing"])
def test_restore_refuses_an_unsealed_image_the_store_does_not_allow(dev: str, memfile: Path, tmp_path: Path,
                                                                      store: str) -> None:
    from khibernate.restore.run import prepare_slot

    if store == "sealed":
        assert init(dev, "--key-file", key_file(tmp_path / "k").path)[0] == 0
    else:
        api.init(dev)
        api.update(dev, lambda sb: sb.with_flags(0))
    put_image(dev, 0, memfile, None)  # an attacker's (or an old) unsealed image
    with pytest.raises(UnsealedRefusedError, match="unsealed.*refused"):
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"))


def test_restore_takes_an_unsealed_image_only_from_an_unsealed_store_and_without_a_key(
        dev: str, memfile: Path, tmp_path: Path) -> None:
    from khibernate.restore.run import prepare_slot

    api.init(dev)  # today's default: unsealed, and says so
    put_image(dev, 0, memfile, None)
    # past every image check: this boot's vmcore is what is missing
    with pytest.raises(NotAVmcoreError, match="no-vmcore: no such file"):
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"))
    with pytest.raises(UnsealedRefusedError, match="a key was given"):
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"), key=key_file(tmp_path / "k"))


def test_restore_of_a_sealed_slot_needs_the_right_key(dev: str, memfile: Path, tmp_path: Path) -> None:
    from khibernate.restore.run import prepare_slot

    key = key_file(tmp_path / "store.key")
    assert init(dev, "--key-file", key.path)[0] == 0
    put_image(dev, 0, memfile, store_sealing(dev, key, 0))
    with pytest.raises(KeyRequiredError):
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"))
    with pytest.raises(WrongKeyError):
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"), key=key_file(tmp_path / "other"))
    with pytest.raises(NotAVmcoreError, match="no-vmcore: no such file"):  # authenticated; no vmcore here
        prepare_slot(dev, 0, vmcore=str(tmp_path / "no-vmcore"), key=key)


def test_which_captures_a_store_takes() -> None:
    """A sealed store: a snapshot or a hibernation with its key (a resume hands the same image key on); without
    it, refused before anything runs, saying which option to give.  An unsealed store given a key: refused (the key
    would seal nothing)."""
    policy.check_capture(STORE_SEALED, "/dev/vdb", "snapshot", key_given=True)
    with pytest.raises(policy.SealedStoreCaptureError, match="give its key"):
        policy.check_capture(STORE_SEALED, "/dev/vdb", "snapshot", key_given=False)
    policy.check_capture(STORE_SEALED, "/dev/vdb", "hibernate", key_given=True)  # a resume hands the key on
    with pytest.raises(policy.SealedStoreCaptureError, match="give its key to `hibernate` .*--passphrase-file FILE.*"
                       "the resume asks for the passphrase"):
        policy.check_capture(STORE_SEALED, "/dev/vdb", "hibernate", key_given=False)
    with pytest.raises(policy.SealedStoreCaptureError, match="not a sealed store"):
        policy.check_capture(STORE_UNSEALED, "/dev/vdb", "snapshot", key_given=True)
    policy.check_capture(STORE_UNSEALED, "/dev/vdb", "snapshot", key_given=False)


def test_a_handed_image_key_seals_that_image_into_the_store(dev: str, memfile: Path, tmp_path: Path) -> None:
    """What a capture does: the first kernel derives the key of one image in a child process, the capture kernel
    seals that image with it and the store's keyring; the slot opens with the store's key file like any sealed image,
    carries the handed image's UUID, and the handed key seals no other image."""
    from khibernate.seal.handoff import hand_image_key

    key = key_file(tmp_path / "store.key")
    assert init(dev, "--key-file", key.path)[0] == 0
    fd = device.open_device(dev)
    try:
        ring = keyslots.read(fd, dev)
    finally:
        os.close(fd)
    image = os.urandom(16)
    handed = hand_image_key(lambda: KeyFile(key.path), ring, image)
    assert handed.image_uuid == image and handed.key_id == ring.key_id
    sealing = Sealing.from_handed(handed, ring, 1)
    with pytest.raises(ValueError, match="only the image it was handed for"):
        sealing.cipher(os.urandom(16))
    put_image(dev, 1, memfile, sealing)
    out = tmp_path / "slot1.khi"
    api.export(dev, 1, str(out))
    with KhiSource(out, key=key, slot=1) as src:
        assert src.header.uuid == image
        src.verify()
        assert src.read(0x100000, 4096) == page(memfile, 0x100000)
    with pytest.raises(WrongKeyError):  # the child's error, re-raised here with its message
        hand_image_key(lambda: key_file(tmp_path / "other.key"), ring, image)
    with pytest.raises(WrongKeyError, match="another store key"):
        Sealing.from_handed(dataclasses.replace(handed, key_id=bytes(16)), ring, 1)


def test_the_capture_job_wipes_the_handed_key_before_it_saves(dev: str, tmp_path: Path) -> None:
    """capture/save.take_request: the first kernel's mailbox page (here a file standing for /dev/mem) holds the
    request with the image key; after take_request the page holds the request without it and no byte of the key,
    and the sealing it returns seals the job's image with the store's keyring and the job's slot."""
    import uuid

    from khibernate.capture import mailbox
    from khibernate.capture.jobspec import CaptureContext, Job
    from khibernate.capture.save import take_request
    from khibernate.seal.handoff import hand_image_key
    from khibernate.store.handle import Store

    key = key_file(tmp_path / "store.key")
    assert init(dev, "--key-file", key.path)[0] == 0
    image = uuid.uuid4()
    with Store.open(dev, write=True) as st:
        ring = keyslots.read(st.fd, dev)
        handed = hand_image_key(lambda: KeyFile(key.path), ring, image.bytes)
        rec = st.sb.slot(1)
        job = Job("snapshot", dev, st.sb.uuid_str, 1, rec.offset, rec.capacity, 17, str(image),
                  str(uuid.uuid4()), 600.0, 4096)
        mem = tmp_path / "mem"
        mem.write_bytes(bytes(4096) + mailbox.pack(mailbox.REQUEST, image.bytes,
                                                   {"request": "snapshot", "seal": handed.to_json()}))
        request, sealing = take_request(st, job, CaptureContext(""), devmem=str(mem))
    page_now = mem.read_bytes()[4096:]
    assert request == {"request": "snapshot"}
    assert mailbox.read_request(4096, image.bytes, devmem=str(mem)) == {"request": "snapshot"}
    assert handed.image_key not in page_now and handed.image_key.hex().encode() not in page_now
    assert sealing is not None and sealing.image_uuid == image.bytes and sealing.slot == 1
    assert sealing.keyring.key_id == ring.key_id


def test_target_list_says_whether_the_store_is_sealed(dev: str, tmp_path: Path) -> None:
    assert init(dev, "--key-file", key_file(tmp_path / "k").path)[0] == 0
    r = CliRunner().invoke(cli, ["target", "list", dev])
    assert r.exit_code == 0 and "sealing: sealed" in r.stdout
    r = CliRunner().invoke(cli, ["target", "list", dev, "--json"])
    assert r.exit_code == 0 and '"sealing": "sealed"' in r.stdout
