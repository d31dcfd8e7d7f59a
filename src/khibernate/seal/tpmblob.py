"""The TPM slot's blob, byte by byte: what a key slot of kind 3 (``khibernate.seal.keyring``, version 2) carries
so the TPM can release its KEK again.  Reader and writer side by side, fields declared once by name; pure.

``khi_tpm_sealed``: the PCR bank (TPM_ALG_SHA256), a mask of the PCRs the policy covers (bit n: PCR n), the sizes of
the TPM's public and private areas (TPM2B, as tpm2_create writes them), then the PCR values at sealing time (32 bytes
each, ascending PCR order: only to say which PCR changed when the TPM refuses; the TPM checks its own), the public
area and the private area.  Nothing in it is secret: the private area is encrypted by the TPM's storage key.
"""

from __future__ import annotations

import dataclasses

from khibernate.layout import Layout
from khibernate.seal.errors import KeyringError

ALG_SHA256 = 0x000B
PCR_BYTES = 32
NR_PCRS = 24
MAX_AREA = 512
HEAD = Layout("khi_tpm_sealed", "<", [("bank", "H"), ("reserved", "H"), ("pcr_mask", "I"), ("public_size", "H"),
                                       ("private_size", "H")])
assert HEAD.size == 12


def parse_pcrs(text: str) -> tuple[int, ...]:
    """PCR numbers from "0,7" (ascending, each once); ValueError naming what is wrong."""
    try:
        pcrs = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ValueError(f"PCR list {text!r}: give numbers 0..{NR_PCRS - 1} separated by commas, like 0,7") from None
    if not pcrs or not all(0 <= p < NR_PCRS for p in pcrs):
        raise ValueError(f"PCR list {text!r}: give numbers 0..{NR_PCRS - 1} separated by commas, like 0,7")
    return tuple(pcrs)


@dataclasses.dataclass(frozen=True)
class TpmSealed:
    """A KEK sealed by the TPM to the policy "these SHA-256 PCRs hold these values"."""

    pcrs: tuple[int, ...]
    pcr_values: tuple[bytes, ...]
    public: bytes
    private: bytes

    def pack(self) -> bytes:
        mask = sum(1 << p for p in self.pcrs)
        return (HEAD.pack(bank=ALG_SHA256, pcr_mask=mask, public_size=len(self.public),
                          private_size=len(self.private))
                + b"".join(self.pcr_values) + self.public + self.private)

    @classmethod
    def unpack(cls, data: bytes, what: str = "TPM key slot") -> TpmSealed:
        """The sealed object in ``data`` (exactly); KeyringError naming ``what`` when it is not one."""
        f = HEAD.unpack(data, error=KeyringError, what=what)
        if f["bank"] != ALG_SHA256 or f["reserved"] or not 0 < f["pcr_mask"] < 1 << NR_PCRS:
            raise KeyringError(f"{what}: PCR bank {f['bank']:#x}, mask {f['pcr_mask']:#x}: not what khibernate "
                               "seals; the key slot is damaged")
        pcrs = tuple(p for p in range(NR_PCRS) if f["pcr_mask"] >> p & 1)
        pub, priv = f["public_size"], f["private_size"]
        at = HEAD.size + len(pcrs) * PCR_BYTES
        if not (0 < pub <= MAX_AREA and 0 < priv <= MAX_AREA) or at + pub + priv != len(data):
            raise KeyringError(f"{what}: {len(data)} bytes do not hold {len(pcrs)} PCR values, a {pub}-byte public "
                               f"and a {priv}-byte private area; the key slot is damaged")
        values = tuple(data[HEAD.size + i * PCR_BYTES:HEAD.size + (i + 1) * PCR_BYTES] for i in range(len(pcrs)))
        return cls(pcrs, values, data[at:at + pub], data[at + pub:at + pub + priv])

    def changed(self, now: dict[int, bytes]) -> list[int]:
        """The PCRs whose value ``now`` differs from the one at sealing time."""
        return [p for p, v in zip(self.pcrs, self.pcr_values, strict=True) if now.get(p) != v]
