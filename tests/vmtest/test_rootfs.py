"""The distribution machine's recipe (pure parts): what the image key covers, a modular kernel staged as a package
tree, the boot loader's command line."""

from __future__ import annotations

import json
from pathlib import Path

from vmtest import kernel as vmkernel
from vmtest import rootfs
from vmtest.machine import Machine


def fake_kernel(tmp: Path, release: str = "6.12.118-distro") -> vmkernel.TestKernel:
    d = tmp / "k"
    mods = d / "modules" / "lib" / "modules" / release
    (mods / "kernel" / "drivers" / "block").mkdir(parents=True)
    (mods / "kernel" / "drivers" / "block" / "virtio_blk.ko").write_bytes(b"\x7fELF")
    (mods / "modules.dep").write_text("kernel/drivers/block/virtio_blk.ko:\n")
    (mods / "build").symlink_to("/nonexistent/build-tree")
    for name in ("bzImage", "vmlinux", "System.map", "config"):
        (d / name).write_text(name)
    (d / "build-info.json").write_text(json.dumps({"release": release}))
    return vmkernel.TestKernel(d, modular=True)


def test_a_modular_build_is_staged_as_a_kernel_package_installs_it(tmp_path: Path) -> None:
    ks = rootfs.flavour_kernel(fake_kernel(tmp_path))
    assert ks.release == "6.12.118-distro" and ks.tree is not None
    t = ks.tree
    assert (t / "boot/vmlinuz-6.12.118-distro").read_text() == "bzImage"
    assert (t / "boot/config-6.12.118-distro").read_text() == "config"
    assert (t / "lib/modules/6.12.118-distro/modules.dep").is_file()
    assert not (t / "lib/modules/6.12.118-distro/build").is_symlink()  # the build tree does not go into the image


def test_the_image_key_follows_the_kernel_and_the_packages(tmp_path: Path, monkeypatch) -> None:
    ks = rootfs.flavour_kernel(fake_kernel(tmp_path))
    key = rootfs.image_key(ks)
    assert rootfs.image_key(ks) == key
    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "vim"))
    assert rootfs.image_key(ks) != key
    monkeypatch.undo()
    other = rootfs.flavour_kernel(fake_kernel(tmp_path / "b", "6.12.119-distro"))
    assert rootfs.image_key(other) != key


def test_the_command_line_is_a_distribution_boot_loaders(tmp_path: Path) -> None:
    img = rootfs.RootfsImage(tmp_path)
    (tmp_path / "info.json").write_text(json.dumps({"release": "r", "root_uuid": "1234-abcd"}))
    line = Machine(img, "t").append("quiet")
    assert line.startswith("root=UUID=1234-abcd ro console=ttyS0 crashkernel=256M")
    assert line.endswith(" quiet") and "rootfstype=ramfs" not in line
