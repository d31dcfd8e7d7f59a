"""The kernel unpacks what the builder writes: a gzip initramfs (the zstd one boots in every other VM test)."""

from __future__ import annotations

import pytest

from khibernate.initramfs import build
from vmtest.vm import VM

pytestmark = pytest.mark.vm


def test_gzip_initramfs_boots(test_kernel, tmp_path):
    marker = tmp_path / "marker.txt"
    marker.write_text("built-by-khibernate\n")
    report = build.build(tmp_path / "initrd.gz", [(marker, "/etc/marker.txt")], compression="gzip", python=False)
    assert report.output.read_bytes()[:2] == b"\x1f\x8b"
    with VM(kernel=test_kernel, name="test-gzip-initramfs", initrd=report.output, timeout=120) as vm:
        assert vm.run("cat /etc/marker.txt") == "built-by-khibernate\n"
        assert vm.run("ls /usr/sbin/kexec && kexec --version").startswith("/usr/sbin/kexec\nkexec-tools")
