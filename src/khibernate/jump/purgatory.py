"""The purgatory: assembled bytes of purgatory.S carried in the package, and the parameter block the loader fills.

``build(kernel_entry, boot_params, entry_digits)`` returns the segment content; ``assemble()`` rebuilds the bytes
from purgatory.S with binutils (tests compare the two).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from khibernate.layout import Layout

SOURCE = Path(__file__).with_name("purgatory.S")

# `as --64 purgatory.S && objcopy -O binary -j .text`: the code part; the rest up to SIZE is the zeroed stack.
CODE = bytes.fromhex(
    "eb78660f1f44000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000ffff0000009aaf00ffff00000092cf00"
    "1f00000000000000000030313233343536373839616263646566fafc488b042448890599ffffff488d25a2020000488b"
    "0da3ffffff4885c97415488b3587ffffff488b3d88ffffff48c1e903f348a5488b3d62ffffff4885ff7425488d35a8ff"
    "ffff4883c70fb91000000089c283e20f8a1416881748c1e80448ffcfffc975eb488d0559ffffff48890574ffffff0f01"
    "156bffffffb8180000008ed88ec08ed08ee08ee8488d05050000006a105048cb488b35f9feffff488b05eafeffff31db"
    "31ed31ffffe0662e0f1f84"
)
SIZE = 0x330

# the parameter block at the start of purgatory.S (after its 8-byte jump): filled in by build()
PARAMS = Layout("purgatory parameters", "<", [
    ("_jump", "8x"), ("kernel_entry", "Q"), ("boot_params", "Q"), ("entry_digits", "Q"), ("jump_back_entry", "Q"),
    ("backup_src", "Q"), ("backup_dst", "Q"), ("backup_len", "Q")])
OFF_KERNEL_ENTRY = PARAMS.offsets["kernel_entry"]
OFF_BOOT_PARAMS = PARAMS.offsets["boot_params"]
OFF_ENTRY_DIGITS = PARAMS.offsets["entry_digits"]
OFF_JUMP_BACK_ENTRY = PARAMS.offsets["jump_back_entry"]
OFF_BACKUP_SRC = PARAMS.offsets["backup_src"]
OFF_BACKUP_DST = PARAMS.offsets["backup_dst"]
OFF_BACKUP_LEN = PARAMS.offsets["backup_len"]
SYMBOLS = {"purgatory_start": 0, "kernel_entry": OFF_KERNEL_ENTRY, "boot_params": OFF_BOOT_PARAMS,
           "entry_digits": OFF_ENTRY_DIGITS, "jump_back_entry": OFF_JUMP_BACK_ENTRY, "backup_src": OFF_BACKUP_SRC,
           "backup_dst": OFF_BACKUP_DST, "backup_len": OFF_BACKUP_LEN}

JUMP_BACK_PARAM = "kexec_jump_back_entry=0x"
JUMP_BACK_PLACEHOLDER = JUMP_BACK_PARAM + "0" * 16


def image() -> bytes:
    """The carried purgatory, SIZE bytes, parameter block zero."""
    return CODE.ljust(SIZE, b"\0")


def build(kernel_entry: int, boot_params: int, entry_digits: int,
          backup: tuple[int, int, int] | None = None) -> bytes:
    """The purgatory segment content with its parameter block filled in (entry_digits 0: do not write the entry;
    backup = (src, dst, length), length a multiple of 8: the copy a crash image makes before the kernel starts)."""
    blob = bytearray(image())
    for name, value in (("kernel_entry", kernel_entry), ("boot_params", boot_params), ("entry_digits", entry_digits)):
        PARAMS.set(blob, name, value)
    if backup is not None:
        src, dst, length = backup
        if length % 8:
            raise ValueError(f"backup length {length:#x} is not a multiple of 8")
        for name, value in (("backup_src", src), ("backup_dst", dst), ("backup_len", length)):
            PARAMS.set(blob, name, value)
    return bytes(blob)


def assemble(source: Path = SOURCE) -> tuple[bytes, dict[str, int]]:
    """(bytes, symbol offsets) of purgatory.S assembled with binutils `as` and `objcopy` (tests and maintenance)."""
    for tool in ("as", "objcopy", "nm"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"binutils `{tool}` not found")
    with tempfile.TemporaryDirectory() as d:
        obj, binf = Path(d, "p.o"), Path(d, "p.bin")
        subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binf)], check=True,
                       capture_output=True)
        nm = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
        syms = {parts[2]: int(parts[0], 16) for parts in (line.split() for line in nm.splitlines()) if len(parts) == 3}
        return binf.read_bytes(), syms


if __name__ == "__main__":
    blob, syms = assemble()
    code = blob[:syms["stack"]].rstrip(b"\0")
    print("\n".join(f'    "{code[i:i + 48].hex()}"' for i in range(0, len(code), 48)))
