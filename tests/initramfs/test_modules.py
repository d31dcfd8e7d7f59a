"""Modules for a modular capture kernel: modules.dep parsing, dependency order, the sysfs driver chain of a
disk, and what goes into the initramfs (decompressed, listed for /init in load order)."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest
import zstandard

from khibernate.initramfs import build as builder
from khibernate.initramfs.modules import (
    MODULE_LIST,
    ModuleError,
    add_modules,
    driver_chain,
    load_order,
    module_name,
    parse_modules_dep,
)

DEP = """kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz \
kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz \
kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/nvme/host/nvme-core.ko.zst:
"""


def test_module_names_and_dependency_order() -> None:
    assert module_name("kernel/drivers/nvme/host/nvme-core.ko.zst") == "nvme_core"
    assert module_name("a/b/sd_mod.ko") == "sd_mod"
    with pytest.raises(ModuleError, match="not a kernel module"):
        module_name("kernel/README")
    dep = parse_modules_dep(DEP)
    assert dep["virtio_blk"].deps == ("virtio_ring", "virtio")
    order = load_order(dep, ["virtio_blk", "virtio_pci", "virtio_blk"])
    assert order == ["virtio", "virtio_ring", "virtio_blk", "virtio_pci_modern_dev", "virtio_pci"]
    for i, name in enumerate(order):  # every dependency comes before its user
        assert all(order.index(d) < i for d in dep[name].deps)
    with pytest.raises(ModuleError, match="'ahci' is not in modules.dep"):
        load_order(dep, ["ahci"])
    loop = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ModuleError, match="loop: a -> b -> a"):
        load_order(loop, ["a"])
    with pytest.raises(ModuleError, match="line 1 has no ':'"):
        parse_modules_dep("kernel/x.ko kernel/y.ko\n")


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def test_driver_chain_walks_from_the_disk_up(tmp_path: Path) -> None:
    """vda1 (a partition) → vda → virtio1 (virtio_blk, a module) → PCI function (virtio-pci's module) → bus."""
    sysfs = tmp_path / "sys"
    pci = sysfs / "devices/pci0000:00/0000:00:04.0"
    disk = pci / "virtio1/block/vda"
    (disk / "vda1").mkdir(parents=True)
    (disk / "vda1/partition").write_text("1\n")
    _link(disk / "device", pci / "virtio1")
    _link(pci / "virtio1/driver", sysfs / "bus/virtio/drivers/virtio_blk")
    _link(sysfs / "bus/virtio/drivers/virtio_blk/module", sysfs / "module/virtio_blk")
    _link(pci / "driver", sysfs / "bus/pci/drivers/virtio-pci")
    _link(sysfs / "bus/pci/drivers/virtio-pci/module", sysfs / "module/virtio_pci")
    _link(sysfs / "dev/block/254:1", disk / "vda1")
    _link(sysfs / "dev/block/254:0", disk)
    assert driver_chain(sysfs / "dev/block/254:1", str(sysfs)) == ["virtio_blk", "virtio_pci"]
    assert driver_chain(sysfs / "dev/block/254:0", str(sysfs)) == ["virtio_blk", "virtio_pci"]
    # built-in drivers have no module link: nothing to carry
    (sysfs / "bus/virtio/drivers/virtio_blk/module").unlink()
    (sysfs / "bus/pci/drivers/virtio-pci/module").unlink()
    assert driver_chain(sysfs / "dev/block/254:0", str(sysfs)) == []


def test_add_modules_puts_decompressed_modules_and_the_load_list(tmp_path: Path) -> None:
    base = tmp_path / "lib/modules/6.1.0-28-amd64"
    for rel in ("kernel/drivers/block/virtio_blk.ko.xz", "kernel/drivers/virtio/virtio_ring.ko.xz",
                "kernel/drivers/virtio/virtio.ko.xz"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(lzma.compress(f"module {rel}".encode()))
    (base / "modules.dep").write_text(DEP)
    tree = builder.Tree()
    order = add_modules(tree, "6.1.0-28-amd64", ["virtio_blk"], modules_root=tmp_path / "lib/modules")
    assert order == ["virtio", "virtio_ring", "virtio_blk"]
    files = {e.path: e.data for e in tree.entries.values()}
    listed = files[MODULE_LIST].decode().split()
    assert listed == [f"/lib/modules/6.1.0-28-amd64/{m}.ko" for m in order]
    assert files["lib/modules/6.1.0-28-amd64/virtio_blk.ko"] == b"module kernel/drivers/block/virtio_blk.ko.xz"
    assert add_modules(builder.Tree(), "6.1.0-28-amd64", []) == []
    with pytest.raises(ModuleError, match="modules.dep does not exist"):
        add_modules(builder.Tree(), "9.9.9", ["virtio_blk"], modules_root=tmp_path / "lib/modules")
    (base / "kernel/drivers/virtio/virtio.ko.xz").unlink()
    with pytest.raises(ModuleError, match="listed in modules.dep but missing"):
        add_modules(builder.Tree(), "6.1.0-28-amd64", ["virtio_blk"], modules_root=tmp_path / "lib/modules")
    (base / "kernel/drivers/nvme/host").mkdir(parents=True)
    (base / "kernel/drivers/nvme/host/nvme-core.ko.zst").write_bytes(b"not zstd")
    with pytest.raises(ModuleError, match="cannot decompress"):
        add_modules(builder.Tree(), "6.1.0-28-amd64", ["nvme_core"], modules_root=tmp_path / "lib/modules")
    (base / "kernel/drivers/nvme/host/nvme-core.ko.zst").write_bytes(zstandard.ZstdCompressor().compress(b"nvme"))
    t = builder.Tree()
    add_modules(t, "6.1.0-28-amd64", ["nvme-core"], modules_root=tmp_path / "lib/modules")
    assert t.entries["lib/modules/6.1.0-28-amd64/nvme_core.ko"].data == b"nvme"
