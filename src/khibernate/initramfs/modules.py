"""Kernel modules for a modular capture kernel (Debian's, unlike the test kernels): which ``.ko`` files the
target device needs, found from its sysfs driver chain and ``modules.dep``, put into the initramfs decompressed (busybox
``insmod`` reads plain ELF) and listed dependencies first in ``/etc/khibernate/modules`` for ``/init`` to load.

Pure: ``parse_modules_dep`` and ``load_order`` take text and names; ``device_modules`` and ``add_modules`` read sysfs
and ``/lib/modules`` at the edges.
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import zstandard

from khibernate.initramfs.errors import ModuleError as ModuleError

MODULE_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")
MODULE_LIST = "etc/khibernate/modules"  # guest path (no leading /) of the ordered list /init loads


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One line of modules.dep: the module's path (relative to /lib/modules/KVER) and its dependencies' names."""

    path: str
    deps: tuple[str, ...]


def module_name(path: str) -> str:
    """``kernel/drivers/block/virtio_blk.ko.zst`` → ``virtio_blk`` (dashes become underscores, as modprobe does)."""
    base = os.path.basename(path)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    else:
        raise ModuleError(f"{path!r} is not a kernel module file (.ko, .ko.xz, .ko.zst or .ko.gz)")
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, ModuleEntry]:
    """Module name → entry, from modules.dep (``path: dep-path dep-path ...``); ModuleError on a malformed line."""
    out: dict[str, ModuleEntry] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ModuleError(f"modules.dep line {n} has no ':' ({line[:80]!r}); run depmod to rebuild it")
        out[module_name(path.strip())] = ModuleEntry(path.strip(), tuple(module_name(d) for d in deps.split()))
    return out


def load_order(dep: dict[str, ModuleEntry], wanted: Iterable[str]) -> list[str]:
    """The wanted modules and everything they depend on, each once, dependencies before their users."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ModuleError(f"modules.dep has a dependency loop: {' -> '.join((*chain, name))}; run depmod")
        if name not in dep:
            raise ModuleError(f"module {name!r} is not in modules.dep"
                              + (f" (needed by {chain[-1]})" if chain else "")
                              + "; install the kernel's modules package or run depmod")
        state[name] = "visiting"
        for d in dep[name].deps:
            visit(d, (*chain, name))
        state[name] = "done"
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order


def device_modules(device: str, sys_root: str = "/sys") -> list[str]:
    """Names of the modules whose drivers serve ``device`` (a block device node), nearest first; [] when all are
    built in or the target is a regular file."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise ModuleError(f"target {device} does not exist: give the partition or disk (e.g. /dev/vdb)") from None
    if not stat.S_ISBLK(st.st_mode):
        return []
    node = Path(sys_root) / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if not node.exists():
        raise ModuleError(f"{device}: no {node} in sysfs; is {sys_root} mounted?")
    return driver_chain(node, sys_root)


def driver_chain(block_node: Path, sys_root: str = "/sys") -> list[str]:
    """Modules bound to the disk at ``block_node`` (a /sys/dev/block/M:m entry; a partition means its disk) and to
    every device above it in /sys/devices, nearest first."""
    node = block_node.resolve()
    if (node / "partition").exists():
        node = node.parent
    names: list[str] = []
    top = (Path(sys_root) / "devices").resolve()
    d: Path | None = (node / "device").resolve() if (node / "device").exists() else None
    while d is not None and d != top and top in d.parents:
        module = d / "driver" / "module"
        if module.exists():
            name = module.resolve().name
            if name not in names:
                names.append(name)
        d = d.parent
    return names


class _Tree(Protocol):
    def add_data(self, guest: str, data: bytes, perm: int = 0o644) -> None: ...


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed from .zst, .xz or .gz."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zstandard.ZstdError) as e:
        raise ModuleError(f"{path}: cannot decompress ({e}); reinstall the kernel's modules package") from None
    return data


def add_modules(tree: _Tree, kernel_release: str, names: Iterable[str],
                modules_root: Path = Path("/lib/modules")) -> list[str]:
    """Put ``names`` and their dependencies for ``kernel_release`` into ``tree`` plus the ordered list /init loads;
    returns the load order ([] when nothing is wanted). ModuleError names what is missing."""
    wanted = list(names)
    if not wanted:
        return []
    base = modules_root / kernel_release
    dep_file = base / "modules.dep"
    if not dep_file.is_file():
        raise ModuleError(f"the capture kernel {kernel_release} needs modules ({', '.join(wanted)}) but "
                          f"{dep_file} does not exist: install its modules package, or give a kernel with those "
                          "drivers built in")
    dep = parse_modules_dep(dep_file.read_text())
    order = load_order(dep, wanted)
    listed = []
    for name in order:
        src = base / dep[name].path
        if not src.is_file():
            raise ModuleError(f"{src} (module {name}) is listed in modules.dep but missing; reinstall the kernel's "
                              "modules package")
        guest = f"lib/modules/{kernel_release}/{name}.ko"
        tree.add_data(guest, read_module(src))
        listed.append("/" + guest)
    tree.add_data(MODULE_LIST, ("\n".join(listed) + "\n").encode())
    return order
