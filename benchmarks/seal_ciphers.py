"""AEAD throughput on 1 MiB blocks, the size of a .khi block: AES-256-GCM and ChaCha20-Poly1305 (python
`cryptography`, OpenSSL inside) against XChaCha20-Poly1305 (PyNaCl, libsodium), seal and open, same buffers, same
run, with zstd's decompression of the same frame for scale.  The data is a zstd level-1 frame of a real-looking
page mix (what a sealed image encrypts), so the figures are for compressed blocks; AEAD speed does not depend on
the bytes anyway.  Run it in the capture kernel too (a VM's guest Python): under TCG the ordering changes.

    python3 benchmarks/seal_ciphers.py [--mib 256] [--repeat 3]

Prints one line per cipher and direction: MB/s (best of --repeat runs over --mib MiB).  A cipher whose library is
not installed is reported as such (PyNaCl is not a dependency of khibernate; install it to compare).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

BLOCK = 1 << 20
AD = bytes(48)


def _ciphers() -> dict[str, tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes], bytes], int]]:
    """name -> (seal(nonce, data), open(nonce, sealed), nonce size)."""
    out: dict[str, tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes], bytes], int]] = {}
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        gcm = AESGCM(os.urandom(32))
        out["AES-256-GCM (cryptography)"] = (lambda n, d: gcm.encrypt(n, d, AD), lambda n, c: gcm.decrypt(n, c, AD),
                                              12)
        cc = ChaCha20Poly1305(os.urandom(32))
        out["ChaCha20-Poly1305 (cryptography)"] = (lambda n, d: cc.encrypt(n, d, AD),
                                                   lambda n, c: cc.decrypt(n, c, AD), 12)
    except ImportError:
        print("cryptography: not installed")
    try:
        from nacl.bindings import (
            crypto_aead_xchacha20poly1305_ietf_decrypt,
            crypto_aead_xchacha20poly1305_ietf_encrypt,
        )

        k = os.urandom(32)
        out["XChaCha20-Poly1305 (PyNaCl)"] = (
            lambda n, d: crypto_aead_xchacha20poly1305_ietf_encrypt(d, AD, n, k),
            lambda n, c: crypto_aead_xchacha20poly1305_ietf_decrypt(c, AD, n, k), 24)
    except ImportError:
        print("PyNaCl: not installed (pip install pynacl to compare XChaCha20-Poly1305)")
    return out


def _sample() -> bytes:
    """One 1 MiB-uncompressed block as a .khi stores it: a zstd frame of mixed pages (text, zeros, random)."""
    import zstandard

    pages = []
    for i in range(256):
        kind = i % 4
        pages.append(os.urandom(4096) if kind == 0 else bytes(4096) if kind == 1 else
                     (b"kernel text and data %d " % i * 200)[:4096] if kind == 2 else os.urandom(2048) + bytes(2048))
    return zstandard.ZstdCompressor(level=1).compress(b"".join(pages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="uncompressed MiB per run (one block per MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    frame = _sample()
    print(f"block: 1 MiB of pages -> {len(frame)} byte zstd frame; {a.mib} blocks per run, best of {a.repeat}")
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    best = float("inf")
    for _ in range(a.repeat):  # for scale: what a restore does to every block anyway
        t0 = time.perf_counter()
        for _ in range(a.mib):
            dctx.decompress(frame)
        best = min(best, time.perf_counter() - t0)
    print(f"{'zstd decompress (for scale)':34s}                 open {len(frame) * a.mib / 1e6 / best:7.0f} MB/s  "
          "(of compressed bytes)")
    for name, (seal, open_, nsize) in _ciphers().items():
        nonces = [i.to_bytes(nsize, "little") for i in range(a.mib)]
        best_s = best_o = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            sealed = [seal(n, frame) for n in nonces]
            t1 = time.perf_counter()
            for n, c in zip(nonces, sealed, strict=True):
                open_(n, c)
            t2 = time.perf_counter()
            best_s, best_o = min(best_s, t1 - t0), min(best_o, t2 - t1)
        mb = len(frame) * a.mib / 1e6
        print(f"{name:34s} seal {mb / best_s:7.0f} MB/s  open {mb / best_o:7.0f} MB/s  (of compressed bytes)")


if __name__ == "__main__":
    main()
