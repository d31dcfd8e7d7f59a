"""khibernate on a real distribution, installed and used as a user would, on the Debian 12 machine (systemd 252,
udev, initramfs-tools; the modular KASLR 6.12-distro kernel installed as a package installs it; vmtest/rootfs.py):

1. `apt install ./khibernate_*.deb` from a shell pulls its dependencies from the machine's apt repository;
2. `khibernate target init /dev/vdb` + `khibernate setup --target /dev/vdb`: ready, `CanHibernate=yes`, the
   initramfs rebuilt with the target, a second run changes nothing;
3. a user's counter service runs; `systemctl hibernate` hibernates through khibernate and the machine powers off;
4. power on: initramfs-tools' premount stage resumes it before the root is mounted read-write; the same boot runs
   on (boot_id, the counter's PID and count, udev and journald), and `journalctl` shows that one boot with the
   hibernation in it;
5. `apt remove khibernate` + `apt autoremove --purge` leave the system as it was before the install;
6. after a clean shutdown `e2fsck -fn` on the host finds the root filesystem clean.

Two boots in all (the first, and the resume boot that brings it back), shared by the module, in this order.
"""

from __future__ import annotations

import re
import time

import pytest

from vmtest import package, rootfs
from vmtest.machine import Machine, wait_system_running
from vmtest.vm import TIMEOUT_SCALE, VM

pytestmark = pytest.mark.vm

STORE_MB = 1024
MEMORY_MB = 1536
VOLATILE = ("/var/lib/dpkg", "/var/lib/apt", "/var/cache", "/var/log", "/var/lib/systemd", "/var/tmp", "/tmp",
            "/root", "/etc/ld.so.cache", "/var/lib/dbus", "/var/lib/initramfs-tools", "/etc/machine-id",
            "/var/backups", "/var/lib/ucf", "/var/lib/counter", "/var/crash")
FINGERPRINT = ("find / -xdev \\( " + " -o ".join(f"-path {p}" for p in VOLATILE) + " \\) -prune -o "
               "-printf '%p %M %u\\n' | sort; md5sum $(find /etc /usr/share/initramfs-tools -xdev -type f "
               "! -path /etc/ld.so.cache ! -path /etc/machine-id | sort); "
               "lsinitramfs /boot/initrd.img-$(uname -r) | sort")
CAN_HIBERNATE = ("busctl call org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager "
                 "CanHibernate")
COUNTER_UNIT = """[Unit]
Description=a user's service: counts once a second into /var/lib/counter/value and the journal
[Service]
ExecStart=/bin/sh -c 'mkdir -p /var/lib/counter; i=0; while :; do i=$((i+1)); echo $i > /var/lib/counter/value; \
echo "tick $i"; sleep 1; done'
[Install]
WantedBy=multi-user.target
"""
FIGURES: dict[str, float] = {}


def counter(vm: VM) -> tuple[int, int]:
    """(MainPID, value) of the counter service."""
    pid = int(vm.run("systemctl show -p MainPID --value counter.service").strip())
    return pid, int(vm.run("cat /var/lib/counter/value").strip())


class Session:
    """The machine and its current QEMU (the first boot, then the resume boot)."""

    def __init__(self) -> None:
        img = rootfs.distro_image()
        deb = package.build()
        self.machine = Machine(img, "distro")
        self.machine.create()
        self.machine.put_file(deb, f"/root/{deb.name}")
        with open(self.machine.dir / "store.img", "wb") as f:
            f.truncate(STORE_MB << 20)
        self.machine.extra_disks.append(self.machine.dir / "store.img")
        self.vm = self.machine.vm(memory_mb=MEMORY_MB)
        t0 = time.monotonic()
        self.vm.start()
        wait_system_running(self.vm)
        FIGURES["boot_to_running_s"] = time.monotonic() - t0
        self.before: dict = {}

    def close(self) -> None:
        self.vm.close()


@pytest.fixture(scope="module")
def s():
    session = Session()
    try:
        yield session
    finally:
        session.close()
        print(f"[figures] {FIGURES}")


