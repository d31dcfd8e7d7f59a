"""The TPM 2.0 key source: a random secret sealed by the TPM to a PCR policy of the boot chain, its sealed object
kept in the key slot (``khibernate.seal.tpmblob``); ``KEK = HKDF-SHA256(secret, slot salt, "khibernate tpm")``.

The TPM is reached through tpm2-tools (one command per step) over a TCTI: ``device:/dev/tpmrm0`` (the kernel's
resource manager) unless ``$KHIBERNATE_TPM_TCTI`` names another (tests: ``swtpm:host=127.0.0.1,port=N``).  The
sealed object is a child of the owner hierarchy's ECC P-256 storage primary key, made again from the TPM's seed for
each use: nothing is stored in the TPM.  Secrets cross pipes only (stdin of tpm2_create, stdout of tpm2_unseal);
the object's files live in a private temporary directory removed after.  Transient objects and sessions are
flushed after each step (swtpm and a TPM without resource manager hold only three).

What the TPM releases is a candidate: the store key it unwraps is accepted only through the slot's AEAD tag and
the keyring's key id (``khibernate.seal.keysource.open_keyring``), so a blob sealed by anyone else opens nothing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from khibernate.seal import keyring
from khibernate.seal.cipher import KEY_BYTES
from khibernate.seal.errors import TpmError, TpmForeignError, TpmPolicyError, TpmUnavailableError, WrongKeyError
from khibernate.seal.keyring import KeySlot
from khibernate.seal.tpmblob import PCR_BYTES, TpmSealed

DEFAULT_PCRS = (0, 7)  # firmware code, Secure Boot state and keys (docs/sealed.md: "Which PCRs")
DEFAULT_TCTI = "device:/dev/tpmrm0"
TCTI_ENV = "KHIBERNATE_TPM_TCTI"
ATTRIBUTES = "fixedtpm|fixedparent|adminwithpolicy|noda"
RC_POLICY_FAIL = 0x99D  # TPM_RC_POLICY_FAIL in session 1
TOOL_SECONDS = 60.0
SECRET_BYTES = 32
_RC = re.compile(r"ErrorCode \(0x([0-9a-fA-F]+)\)")
_NO_TCTI = ("Could not load tcti", "Cannot connect", "Failed to instantiate TCTI")


def tcti_from_env() -> str:
    """The TCTI to reach the TPM by: ``$KHIBERNATE_TPM_TCTI``, else the kernel's resource manager."""
    return os.environ.get(TCTI_ENV) or DEFAULT_TCTI


def pcr_list(pcrs: Sequence[int]) -> str:
    """tpm2-tools' PCR selection of the SHA-256 bank: "sha256:0,7"."""
    return "sha256:" + ",".join(map(str, pcrs))


