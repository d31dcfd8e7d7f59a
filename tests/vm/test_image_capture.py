"""The capture path for real: a kdump kernel (crashkernel=256M, 1 CPU) runs ``khibernate image save`` on its own
/proc/vmcore; the host verifies the image it wrote."""

from __future__ import annotations

import json

import pytest

from khibernate.image.sources.khi import KhiSource

pytestmark = pytest.mark.vm


def test_save_inside_kdump_kernel(tmp_path) -> None:  # noqa: ANN001
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import BASE_APPEND, VM, check_host

    check_host()
    kernel = ensure_kernel()
    with VM(kernel, append="crashkernel=256M", memory_mb=1024, disk_mb=64, name="image-capture", timeout=300) as vm:
        vm.run("mkdir -p /mnt/t && mount -t tmpfs tmpfs /mnt/t && head -c 64m /dev/urandom > /mnt/t/r", timeout=300)
        vm.run("kexec -p /boot/bzImage --initrd=/boot/initrd.img --append='"
               f"{BASE_APPEND} nr_cpus=1 reset_devices'", timeout=120)
        vm.mark()
        vm.send("echo c > /proc/sysrq-trigger")
        vm.wait_for(r"Kernel panic - not syncing: sysrq triggered crash", timeout=60)
        vm.wait_for_shell(timeout=300)
        assert "elfcorehdr=" in vm.run("cat /proc/cmdline")
        out = vm.run("python3 -m khibernate.cli image save /proc/vmcore /tmp/c.khi -d 31 --json", timeout=900)
        res = json.loads(out[out.index("{"):])
        print(f"\nsave inside the kdump kernel: {res}")
        assert res["classes"]["free"] > 50000 and res["pages_stored"] > 1000
        log = vm.run("python3 -m khibernate.cli image dmesg /proc/vmcore | tail -40", timeout=300)
        assert "sysrq triggered crash" in log
        vm.run("python3 -m khibernate.cli image verify /tmp/c.khi", timeout=300)
        size = int(vm.run("stat -c %s /tmp/c.khi").strip())
        vm.run("dd if=/tmp/c.khi of=/dev/vda bs=1M 2>/dev/null; sync", timeout=300)
    img = tmp_path / "c.khi"
    with open(vm.disk, "rb") as f:
        img.write_bytes(f.read(size))
    with KhiSource(img) as k:
        assert k.verify()["pages_stored"] == res["pages_stored"]
        assert k.header.osrelease == kernel.info["release"] and k.header.dump_level == 31