def test_apt_install_pulls_the_dependencies(s: Session):
    vm = s.vm
    vm.run(f"cat > /etc/systemd/system/counter.service <<'EOF'\n{COUNTER_UNIT}EOF\n"
           "systemctl daemon-reload && systemctl enable --now counter.service")
    n = vm.run(f"({FINGERPRINT}) > /root/fingerprint.before; wc -l < /root/fingerprint.before", timeout=900)
    assert int(n) > 10000
    t0 = time.monotonic()
    out = vm.run("cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./khibernate_*.deb", timeout=1800)
    FIGURES["apt_install_s"] = time.monotonic() - t0
    for dep in ("python3-zstandard", "python3-click", "python3-pyelftools", "python3-cffi", "kexec-tools"):
        assert re.search(rf"Setting up {dep}\b", out), dep
    assert vm.run("command -v khibernate").strip() == "/usr/bin/khibernate"
    vm.run("python3 -c 'import khibernate.native._pages'")  # the package's compiled page kernel


def test_setup_makes_systemctl_hibernate_use_khibernate(s: Session):
    vm = s.vm
    assert "na" in vm.run(CAN_HIBERNATE)  # systemd's answer without swap
    vm.run("khibernate target init /dev/vdb", timeout=300)
    t0 = time.monotonic()
    status, out = vm.run_status("khibernate setup --target /dev/vdb", timeout=1800)
    FIGURES["setup_s"] = time.monotonic() - t0
    assert status == 0 and "ready:" in out and "update-initramfs -u" in out, out
    conf = vm.run("cat /etc/khibernate.conf")
    assert re.search(r"^KHIBERNATE_TARGET=/dev/disk/by-\S+$", conf, re.M), conf
    assert vm.run("readlink -f $(sed -n 's/^KHIBERNATE_TARGET=//p' /etc/khibernate.conf)").strip() == "/dev/vdb"
    exec_start = vm.run("systemctl show -p ExecStart systemd-hibernate.service")
    assert "/usr/bin/khibernate" in exec_start and "systemd-sleep" not in exec_start, exec_start
    assert "yes" in vm.run(CAN_HIBERNATE)
    listing = vm.run("lsinitramfs /boot/initrd.img-$(uname -r)", timeout=600)
    assert "conf/conf.d/khibernate" in listing and "scripts/local-premount/khibernate" in listing
    stamp = vm.run("stat -c %Y /boot/initrd.img-$(uname -r)")
    again = vm.run("khibernate setup --target /dev/vdb", timeout=900)
    assert "nothing to change" in again, again
    assert vm.run("stat -c %Y /boot/initrd.img-$(uname -r)") == stamp


def test_systemctl_hibernate_powers_the_machine_off(s: Session):
    vm = s.vm
    time.sleep(2)
    s.before = {"boot_id": vm.boot_id, "counter": counter(vm),
                "udev": vm.run("systemctl show -p MainPID --value systemd-udevd").strip(),
                "journald": vm.run("systemctl show -p MainPID --value systemd-journald").strip()}
    t0 = time.monotonic()
    vm.run("systemctl hibernate", timeout=120)
    assert vm.wait_exit(1800 * TIMEOUT_SCALE) == 0, "the capture kernel should power the machine off"
    FIGURES["hibernate_s"] = time.monotonic() - t0
    console = vm.console_text()
    assert "hibernation image complete in slot" in console, console[-3000:]
    # the capture environment was built in the guest from this system, with its disk's modules (capture build)
    m = re.search(r"khibernate-capture: job hibernate .* up (\d+\.\d+) s", console)
    assert m, console[-3000:]
    FIGURES["capture_kernel_boot_to_job_s"] = float(m.group(1))
    vm.close()


def test_the_next_boot_resumes_the_same_system(s: Session):
    assert s.before, "needs the hibernation of the test before"
    s.vm = s.machine.vm(memory_mb=MEMORY_MB, wait_ready=False)
    t0 = time.monotonic()
    s.vm.start()
    vm = s.vm
    vm.wait_for_shell(timeout=1800, new_boot=False)
    FIGURES["resume_to_shell_s"] = time.monotonic() - t0
    console = vm.console_text()
    assert "khibernate: resume from /dev/disk/by-" in console, console[-3000:]
    assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == s.before["boot_id"]
    pid, n = s.before["counter"]
    deadline = time.monotonic() + 120 * TIMEOUT_SCALE
    while True:
        now_pid, now_n = counter(vm)
        if now_n > n + 1 or time.monotonic() > deadline:
            break
        time.sleep(1)
    FIGURES["resume_to_counter_s"] = time.monotonic() - t0
    assert now_pid == pid and now_n > n + 1, (pid, n, now_pid, now_n)
    assert vm.run("systemctl show -p MainPID --value systemd-udevd").strip() == s.before["udev"]
    assert vm.run("systemctl show -p MainPID --value systemd-journald").strip() == s.before["journald"]
    assert vm.run("systemctl is-active counter.service systemd-journald systemd-udevd").split() == ["active"] * 3
    vm.run("udevadm trigger --action=change /sys/block/vdb && udevadm settle -t 60", timeout=120)
    cached = vm.run("ls -l /root/.cache/khibernate/capture/").split("\n")
    sizes = [int(line.split()[4]) for line in cached if line.startswith("-") and ".cpio.zst" in line]
    assert sizes, cached
    FIGURES["capture_initramfs_mib"] = round(max(sizes) / 2**20, 1)
    mods = vm.run("zstdcat /root/.cache/khibernate/capture/*.cpio.zst | cpio -t 2>/dev/null | grep '\\.ko$' || true")
    assert "virtio_blk.ko" in mods, mods  # the target disk's driver, a module of this distribution kernel