class Tpm2Tools:
    """The TPM behind ``tcti``, asked through tpm2-tools; TpmUnavailableError when the tools or the TPM are
    missing."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        if shutil.which("tpm2_unseal") is None:
            raise TpmUnavailableError("tpm2-tools is not installed (`apt-get install tpm2-tools`): the TPM cannot be "
                                      "asked; use --key-file or --passphrase-file")
        kind, _, dev = tcti.partition(":")
        if kind == "device" and not os.path.exists(dev or "/dev/tpm0"):
            raise TpmUnavailableError(f"no TPM: {dev or '/dev/tpm0'} does not exist (this machine has no TPM 2.0, "
                                      "or its driver, tpm_tis or tpm_crb, is not loaded); use --key-file or "
                                      "--passphrase-file")

    def run(self, args: Sequence[str], step: str, stdin: bytes = b"") -> bytes:
        """stdout of one tpm2-tools command; TpmError (with the TPM's response code in ``rc``) when it fails."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            p = subprocess.run(list(args), input=stdin, capture_output=True, env=env, timeout=TOOL_SECONDS,
                               check=False)
        except subprocess.TimeoutExpired:
            raise TpmError(f"the TPM at {self.tcti} did not answer {args[0]} within {TOOL_SECONDS:g} s") from None
        if p.returncode == 0:
            return p.stdout
        err = p.stderr.decode(errors="replace")
        if any(s in err for s in _NO_TCTI):
            raise TpmUnavailableError(f"no TPM answers at {self.tcti} ({_last_error(err)}); use --key-file or "
                                      "--passphrase-file")
        m = _RC.search(err)
        raise TpmError(f"the TPM failed to {step}: {_last_error(err)}", int(m.group(1), 16) if m else None)

    def flush(self) -> None:
        """Flush the transient objects and sessions this use loaded (failures ignored: best effort)."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        for what in ("-t", "-s"):
            subprocess.run(["tpm2_flushcontext", what], capture_output=True, env=env, timeout=TOOL_SECONDS,
                           check=False)

    def pcr_values(self, pcrs: Sequence[int], work: Path) -> dict[int, bytes]:
        """The SHA-256 bank's values of ``pcrs`` now."""
        out = work / "pcrs.bin"
        self.run(["tpm2_pcrread", "-Q", pcr_list(pcrs), "-o", str(out)], "read the PCRs")
        raw = out.read_bytes()
        if len(raw) != len(pcrs) * PCR_BYTES:
            raise TpmError(f"tpm2_pcrread gave {len(raw)} bytes for PCRs {pcr_list(pcrs)}: the TPM has no SHA-256 "
                           "bank for them")
        return {p: raw[i * PCR_BYTES:(i + 1) * PCR_BYTES] for i, p in enumerate(sorted(pcrs))}

    def _primary(self, work: Path) -> Path:
        ctx = work / "primary.ctx"
        self.run(["tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc", "-c", str(ctx)], "make its storage key "
                 "(is the owner hierarchy password-protected?)")
        self.flush()
        return ctx

    def seal(self, secret: bytes, pcrs: Sequence[int]) -> TpmSealed:
        """``secret`` sealed to the policy "``pcrs`` (SHA-256) hold what they hold now"."""
        with tempfile.TemporaryDirectory(prefix="khibernate-tpm-") as d:
            work = Path(d)
            try:
                values = self.pcr_values(pcrs, work)
                primary = self._primary(work)
                self.run(["tpm2_createpolicy", "-Q", "--policy-pcr", "-l", pcr_list(pcrs), "-f",
                          str(work / "pcrs.bin"), "-L", str(work / "policy")], "make the PCR policy")
                self.run(["tpm2_create", "-Q", "-C", str(primary), "-L", str(work / "policy"), "-i", "-", "-a",
                          ATTRIBUTES, "-u", str(work / "pub"), "-r", str(work / "priv")], "seal the key", secret)
                return TpmSealed(tuple(sorted(pcrs)), tuple(values[p] for p in sorted(pcrs)),
                                 (work / "pub").read_bytes(), (work / "priv").read_bytes())
            finally:
                self.flush()

    def unseal(self, sealed: TpmSealed) -> bytes:
        """The secret of ``sealed``; TpmForeignError when this TPM cannot load it, TpmPolicyError when its PCRs
        hold other values than at sealing time."""
        with tempfile.TemporaryDirectory(prefix="khibernate-tpm-") as d:
            work = Path(d)
            (work / "pub").write_bytes(sealed.public)
            (work / "priv").write_bytes(sealed.private)
            try:
                primary = self._primary(work)
                try:
                    self.run(["tpm2_load", "-Q", "-C", str(primary), "-u", str(work / "pub"), "-r",
                              str(work / "priv"), "-c", str(work / "obj.ctx")], "load the sealed key")
                except TpmUnavailableError:
                    raise
                except TpmError as e:
                    raise TpmForeignError(f"this TPM ({self.tcti}) cannot load the key slot's sealed key: another "
                                          f"TPM sealed it, or this one was cleared since ({e})") from None
                self.flush()
                try:
                    return self.run(["tpm2_unseal", "-c", str(work / "obj.ctx"), "-p",
                                     "pcr:" + pcr_list(sealed.pcrs)], "unseal the key")
                except TpmError as e:
                    if e.rc != RC_POLICY_FAIL:
                        raise
                    self.flush()
                    raise self._policy_error(sealed, work) from None
            finally:
                self.flush()

    def _policy_error(self, sealed: TpmSealed, work: Path) -> TpmPolicyError:
        try:
            changed = sealed.changed(self.pcr_values(sealed.pcrs, work))
        except TpmError:
            changed = []
        which = ",".join(map(str, changed or sealed.pcrs))
        return TpmPolicyError(f"the TPM does not release the key: the boot chain changed since target init (PCRs "
                              f"{which} {'changed' if changed else 'of ' + pcr_list(sealed.pcrs)}; TPM error "
                              f"{RC_POLICY_FAIL:#x}, a policy check failed)")


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = ([ln for ln in lines if ln.startswith("ERROR: ") and "Unable to run" not in ln]
            or [ln for ln in lines if ln.startswith("ERROR:")])
    return (errs[0] if errs else lines[-1] if lines else "no message").removeprefix("ERROR: ")


class TpmKey:
    """The TPM 2.0 as a key source (``khibernate.seal.keysource.KeySource``): ``new_slot`` seals a fresh secret to
    ``pcrs``, ``kek`` asks the TPM to release it under the slot's recorded PCR list."""

    kind = keyring.KIND_TPM

    def __init__(self, pcrs: Sequence[int] = DEFAULT_PCRS, tcti: str | None = None):
        self.tcti = tcti or tcti_from_env()
        self.pcrs = tuple(sorted(set(pcrs)))
        self.description = f"TPM ({self.tcti})"
        self._fresh: dict[bytes, bytes] = {}  # salt -> secret of the slots this object made (sealing: no unseal)

    def new_slot(self) -> KeySlot:
        secret = secrets.token_bytes(SECRET_BYTES)
        sealed = Tpm2Tools(self.tcti).seal(secret, self.pcrs)
        slot = KeySlot(kind=self.kind, kdf=keyring.KDF_TPM2_PCR, salt=secrets.token_bytes(32), blob=sealed.pack())
        self._fresh[slot.salt] = secret
        return slot

    def kek(self, slot: KeySlot) -> bytes:
        if slot.kdf != keyring.KDF_TPM2_PCR or not slot.blob:
            raise WrongKeyError(f"a TPM key slot with KDF {slot.kdf} and {len(slot.blob)} bytes of sealed key: not "
                                "what khibernate writes; the key slot is damaged")
        secret = self._fresh.get(slot.salt)
        if secret is None:
            secret = Tpm2Tools(self.tcti).unseal(TpmSealed.unpack(slot.blob))
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=slot.salt,
                    info=b"khibernate tpm").derive(secret)
