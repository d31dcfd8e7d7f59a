"""The test kernel lines and flavours: fragments in order, later ones overriding, cache keys kept stable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vmtest import kernel as vk
from vmtest.kernel import HERE, LINES, RECIPE_VERSION, fragment_hash, fragments, wanted_options


def test_the_distro_flavour_builds_on_the_6_12_line_with_kaslr_and_modules() -> None:
    distro = LINES["6.12-distro"]
    assert distro.package == LINES["6.12"].package and distro.modular and not LINES["6.12"].modular
    assert fragments("6.12-distro")[:2] == fragments("6.12")
    wanted = wanted_options("6.12-distro")
    assert wanted_options("6.12")["CONFIG_RANDOMIZE_BASE"] == "n"  # common.config: the test kernels boot nokaslr
    for opt in ("RANDOMIZE_BASE", "RANDOMIZE_MEMORY", "TRANSPARENT_HUGEPAGE_ALWAYS", "HUGETLBFS", "MEMCG", "KSM",
                "COMPACTION", "INIT_ON_ALLOC_DEFAULT_ON", "MODULES", "CGROUPS", "AUTOFS_FS", "FHANDLE", "INET",
                "KEXEC_JUMP", "CRASH_DUMP", "DEVMEM", "IKCONFIG_PROC", "FW_CFG_SYSFS", "LKDTM", "DEBUG_INFO_NONE"):
        assert wanted[f"CONFIG_{opt}"] == "y", opt
    for opt in ("VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET", "EXT4_FS", "JBD2", "FS_MBCACHE", "CRYPTO_CRC32C"):
        assert wanted[f"CONFIG_{opt}"] == "m", opt
    assert wanted["CONFIG_DEBUG_INFO_DWARF5"] == "n"


def test_the_cache_keys_of_the_small_kernels_did_not_change() -> None:
    """Adding flavours must not rebuild the kernels every cache already holds (key = recipe + fragments)."""
    for line in ("6.12", "7.3"):
        h = hashlib.sha256(RECIPE_VERSION.encode())
        for name in ("common.config", f"{line}.config"):
            h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
        assert fragment_hash(line) == h.hexdigest()[:12]
    assert fragment_hash("6.12-distro") != fragment_hash("6.12")


def test_a_modular_build_is_complete_only_with_its_modules_dep(tmp_path: Path) -> None:
    for name in ("bzImage", "vmlinux", "System.map", "config"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "build-info.json").write_text(json.dumps({"release": "6.12.118"}))
    assert vk.TestKernel(tmp_path).complete() and not vk.TestKernel(tmp_path, modular=True).complete()
    dep = vk.TestKernel(tmp_path, modular=True).modules_root / "6.12.118" / "modules.dep"
    dep.parent.mkdir(parents=True)
    dep.write_text("kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko\n")
    assert vk.TestKernel(tmp_path, modular=True).complete()
