"""khibernate on a real distribution, installed as a user installs it: the Debian 12 machine (systemd, udev,
initramfs-tools, a modular kernel; vmtest/rootfs.py), `apt install ./khibernate_*.deb` from a shell (its
dependencies come from the machine's apt repository), `khibernate setup --target`, a reboot through the rebuilt
initramfs, and `apt remove` + `autoremove` leaving the system as it was.

One machine for the module: the install, setup and remove tests run in order on its first boot; the reboot test
boots it a second time.
"""

from __future__ import annotations

import re

import pytest

from vmtest import package, rootfs
from vmtest.machine import Machine, wait_system_running
from vmtest.vm import VM

pytestmark = pytest.mark.vm

STORE_MB = 512
# what the file-system fingerprint leaves out: state that any boot or apt run changes, whatever it installs
VOLATILE = ("/var/lib/dpkg", "/var/lib/apt", "/var/cache", "/var/log", "/var/lib/systemd", "/var/tmp", "/tmp",
            "/root", "/etc/ld.so.cache", "/var/lib/dbus", "/var/lib/initramfs-tools", "/etc/machine-id",
            "/var/backups", "/var/lib/ucf")
FINGERPRINT = ("find / -xdev \\( " + " -o ".join(f"-path {p}" for p in VOLATILE) + " \\) -prune -o "
               "-printf '%p %M %u\\n' | sort; md5sum $(find /etc /usr/share/initramfs-tools -xdev -type f "
               "! -path /etc/ld.so.cache ! -path /etc/machine-id | sort) ; "
               "lsinitramfs /boot/initrd.img-$(uname -r) | sort")
CAN_HIBERNATE = ("busctl call org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager "
                 "CanHibernate")


def kernel_source() -> rootfs.KernelSource:
    return rootfs.debian_kernel()


@pytest.fixture(scope="module")
def machine() -> Machine:
    img = rootfs.build(kernel_source())
    deb = package.build()
    m = Machine(img, "distro-install")
    m.create()
    m.put_file(deb, f"/root/{deb.name}")
    with open(m.dir / "store.img", "wb") as f:
        f.truncate(STORE_MB << 20)
    m.extra_disks.append(m.dir / "store.img")
    return m


