"""The purgatory: assembled bytes of purgatory.S carried in the package, and the parameter block the loader fills.

``build(kernel_entry, boot_params, entry_digits)`` returns the segment content; ``assemble()`` rebuilds the bytes
from purgatory.S with binutils (tests compare the two).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("purgatory.S")

# `as --64 purgatory.S && objcopy -O binary -j .text`: the code part; the rest up to SIZE is the zeroed stack.
CODE = bytes.fromhex(
    "eb68660f1f44000000000000000000000000000000000000000000000000000000000000000000000f1f840000000000"
    "00000000000000000000000000000000ffff0000009aaf00ffff00000092cf001f000000000000000000303132333435"
    "36373839616263646566fafc488b0424488905a9ffffff488d2582020000488b3d93ffffff4885ff7425488d35c9ffff"
    "ff4883c70fb91000000089c283e20f8a1416881748c1e80448ffcfffc975eb488d057affffff48890595ffffff0f0115"
    "8cffffffb8180000008ed88ec08ed08ee08ee8488d05050000006a105048cb488b352affffff488b051bffffff31db31"
    "ed31ffffe066662e0f1f84"
)
SIZE = 0x300

OFF_KERNEL_ENTRY = 0x08
OFF_BOOT_PARAMS = 0x10
OFF_ENTRY_DIGITS = 0x18
OFF_JUMP_BACK_ENTRY = 0x20
SYMBOLS = {"purgatory_start": 0, "kernel_entry": OFF_KERNEL_ENTRY, "boot_params": OFF_BOOT_PARAMS,
           "entry_digits": OFF_ENTRY_DIGITS, "jump_back_entry": OFF_JUMP_BACK_ENTRY}

JUMP_BACK_PARAM = "kexec_jump_back_entry=0x"
JUMP_BACK_PLACEHOLDER = JUMP_BACK_PARAM + "0" * 16


def image() -> bytes:
    """The carried purgatory, SIZE bytes, parameter block zero."""
    return CODE.ljust(SIZE, b"\0")


def build(kernel_entry: int, boot_params: int, entry_digits: int) -> bytes:
    """The purgatory segment content with its parameter block filled in (entry_digits 0: do not write the entry)."""
    blob = bytearray(image())
    struct.pack_into("<QQQ", blob, OFF_KERNEL_ENTRY, kernel_entry, boot_params, entry_digits)
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
    blob, _ = assemble()
    code = blob[:0x100].rstrip(b"\0")
    print("\n".join(f'    "{code[i:i + 48].hex()}"' for i in range(0, len(code), 48)))
