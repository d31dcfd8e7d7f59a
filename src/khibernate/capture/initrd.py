"""`khibernate capture build`: the capture initramfs for this machine, built by khibernate.initramfs, cached by key.

The cache key hashes everything the archive is made of (khibernate's sources and the initramfs/ content by
content, the interpreter and host binaries by path, size and mtime), so a cached file is reused exactly while
nothing it contains has changed.  The build itself is deterministic (sorted entries, zero mtimes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from khibernate.cache import cache_root

CACHE = cache_root() / "capture"


def cache_key(modules: tuple[str, list[str]] | None = None) -> str:
    """Hash of what the capture initramfs would contain (``modules``: kernel release and the modules it carries)."""
    from khibernate.initramfs import build as builder

    h = hashlib.sha256(b"capture-initrd-v1\0")
    builder.hash_inputs(h)
    if modules is not None:
        h.update(f"modules\0{modules[0]}\0{','.join(modules[1])}".encode())
    return h.hexdigest()[:16]


def needed_modules(target: str | None, kernel_release: str | None) -> tuple[str, list[str]] | None:
    """(release, names) of the modules the capture kernel needs to write ``target``; None when the drivers are
    built in, or the release is unknown and nothing is modular here."""
    from khibernate.initramfs.modules import device_modules

    release = kernel_release or os.uname().release
    names = device_modules(target) if target else []
    if target and Path(target).is_file():  # a store file: the disk under it, and device-mapper for its extents
        from khibernate.store.fiemap import device_of

        names = device_modules(device_of(target)) + (["dm_mod"] if dm_is_module(release) else [])
    if not names:
        return None
    return release, names


DMSETUP_CANDIDATES = ("/usr/sbin/dmsetup", "/sbin/dmsetup")


def file_target_tools() -> list[tuple[Path, str]]:
    """What the capture kernel needs to reach a store file: dmsetup (its libraries come along); InitramfsError
    naming the package when it is not installed."""
    from khibernate.initramfs.build import InitramfsError

    for p in DMSETUP_CANDIDATES:
        if Path(p).is_file():
            return [(Path(p), "usr/sbin/dmsetup")]
    raise InitramfsError("a store file needs dmsetup in the capture environment: apt-get install dmsetup")


def dm_is_module(release: str, modules_root: Path = Path("/lib/modules")) -> bool:
    """Whether device-mapper is a module (dm-mod.ko in modules.dep) of kernel ``release`` rather than built in."""
    dep = modules_root / release / "modules.dep"
    return dep.is_file() and "/dm-mod.ko" in dep.read_text()


def ensure(output: Path | None = None, log: object = None, target: str | None = None,
           kernel_release: str | None = None) -> tuple[Path, bool]:
    """(path, reused): the cached capture initramfs, built first if absent; copied to ``output`` if given.  With a
    ``target`` whose drivers are modules, those (for ``kernel_release``, default the running kernel's) go in too."""
    from khibernate.initramfs import build as builder

    modules = needed_modules(target, kernel_release)
    extra = file_target_tools() if target and Path(target).is_file() else []
    key = cache_key(modules) + ("-dm" if extra else "")
    path = CACHE / f"capture-{key}.cpio.zst"
    reused = path.is_file()
    if not reused:
        CACHE.mkdir(parents=True, exist_ok=True)
        builder.build(path, compression="zstd", modules=modules, extra=extra)
    if output is not None:
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(output)
        return output, reused
    return path, reused
