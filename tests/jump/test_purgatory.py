import shutil
import struct

import pytest

from khibernate.jump import purgatory


def test_carried_bytes_match_source():
    """purgatory.S re-assembled with binutils gives exactly the bytes the package carries."""
    assert shutil.which("as") and shutil.which("objcopy"), "binutils (as, objcopy) needed: apt-get install binutils"
    blob, syms = purgatory.assemble()
    assert blob == purgatory.image()
    for name, off in purgatory.SYMBOLS.items():
        assert syms[name] == off, name
    assert syms["stack_end"] == purgatory.SIZE


def test_parameter_block():
    b = purgatory.build(0x2F000200, 0x2FE00000, 0x2FE01234)
    assert len(b) == purgatory.SIZE
    assert struct.unpack_from("<QQQQ", b, 8) == (0x2F000200, 0x2FE00000, 0x2FE01234, 0)
    assert b[:2] == b"\xeb\x78"  # jmp start
    assert struct.unpack_from("<QQQ", b, 0x28) == (0, 0, 0)  # no backup copy unless asked


def test_backup_parameters():
    """A crash image's backup copy (src, dst, length) lands in the block the code reads (0x28..0x3f)."""
    b = purgatory.build(0x2F000200, 0x2FE00000, 0, backup=(0, 0x2FF00000, 0x9F000))
    assert struct.unpack_from("<QQQ", b, purgatory.OFF_BACKUP_SRC) == (0, 0x2FF00000, 0x9F000)
    with pytest.raises(ValueError, match="multiple of 8"):
        purgatory.build(0, 0, 0, backup=(0, 0x1000, 12))