class Running:
    """The machine's current boot (a test may reboot it)."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.vm = machine.vm()
        self.vm.start()
        wait_system_running(self.vm)

    def reboot(self) -> VM:
        """A power cycle (`systemctl poweroff`, power on): the next boot reads the kernel and initrd from the disk
        again, as a boot loader does (a `systemctl reboot` may kexec: kexec-tools offers to load a kernel for it)."""
        self.vm.send("systemctl poweroff")
        self.vm.wait_exit(300)
        self.vm.close()
        self.vm = self.machine.vm()
        self.vm.start()
        wait_system_running(self.vm)
        return self.vm


@pytest.fixture(scope="module")
def running(machine: Machine):
    r = Running(machine)
    try:
        yield r
        r.vm.send("systemctl poweroff")
        r.vm.wait_exit(300)
    finally:
        r.vm.close()


@pytest.fixture(scope="module")
def first_boot(running: Running) -> VM:
    return running.vm


@pytest.fixture(scope="module")
def before(first_boot: VM) -> str:
    """The fingerprint before the install, kept in the guest (/root is outside it); returns its line count."""
    return first_boot.run(f"({FINGERPRINT}) > /root/fingerprint.before; wc -l < /root/fingerprint.before",
                          timeout=600)


def test_apt_install_pulls_the_dependencies_and_khibernate_runs(first_boot: VM, before: str):
    vm = first_boot
    assert "khibernate" not in vm.run("dpkg -l | awk '{print $2}'")
    out = vm.run("cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./khibernate_*.deb", timeout=900)
    for dep in ("python3-zstandard", "python3-click", "python3-pyelftools", "python3-cffi-backend", "kexec-tools"):
        assert re.search(rf"Setting up {dep}\b", out), dep
    assert vm.run("khibernate --version").strip() == "khibernate, version 0.1.0"
    assert vm.run("command -v khibernate").strip() == "/usr/bin/khibernate"
    # the package's native page kernel and its resume hook are in place; the hook is inert until setup
    vm.run("python3 -c 'import khibernate.native._pages'")
    vm.run("test -x /usr/share/initramfs-tools/hooks/khibernate && "
           "test -x /usr/share/initramfs-tools/scripts/local-premount/khibernate")
    status, doctor = vm.run_status("khibernate doctor")
    assert "crashkernel= region reserved" in doctor, doctor


def test_setup_records_the_target_and_says_what_is_missing(first_boot: VM):
    vm = first_boot
    assert "na" in vm.run(CAN_HIBERNATE)  # systemd's answer without swap
    vm.run("khibernate target init /dev/vdb", timeout=120)
    status, out = vm.run_status("khibernate setup --target /dev/vdb", timeout=900)
    release = vm.run("uname -r").strip()
    config = vm.run(f"zcat /proc/config.gz 2>/dev/null || cat /boot/config-{release}")
    if "CONFIG_KEXEC_JUMP=y" in config:
        assert status == 0 and "ready:" in out, out
    else:  # Debian's own kernel: set up, but said plainly that it cannot jump
        assert status == 3, out
        assert "hibernation cannot work yet" in out and "CONFIG_KEXEC_JUMP is not set" in out, out
    assert "update-initramfs -u" in out
    conf = vm.run("cat /etc/khibernate.conf")
    assert re.search(r"^KHIBERNATE_TARGET=/dev/disk/by-\S+$", conf, re.M), conf
    assert vm.run("readlink -f $(sed -n 's/^KHIBERNATE_TARGET=//p' /etc/khibernate.conf)").strip() == "/dev/vdb"
    exec_start = vm.run("systemctl show -p ExecStart systemd-hibernate.service")
    assert "/usr/bin/khibernate" in exec_start and "systemd-sleep" not in exec_start, exec_start
    assert "yes" in vm.run(CAN_HIBERNATE)
    listing = vm.run(f"lsinitramfs /boot/initrd.img-{release}")
    assert "conf/conf.d/khibernate" in listing and "scripts/local-premount/khibernate" in listing
    initrd_stamp = vm.run(f"stat -c %Y /boot/initrd.img-{release}")
    status, again = vm.run_status("khibernate setup --target /dev/vdb", timeout=300)
    assert "nothing to change" in again and status in (0, 3), again
    assert vm.run(f"stat -c %Y /boot/initrd.img-{release}") == initrd_stamp


def test_the_next_boot_runs_the_resume_hook_before_the_root_is_mounted(running: Running):
    vm = running.reboot()
    console = vm.console_text()
    hook = console.find("khibernate: resume from /dev/disk/by-")
    assert hook >= 0, console[-3000:]
    assert "resume: no " in console[hook:] or "nothing to resume" in console[hook:].lower(), console[hook:][:2000]
    # the hook ran in local-premount: before systemd (PID 1 from the root filesystem) started
    assert hook < console.find("systemd[1]") or console.find("Welcome to") > hook
    # and it left the root filesystem as the boot expects it: mounted read-write once, by systemd
    assert vm.run("findmnt -no OPTIONS /").startswith("rw,")
    assert "/run/khibernate-root" not in vm.run("cat /proc/mounts")


def test_apt_remove_leaves_the_system_as_it_was(running: Running, before: str):
    vm = running.vm
    vm.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y khibernate", timeout=900)
    assert vm.run("ls /etc/khibernate.conf /etc/systemd/system/*.d/khibernate.conf "
                  "/usr/share/initramfs-tools/hooks/khibernate 2>&1 || true").count("No such file") == 3
    # what apt pulled in for khibernate goes with autoremove (--purge: their own config files too)
    vm.run("DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y", timeout=900)
    assert int(before) > 10000  # the whole system, not an empty listing
    status, diff = vm.run_status(f"({FINGERPRINT}) > /root/fingerprint.after; "
                                 "diff /root/fingerprint.before /root/fingerprint.after | head -n 60", timeout=600)
    assert diff.strip() == "", f"the system differs after apt remove + autoremove (< before, > after):\n{diff}"
    assert "na" in vm.run(CAN_HIBERNATE)
    assert vm.run("systemctl show -p ExecStart systemd-hibernate.service").count("systemd-sleep") == 1