def test_journal_shows_one_boot_with_the_hibernation_in_it(s: Session):
    vm = s.vm
    boots = [b for b in vm.run("journalctl --list-boots --no-pager").splitlines()
             if re.match(r"\s*-?\d+\s+[0-9a-f]{32}", b)]
    assert len(boots) == 1, boots
    log = vm.run("journalctl -b 0 --no-pager -o cat -u systemd-hibernate.service -u counter.service", timeout=120)
    hib = log.find("khibernate")
    assert hib >= 0 and "resumed from slot" in log[hib:] and re.search(r"tick \d+", log[hib:]), log[-3000:]
    vm.run("logger -t after-resume journald-runs-on && sleep 1 && journalctl -b 0 -t after-resume | grep -q runs-on")


def test_watch_service_captures_a_warning_and_the_system_runs_on(s: Session):
    """The package's khibernate-watch unit on setup's target: an LKDTM WARNING -> one capture under
    /var/crash/khibernate/<date>-warn/ (vmcore, dmesg.txt, event.json); journald and the counter run on."""
    vm = s.vm
    vm.run("systemctl enable --now khibernate-watch.service")
    vm.run("for i in $(seq 120); do journalctl -b 0 -u khibernate-watch -o cat | grep -q 'following /dev/kmsg' "
           "&& exit 0; sleep 1; done; journalctl -b 0 -u khibernate-watch -o cat | tail -20; exit 1", timeout=300)
    pid, n = counter(vm)
    vm.run("echo WARNING > /sys/kernel/debug/provoke-crash/DIRECT")
    t0 = time.monotonic()
    vm.run("for i in $(seq 1200); do ls /var/crash/khibernate/*-warn/dmesg.txt >/dev/null 2>&1 && exit 0; "
           "sleep 1; done; journalctl -b 0 -u khibernate-watch -o cat | tail -30; exit 1", timeout=1500)
    FIGURES["watch_warning_to_capture_s"] = time.monotonic() - t0
    folders = vm.run("ls -d /var/crash/khibernate/*/").split()
    assert len(folders) == 1 and folders[0].rstrip("/").endswith("-warn"), folders
    assert "WARNING:" in vm.run(f"cat {folders[0]}dmesg.txt")
    assert int(vm.run(f"stat -c %s {folders[0]}vmcore")) > 1 << 20
    assert vm.run("systemctl is-active counter.service systemd-journald khibernate-watch").split() == ["active"] * 3
    now_pid, now_n = counter(vm)
    assert now_pid == pid and now_n > n
    vm.run("logger -t after-capture still-here && sleep 1 && journalctl -b 0 -t after-capture | grep -q still-here")
    vm.run("systemctl disable --now khibernate-watch.service")


def test_apt_remove_leaves_the_system_as_it_was(s: Session):
    vm = s.vm
    vm.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y khibernate", timeout=1800)
    assert vm.run("ls /etc/khibernate.conf /etc/systemd/system/*.d/khibernate.conf "
                  "/usr/share/initramfs-tools/hooks/khibernate 2>&1 || true").count("No such file") == 3
    assert "na" in vm.run(CAN_HIBERNATE)
    vm.run("DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y", timeout=1800)
    diff = vm.run(f"({FINGERPRINT}) > /root/fingerprint.after; "
                  "diff /root/fingerprint.before /root/fingerprint.after | head -n 60", timeout=900)
    assert diff.strip() == "", f"the system differs after apt remove + autoremove (< before, > after):\n{diff}"


def test_clean_shutdown_leaves_the_root_filesystem_clean(s: Session):
    s.vm.send("systemctl poweroff")
    assert s.vm.wait_exit(600) == 0
    status, out = s.machine.fsck()
    assert status == 0, out
