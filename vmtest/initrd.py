"""The guest initramfs for VM tests, built by khibernate's own builder and cached by content hash.

Layout handed to QEMU ``-initrd`` (the kernel unpacks concatenated segments in order):
  1. an uncompressed cpio with the test's extra files, ``/boot/bzImage`` and ``/boot/initrd.img``;
  2. the cached compressed payload (busybox, /init, kexec, Python + khibernate).
``/boot/initrd.img`` is the payload for a second kernel: extra files + the same cached payload, without /boot;
``/boot/initrd-nopy.img`` is the same without Python (busybox, /init, agent, kexec: a faster boot under TCG when a
test's second kernel needs only a shell).
For a modular kernel (``vmtest.kernel`` flavour ``6.12-distro``) the extra files also carry GUEST_MODULES and
their dependencies from the kernel's modules.dep, decompressed, with the ordered list /init loads before anything
else (``/etc/khibernate/modules``, as ``khibernate capture build --target`` writes it for a capture kernel).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from khibernate.cache import cache_root
from khibernate.initramfs import build as builder
from khibernate.initramfs import cpio

REPO = Path(__file__).resolve().parent.parent
CACHE = cache_root() / "initramfs"
COMPRESSION = "zstd"
# what the guest needs from a modular kernel: its virtio disks, and ext4 (crypto's crc32c first: ext4 and jbd2 ask
# for it by name at mount time, a soft dependency that modules.dep does not list)
GUEST_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def _builder_hash() -> str:
    """Hash of the builder's own modules: the code that is running must be the code the cache key describes."""
    h = hashlib.sha256()
    for p in sorted(Path(builder.__file__).resolve().parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


BUILDER_AT_IMPORT = _builder_hash()


def payload_key(python: bool = True) -> str:
    """Hash of everything the payload is made of (khibernate sources by content, host binaries by stat)."""
    h = hashlib.sha256(b"payload-v1\0" + COMPRESSION.encode() + (b"py" if python else b"nopy"))
    builder.hash_inputs(h)
    return h.hexdigest()[:16]


def payload(log=print, python: bool = True) -> Path:
    """The cached compressed payload initramfs (built on first use, ~20 s with Python)."""
    key = payload_key(python)
    path = CACHE / f"payload-{key}.cpio.{COMPRESSION}"
    if _builder_hash() != BUILDER_AT_IMPORT:
        # the builder was edited after this process imported it: build, but never cache, with the old code
        path = CACHE / f"uncached-{os.getpid()}-{key}.cpio.{COMPRESSION}"
        log("[vmtest] khibernate/initramfs changed since this process started: building an uncached payload")
    elif path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report = builder.build(path, compression=COMPRESSION, python=python)
    log(f"[vmtest] built guest initramfs in {time.monotonic() - t0:.1f} s: {report.summary()}")
    for old in CACHE.glob(f"*-*.cpio.{COMPRESSION}"):
        if old != path and time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return path


def guest_initrd(out: Path, bzimage: Path, extra_files: Iterable[tuple[Path | str, str]] = (), log=print,
                 modules: tuple[Path, str] | None = None) -> Path:
    """Write the complete -initrd for a VM (see module docstring) to out and return it.  ``modules``: (the
    kernel's /lib/modules, its release) for a modular kernel, whose GUEST_MODULES /init must load."""
    base = payload(log).read_bytes()
    extra = builder.Tree()
    for src, dst in extra_files:
        extra.add_file(Path(src), dst)
    extra.add_libraries()
    if modules is not None:
        from khibernate.initramfs.modules import add_modules

        add_modules(extra, modules[1], GUEST_MODULES, modules_root=modules[0])
    extra_cpio = cpio.write(extra.entries.values()) if extra.entries else b""
    outer = builder.Tree(dict(extra.entries))
    outer.add_data("boot/bzImage", Path(bzimage).read_bytes(), 0o644)
    outer.add_data("boot/initrd.img", extra_cpio + base, 0o644)
    outer.add_data("boot/initrd-nopy.img", extra_cpio + payload(log, python=False).read_bytes(), 0o644)
    out.write_bytes(cpio.write(outer.entries.values()) + base)
    return out
