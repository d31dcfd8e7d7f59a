"""Sealed .khi (version 3): round trips with each key source, and every change an attacker who can write the image
can make - with every CRC made to agree again (tests/seal/forge.py) - refused with one error, before a page is
read out of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from khibernate.image.errors import ImageError, IncompleteImageError, TruncatedError
from khibernate.image.layouts.khi import HEADER, INDEX, NO_SLOT, SEAL, TRAILER
from khibernate.image.sources.khi import KhiSource
from khibernate.seal.errors import KeyRequiredError, TamperedError, WrongKeyError
from khibernate.seal.keysource import KeyFile, Passphrase
from khibernate.seal.sealing import Sealing
from tests.image.test_fuzz import PROFILE
from tests.seal import forge
from tests.seal.conftest import PASSPHRASE, key_file, seal_image

Keys = tuple[KeyFile, Passphrase, Sealing]


def _pages(src: KhiSource) -> dict[int, bytes]:
    """Every stored and zero page of an image by pfn."""
    out = {}
    for pfn in range(src.max_pfn):
        if src.page_present_mask(pfn, 1)[0]:
            out[pfn] = src.read_page(pfn)
    return out


@pytest.mark.parametrize("source", ["key file", "passphrase"])
def test_round_trip_with_each_key_source(base: dict[str, Path], sealed: Path, keys: Keys, source: str) -> None:
    """A sealed image reads back, with either key source, exactly the pages of the unsealed image of the same
    memory, and verifies; its blocks hold no plaintext."""
    key = keys[0] if source == "key file" else Passphrase(PASSPHRASE)
    with KhiSource(sealed, key=key) as s, KhiSource(base["khi"]) as plain:
        assert s.header.version == 3 and s.describe()["sealed"] and not plain.describe()["sealed"]
        assert s.verify() == plain.verify()
        assert _pages(s) == _pages(plain)
        page = next(p for p in _pages(plain).values() if any(p))
    assert page[:64] not in sealed.read_bytes()


def test_without_key_or_with_a_wrong_key(sealed: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyRequiredError, match="is sealed: give the key.*--key-file FILE or --passphrase-file"):
        KhiSource(sealed)
    with pytest.raises(WrongKeyError, match="wrong key"):
        KhiSource(sealed, key=key_file(tmp_path / "other"))
    with pytest.raises(WrongKeyError, match="wrong key"):
        KhiSource(sealed, key=Passphrase(b"wrong"))


def _refused(data: bytes, tmp_path: Path, key: KeyFile, slot: int | None = None) -> Exception:
    """The error opening and verifying ``data`` as an image (the restore's first pass); fails if it is accepted."""
    p = tmp_path / "changed.khi"
    p.write_bytes(data)
    try:
        with KhiSource(p, key=key, slot=slot) as src:
            src.verify(decompress=False)
    except Exception as e:  # noqa: BLE001 - the test asserts which
        return e
    raise AssertionError("a changed sealed image was accepted")


def _offsets(data: bytes) -> dict[str, int]:
    """One byte inside each part an attacker may change."""
    p, e = forge.parts(data), forge.entries(data)
    return {"ciphertext": e[1].offset + 3, "tag": e[1].offset + e[1].csize - 1,
            "stored bitmap": p["stored"], "zero bitmap": p["zero"], "index": p["index"] + INDEX.offsets["first_pfn"],
            "index offset": p["index"] + INDEX.size + INDEX.offsets["offset"],
            "header": HEADER.offsets["created_ns"], "header osrelease": HEADER.offsets["osrelease"],
            "ranges": HEADER.size + 3, "key slot salt": HEADER.unpack(data)["keyring_offset"] + 32 + 30,
            "trailer": p["trailer"] + TRAILER.offsets["pages_zero"], "seal tag": p["seal"] + 8,
            "seal magic": p["seal"] + SEAL.offsets["magic"] + 2, "seal reserved": p["seal"] + SEAL.offsets["reserved"]}


@pytest.mark.parametrize("part", ["ciphertext", "tag", "stored bitmap", "zero bitmap", "index", "index offset",
                                  "header", "header osrelease", "ranges", "key slot salt", "trailer",
                                  "seal tag", "seal magic", "seal reserved"])
def test_a_changed_byte_is_refused_even_with_every_crc_fixed(sealed: Path, keys: Keys, tmp_path: Path,
                                                              part: str) -> None:
    data = sealed.read_bytes()
    off = _offsets(data)[part]
    plain_flip = forge.flip(data, off)
    assert isinstance(_refused(plain_flip, tmp_path, keys[0]), TamperedError)
    forged = forge.rechecksum(plain_flip)
    e = _refused(forged, tmp_path, keys[0])
    assert isinstance(e, TamperedError | WrongKeyError), f"{part}: {type(e).__name__}: {e}"
    if part != "key slot salt":  # a changed salt derives another KEK: indistinguishable from a wrong key
        assert isinstance(e, TamperedError), f"{part}: {type(e).__name__}: {e}"


def test_every_byte_outside_the_blocks_is_authenticated(sealed: Path, keys: Keys, tmp_path: Path) -> None:
    """Each byte of the header page (key slots included) and of everything after the last block (bitmaps, index,
    seal record, trailer), flipped on its own, is refused: no byte there is outside the tables tag (the seal record's
    reserved bytes once were, found by the fuzz test)."""
    data = sealed.read_bytes()
    p = forge.parts(data)
    first_block = forge.entries(data)[0].offset
    stride = 1 if PROFILE == "ci" else 3  # every byte where scripts/test.sh runs, every third in a plain run
    for off in [*range(0, first_block, stride), *range(p["stored"], len(data), stride)]:
        e = _refused(forge.flip(data, off), tmp_path, keys[0])
        assert isinstance(e, ImageError) and str(e), f"byte {off}: {type(e).__name__}: {e}"


def test_two_blocks_swapped(sealed: Path, keys: Keys, tmp_path: Path) -> None:
    """Blocks 1 and 2 exchanged in the file, their index entries' offsets and CRCs following them."""
    data = bytearray(sealed.read_bytes())
    p, e = forge.parts(bytes(data)), forge.entries(bytes(data))
    a, b = e[1], e[2]
    fa, fb = bytes(data[a.offset:a.offset + a.csize]), bytes(data[b.offset:b.offset + b.csize])
    data[a.offset:b.offset + b.csize] = fb + data[a.offset + a.csize:b.offset] + fa
    for i, (off, size) in ((1, (a.offset, b.csize)), (2, (a.offset + b.csize + (b.offset - a.offset - a.csize),
                                                          a.csize))):
        at = p["index"] + i * INDEX.size
        data[at + INDEX.offsets["offset"]:at + INDEX.offsets["offset"] + 8] = off.to_bytes(8, "little")
        data[at + INDEX.offsets["csize"]:at + INDEX.offsets["csize"] + 4] = size.to_bytes(4, "little")
    assert isinstance(_refused(forge.rechecksum(bytes(data)), tmp_path, keys[0]), TamperedError)


def test_a_block_from_another_image_of_the_same_store(base: dict[str, Path], sealed: Path, keys: Keys,
                                                      tmp_path: Path) -> None:
    """Another image of the same memory under the same store key has equally long blocks: block 1 copied over."""
    other = seal_image(base["elf64"], tmp_path / "other.khi", keys[2]).read_bytes()
    data = bytearray(sealed.read_bytes())
    e, eo = forge.entries(bytes(data))[1], forge.entries(other)[1]
    assert e.csize == eo.csize and e.offset == eo.offset
    data[e.offset:e.offset + e.csize] = other[eo.offset:eo.offset + eo.csize]
    assert bytes(data) != sealed.read_bytes()
    assert isinstance(_refused(forge.rechecksum(bytes(data)), tmp_path, keys[0]), TamperedError)


def test_an_image_in_another_slot(base: dict[str, Path], keys: Keys, tmp_path: Path) -> None:
    """An image sealed for slot 0 read as slot 1's, and a file's read as a slot's, are refused; each reads where
    it was sealed for."""
    slot0 = seal_image(base["elf64"], tmp_path / "s0.khi", keys[2].for_slot(0))
    with KhiSource(slot0, key=keys[0], slot=0) as src:
        assert src.header.seal is not None and src.header.seal.slot == 0
    with pytest.raises(TamperedError, match="in slot 1 was sealed for slot 0"):
        KhiSource(slot0, key=keys[0], slot=1)
    file_image = seal_image(base["elf64"], tmp_path / "f.khi", keys[2])
    with KhiSource(file_image, key=keys[0]) as src:
        assert src.header.seal is not None and src.header.seal.slot == NO_SLOT
    with pytest.raises(TamperedError, match="sealed for a file"):
        KhiSource(file_image, key=keys[0], slot=0)
    # the slot field forged to 1 (CRCs fixed): the tables tag refuses it
    data = bytearray(slot0.read_bytes())
    data[HEADER.offsets["slot"]] = 1
    assert isinstance(_refused(forge.rechecksum(bytes(data)), tmp_path, keys[0], slot=1), TamperedError)


@pytest.mark.parametrize("cut", [1, TRAILER.size, TRAILER.size + SEAL.size, TRAILER.size + SEAL.size + 1, 5000])
def test_a_truncated_image_is_refused(sealed: Path, keys: Keys, tmp_path: Path, cut: int) -> None:
    data = sealed.read_bytes()
    e = _refused(data[:-cut], tmp_path, keys[0])
    assert isinstance(e, IncompleteImageError | TruncatedError | TamperedError), f"{type(e).__name__}: {e}"


def test_nonces_never_repeat_under_one_key(base: dict[str, Path], keys: Keys, tmp_path: Path) -> None:
    """Two saves of the same memory with the same store key share no ciphertext (each image has its own key:
    a fresh UUID), though their plaintext blocks are equal."""
    a = seal_image(base["elf64"], tmp_path / "a.khi", keys[2]).read_bytes()
    b = seal_image(base["elf64"], tmp_path / "b.khi", keys[2]).read_bytes()
    ea, eb = forge.entries(a), forge.entries(b)
    assert [e.csize for e in ea] == [e.csize for e in eb]
    for x, y in zip(ea, eb, strict=True):
        assert a[x.offset:x.offset + 32] != b[y.offset:y.offset + 32]
