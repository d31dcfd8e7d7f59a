"""Assemble the capture environment's initramfs: busybox, /init and scripts, kexec, Python + khibernate, extra files.

``Tree`` collects guest paths; every ELF file added through it gets its loader and libraries (``collect.resolve``)
when the archive is made.  The content of ``/init`` and its helpers lives in the repository's top-level
``initramfs/`` folder (shipped inside the package as ``khibernate/initramfs/content``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from khibernate.initramfs import collect, cpio
from khibernate.initramfs import python as pybundle
from khibernate.initramfs.errors import InitramfsError as InitramfsError

CONTENT_DIR = Path(__file__).resolve().parent / "content"
HOST_INTEGRATION = ("initramfs-tools", "systemd")  # initramfs/ files for the host's own boot, not for the guest
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
KEXEC_CANDIDATES = ("/usr/sbin/kexec", "/sbin/kexec")
BLKID_CANDIDATES = ("/usr/sbin/blkid", "/sbin/blkid")


def hash_tree(h: hashlib._Hash, root: Path) -> None:
    """Feed ``h`` with every file below ``root`` (relative path + content, sorted; caches and .pyc left out)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
        for n in sorted(filenames):
            if not n.endswith(".pyc"):
                p = Path(dirpath) / n
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")


def hash_inputs(h: hashlib._Hash) -> None:
    """Feed ``h`` with what a Python initramfs is built from: khibernate's sources and initramfs/ by content, the
    interpreter and the host's busybox and kexec by path, size and mtime, the bundled packages by version (a cache
    key for a built initramfs)."""
    import sys

    import khibernate

    hash_tree(h, Path(khibernate.__file__).resolve().parent)
    hash_tree(h, CONTENT_DIR.resolve())
    exe = os.path.realpath(sys.executable)
    h.update(f"{exe}\0{sys.version}\0{khibernate.__file__}".encode())
    for p in (exe, *BUSYBOX_CANDIDATES, *KEXEC_CANDIDATES, *BLKID_CANDIDATES):
        if os.path.exists(p):
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    import importlib.metadata as md

    for dist in ("pyelftools", "zstandard", "cffi", "click", "pycparser", "mfusepy", "cryptography"):
        try:
            h.update(f"{dist}={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            pass
SKELETON_DIRS = ("dev", "proc", "sys", "tmp", "run", "root", "mnt", "etc", "var/tmp", "boot")


def _has_debug_sections(data: bytes) -> bool:
    try:
        return any(sec.name.startswith((".debug", ".zdebug")) for sec in ELFFile(io.BytesIO(data)).iter_sections())
    except ELFError:
        return False


def strip_debug(data: bytes) -> bytes:
    """ELF bytes without debug sections (binutils' strip --strip-debug); unchanged if strip is not installed."""
    strip = shutil.which("strip")
    if strip is None or not data.startswith(b"\x7fELF") or not _has_debug_sections(data):
        return data  # never rewrite files that carry no debug info (patchelf'ed wheel libraries break)
    with tempfile.TemporaryDirectory(prefix="khibernate-strip-") as d:
        src, dst = Path(d) / "in", Path(d) / "out"
        src.write_bytes(data)
        r = subprocess.run([strip, "--strip-debug", "-o", str(dst), str(src)], capture_output=True)
        return dst.read_bytes() if r.returncode == 0 and dst.is_file() else data


def _norm(guest: str) -> str:
    rel = os.path.normpath("/" + guest).lstrip("/")
    if not rel or rel == ".":
        raise InitramfsError(f"invalid guest path {guest!r}")
    return rel


@dataclasses.dataclass
class Tree:
    """The future initramfs: guest path -> cpio entry, plus the host ELF files whose libraries must come along."""

    entries: dict[str, cpio.Entry] = dataclasses.field(default_factory=dict)
    elf_files: list[Path] = dataclasses.field(default_factory=list)
    # host directory (realpath) -> guest directory of trees copied whole; libraries found inside them are the copies
    dir_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def guest_path(self, host: str) -> str:
        """Where host path lands in the guest: inside a copied tree if it lies in one, else at the same path."""
        for cand in (host, os.path.realpath(host)):
            for hdir, gdir in self.dir_map.items():
                if cand.startswith(hdir + "/"):
                    return gdir + cand[len(hdir):]
        return host

    def _put(self, entry: cpio.Entry) -> None:
        old = self.entries.get(entry.path)
        if old is not None and old.kind == "dir" and entry.kind != "dir":
            raise InitramfsError(f"/{entry.path} is a directory in the initramfs, cannot replace it by a {entry.kind}")
        if old is not None and old.kind == "dir":
            return
        self.entries[entry.path] = entry

    def add_dir(self, guest: str, perm: int = 0o755) -> None:
        self._put(cpio.Entry(_norm(guest), "dir", perm))

    def add_data(self, guest: str, data: bytes, perm: int = 0o644) -> None:
        if data.startswith(b"\x7fELF"):
            data = strip_debug(data)
        self._put(cpio.Entry(_norm(guest), "file", perm, data))

    def add_symlink(self, guest: str, target: str) -> None:
        self._put(cpio.Entry(_norm(guest), "symlink", 0o777, target.encode()))

    def add_chardev(self, guest: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._put(cpio.Entry(_norm(guest), "chardev", perm, b"", (major, minor)))

    def add_file(self, src: Path, guest: str, perm: int | None = None) -> None:
        """Copy a host file (following symlinks) or a whole directory; ELF files get their libraries later."""
        src = Path(src)
        if src.is_dir():
            for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
                dirnames.sort()
                rel = Path(dirpath).relative_to(src).as_posix()
                base = guest if rel == "." else f"{guest}/{rel}"
                self.add_dir(base)
                for n in sorted(filenames):
                    self.add_file(Path(dirpath) / n, f"{base}/{n}")
            return
        if not src.is_file():
            raise InitramfsError(f"cannot add {src}: no such file (check the --add SRC:DST argument)")
        data = src.read_bytes()
        if perm is None:
            perm = 0o755 if (os.stat(src).st_mode & 0o111 or data.startswith(b"#!")) else 0o644
        self.add_data(guest, data, perm)
        if collect.is_elf(src):
            self.elf_files.append(src)

    def add_libraries(self) -> None:
        """Add the loader and shared libraries of every ELF file added so far (at the paths the loader opens), and
        the plugins those libraries dlopen (collect.dlopened_plugins: OpenSSL's providers) with their libraries."""
        resolved = collect.resolve(self.elf_files)
        plugins = collect.dlopened_plugins([*self.elf_files, *resolved.values()])
        if plugins:
            resolved = {**collect.resolve([*self.elf_files, *plugins.values()]), **plugins}
        for wanted, host in sorted(resolved.items()):
            guest = _norm(self.guest_path(wanted))
            if guest not in self.entries or self.entries[guest].kind == "symlink":
                self.entries.pop(guest, None)
                self.add_data(guest, host.read_bytes(), 0o755)

    def archive(self, compression: str = "zstd") -> bytes:
        """The compressed newc archive of this tree (libraries resolved first)."""
        self.add_libraries()
        return cpio.compress(cpio.write(self.entries.values()), compression)

    def total_bytes(self) -> int:
        return sum(len(e.data) for e in self.entries.values() if e.kind == "file")


def _first_existing(candidates: Iterable[str], what: str, package: str) -> Path:
    for c in candidates:
        if Path(c).is_file():
            return Path(c)
    found = shutil.which(what)
    if found:
        return Path(found)
    raise InitramfsError(f"{what} not found (looked in {', '.join(candidates)}); install it: apt-get install {package}")


def add_skeleton(tree: Tree) -> None:
    """Directories and the /dev nodes the kernel needs before /init runs (devtmpfs comes later)."""
    for d in SKELETON_DIRS:
        tree.add_dir(d)
    tree.add_dir("tmp", 0o1777)
    tree.add_chardev("dev/console", 5, 1, 0o600)
    tree.add_chardev("dev/null", 1, 3, 0o666)
    tree.add_chardev("dev/ttyS0", 4, 64, 0o600)


def add_busybox(tree: Tree, busybox: Path | None = None) -> None:
    """A busybox binary and a symlink for each of its applets: Debian's busybox-static, or its dynamically linked
    busybox (a default install's), whose loader and libraries come along through the tree's ELF walk."""
    bb = busybox or _first_existing(BUSYBOX_CANDIDATES, "busybox", "busybox-static")
    try:
        listing = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise InitramfsError(f"{bb} --list-full failed ({e}); install Debian's busybox-static") from e
    tree.add_file(bb, "bin/busybox", 0o755)
    for applet in sorted(listing.split()):
        if applet.strip("/") != "bin/busybox":
            tree.add_symlink(applet, "/bin/busybox")


def add_content(tree: Tree, content: Path = CONTENT_DIR) -> None:
    """The repository's initramfs/ folder, copied to the root of the guest (init, scripts, /etc files)."""
    if not (content / "init").is_file():
        raise InitramfsError(f"{content}/init is missing: the khibernate installation is incomplete; reinstall it"
                             " (pip install --force-reinstall khibernate) or run from a source checkout")
    for p in sorted(content.iterdir()):
        if p.name.startswith(".") or p.name in ("README.md", "__pycache__", *HOST_INTEGRATION):
            continue
        tree.add_file(p, p.name)


def add_kexec(tree: Tree, kexec: Path | None = None) -> None:
    """kexec-tools' kexec, the reference implementation, at /usr/sbin/kexec."""
    tree.add_file(kexec or _first_existing(KEXEC_CANDIDATES, "kexec", "kexec-tools"), "usr/sbin/kexec", 0o755)


def add_blkid(tree: Tree, blkid: Path | None = None) -> None:
    """util-linux's blkid (with libblkid) at /usr/sbin/blkid: `target init` probes a device for filesystem, swap,
    LVM/RAID/LUKS and partition-table signatures with ``blkid -p`` before erasing it, and busybox has no blkid."""
    tree.add_file(blkid or _first_existing(BLKID_CANDIDATES, "blkid", "util-linux"), "usr/sbin/blkid", 0o755)


def add_python(tree: Tree) -> None:
    """The running interpreter, trimmed stdlib, khibernate and its dependencies, and the khibernate launcher."""
    files, dir_map = pybundle.bundle()
    tree.dir_map.update(dir_map)
    for f in files:
        tree.add_data(f.guest, f.data, f.perm)
        if f.elf_source is not None:
            tree.elf_files.append(f.elf_source)
    for link, target in pybundle.python_links().items():
        tree.add_symlink(link, target)
    env = "".join(f"export {k}={v}\n" for k, v in sorted(pybundle.environment().items()))
    tree.add_data("etc/khibernate/python.env", env.encode())
    launcher = ("#!/bin/sh\n. /etc/khibernate/python.env\n"
                "exec /usr/bin/python3 -c 'import sys; sys.argv[0] = \"khibernate\"; "
                "from khibernate.cli import main; main()' \"$@\"\n")
    tree.add_data("usr/bin/khibernate", launcher.encode(), 0o755)


def parse_add(spec: str) -> tuple[Path, str]:
    """'SRC:DST' -> (Path(SRC), DST); DST must be absolute."""
    src, sep, dst = spec.rpartition(":")
    if not sep or not src or not dst.startswith("/"):
        raise InitramfsError(f"--add {spec!r}: expected SRC:DST with an absolute guest path, e.g. ./x.sh:/bin/x.sh")
    return Path(src), dst


def build_tree(extra: Iterable[tuple[Path, str]] = (), python: bool = True, kexec: bool = True,
               modules: tuple[str, Iterable[str]] | None = None) -> Tree:
    """The full capture-environment tree (libraries are resolved when it is archived); ``modules`` is (kernel
    release, module names) for a modular capture kernel: those and their dependencies go in for /init to load."""
    tree = Tree()
    add_skeleton(tree)
    add_busybox(tree)
    if kexec:
        add_kexec(tree)
    if python:
        add_python(tree)
        add_blkid(tree)  # for `khibernate target init` in a guest or rescue environment
    add_content(tree)
    for src, dst in extra:
        tree.add_file(src, dst)
    if modules is not None:
        from khibernate.initramfs.modules import add_modules

        add_modules(tree, modules[0], modules[1])
    return tree


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a build produced."""

    output: Path
    compressed_bytes: int
    uncompressed_bytes: int
    entries: int
    compression: str

    def summary(self) -> str:
        return (f"{self.output}: {self.compressed_bytes / 2**20:.1f} MiB {self.compression} "
                f"({self.uncompressed_bytes / 2**20:.1f} MiB in {self.entries} entries)")


def build(output: Path, extra: Iterable[tuple[Path, str]] = (), compression: str = "zstd", python: bool = True,
          kexec: bool = True, modules: tuple[str, Iterable[str]] | None = None) -> BuildReport:
    """Build the initramfs into output and report its size."""
    tree = build_tree(extra, python=python, kexec=kexec, modules=modules)
    data = tree.archive(compression)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(output)
    return BuildReport(output, len(data), tree.total_bytes(), len(tree.entries), compression)
