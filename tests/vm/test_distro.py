"""khibernate on a real distribution, installed and used as a user would, on the Debian 12 machine (systemd 252,
udev, initramfs-tools; the modular KASLR 6.12-distro kernel installed as a package installs it; vmtest/rootfs.py).
One machine for the module, booted twice (the second boot is the resume), its tests in this order, each asserting
its own step:

1. `apt install ./khibernate_*.deb` from a shell pulls its dependencies from the machine's apt repository;
2. a store FILE on the root ext4 like a swap file (`target init FILE --size`) + `khibernate setup --target FILE`:
   ready, `CanHibernate=yes`, the initramfs rebuilt with the target, a second run changes nothing (the spare disk
   /dev/vdb gets `target init` too, for the snapshot of step 4);
3. `capture build` in the guest: this system's python3 and khibernate, the target disk's modules from /lib/modules;
4. memory as a distribution uses it (THP, hugetlbfs, KSM, a memcg-limited service) through a snapshot to /dev/vdb:
   the same pages at the same pfns, and the image holds each of them (read on the host);
5. a user's counter service runs; `systemctl hibernate` hibernates through khibernate into the store file (the
   capture kernel writes it through dm-linear over its extents) and the machine powers off (every wait fails at
   once, with the unit's journal or the console, when the unit fails or the guest says why);
6. power on: initramfs-tools' premount stage resumes it from the file (by device + offset, the root mounted
   read-only without journal replay) before the root is mounted read-write; the same boot runs on (boot_id, the
   counter's PID and count, udev and journald), `journalctl` shows that one boot with the hibernation in it, and
   the memory of step 4 is bit-exact again, also in the hibernation image (the file's extents read on the host);
7. the packaged khibernate-watch unit captures an LKDTM WARNING under /var/crash/khibernate/, the system runs on;
8. a copied store file (its extents moved, its recorded map not) is refused by snapshot and setup;
9. `apt remove khibernate` + `apt autoremove --purge` leave the system as it was before the install;
10. after a clean shutdown `e2fsck -fn` on the host finds the root filesystem clean.

A partition target through `systemctl hibernate` and the premount resume is the same path with a device in place
of the file (docs/distro.md: proven in a run by hand; the ramfs guests of tests/vm/test_hibernate.py resume from a
partition in every CI run): CI boots this guest once more only for what differs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from khibernate.store import extentmap
from tests.vm.guest import distro_memory as mem
from vmtest import diskfile, package, rootfs
from vmtest.machine import (
    AGENT_REARM_UNIT,
    Machine,
    unit_run_watcher,
    unit_start_stamp,
    wait_power_off,
    wait_resumed,
    wait_system_running,
)
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
GUEST = Path(__file__).parent / "guest"
MEM_DIR = "/run/khb-mem"
# (kind, pages, extra systemd-run properties): THP 8 MiB, hugetlbfs 8 MiB (4 huge pages), KSM 2 MiB (4 contents),
# plain anonymous 16 MiB in a service whose memory cgroup is limited to 64 MiB
HOLDERS = (("thp", 2048, ""), ("hugetlb", 2048, ""), ("ksm", 512, ""),
           ("anon", 4096, "-p MemoryMax=64M -p MemorySwapMax=0"))
MEMCG_FILL = "/var/tmp/khb-memcg.fill"
STORE_FILE = "/var/lib/khibernate/store"
STORE_FILE_MB = 1024


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
        self.machine.put_file(GUEST / "distro_memory.py", "/root/distro_memory.py")
        self.machine.extra_disks.append(diskfile.blank(self.machine.dir / "store.img", STORE_MB))
        self.vm = self.machine.vm(memory_mb=MEMORY_MB)
        t0 = time.monotonic()
        self.vm.start()
        wait_system_running(self.vm)
        FIGURES["boot_to_running_s"] = time.monotonic() - t0
        self.before: dict = {}
        self.watcher = ""  # the guest command waiting for systemd-hibernate.service's run to end
        self.memory: dict = {}  # the memory holders' report before the snapshot and the hibernation
        self.store_offset = -1  # the store file's first byte on the root partition (khibernate.target_map=)

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
           f"cat > /etc/systemd/system/vmtest-agent-rearm.service <<'EOF'\n{AGENT_REARM_UNIT}EOF\n"
           "systemctl daemon-reload && systemctl enable --now counter.service && "
           "systemctl enable vmtest-agent-rearm.service")
    n = vm.run(f"({FINGERPRINT}) > /root/fingerprint.before; wc -l < /root/fingerprint.before", timeout=900)
    assert int(n) > 10000
    t0 = time.monotonic()
    out = vm.run("cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./khibernate_*.deb", timeout=1800)
    FIGURES["apt_install_s"] = time.monotonic() - t0
    for dep in ("python3-zstandard", "python3-click", "python3-pyelftools", "python3-cffi", "python3-cryptography",
                "python3-packaging", "kexec-tools"):  # dmsetup: in the image already (libdevmapper's dependency)
        assert re.search(rf"Setting up {dep}\b", out), dep
    assert vm.run("command -v khibernate").strip() == "/usr/bin/khibernate"
    vm.run("python3 -c 'import khibernate.native._pages'")  # the package's compiled page kernel


def test_setup_with_a_store_file_makes_systemctl_hibernate_use_khibernate(s: Session):
    vm = s.vm
    assert "na" in vm.run(CAN_HIBERNATE)  # systemd's answer without swap
    vm.run("khibernate target init /dev/vdb", timeout=300)  # the snapshot's target (step 4)
    t0 = time.monotonic()
    vm.run(f"mkdir -p {STORE_FILE.rsplit('/', 1)[0]} && khibernate target init {STORE_FILE} --size {STORE_FILE_MB}M",
           timeout=1800)
    FIGURES["target_init_file_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    status, out = vm.run_status(f"khibernate setup --target {STORE_FILE}", timeout=1800)
    FIGURES["setup_s"] = round(time.monotonic() - t0, 1)
    assert status == 0 and "ready:" in out and "update-initramfs -u" in out, out
    assert re.search(r"capture environment \S+: [\d.]+ MiB \(built in \d+ s\)", out), out  # hibernate only jumps
    assert re.search(rf"^KHIBERNATE_TARGET={STORE_FILE}$", vm.run("cat /etc/khibernate.conf"), re.M)
    exec_start = vm.run("systemctl show -p ExecStart systemd-hibernate.service")
    assert "/usr/bin/khibernate" in exec_start and "systemd-sleep" not in exec_start, exec_start
    assert "yes" in vm.run(CAN_HIBERNATE)
    listing = vm.run("lsinitramfs /boot/initrd.img-$(uname -r)", timeout=600)
    assert "conf/conf.d/khibernate" in listing and "scripts/local-premount/khibernate" in listing
    stamp = vm.run("stat -c %Y /boot/initrd.img-$(uname -r)")
    again = vm.run(f"khibernate setup --target {STORE_FILE}", timeout=900)
    assert "nothing to change" in again and "(cached)" in again, again
    assert vm.run("stat -c %Y /boot/initrd.img-$(uname -r)") == stamp


def test_capture_environment_is_built_from_this_system(s: Session):
    """`capture build` in the guest: this system's python3 and khibernate, and the target disk's driver modules
    of this distribution kernel (virtio_blk and what it needs, from /lib/modules and modules.dep)."""
    vm = s.vm
    t0 = time.monotonic()
    out = vm.run("khibernate capture build --target /dev/vdb", timeout=1800)
    FIGURES["capture_build_s"] = round(time.monotonic() - t0, 1)
    path = out.strip().splitlines()[-1].split(":")[0]
    FIGURES["capture_initramfs_mib"] = round(int(vm.run(f"stat -c %s {path}")) / 2**20, 1)
    mods = vm.run(f"zstdcat {path} | busybox cpio -t 2>/dev/null | grep '\\.ko$' || true")
    assert "virtio_blk.ko" in mods and "virtio_pci.ko" in mods, mods


def start_memory_holders(vm: VM) -> None:
    """The holders as services (the anonymous one limited by its memory cgroup, after it read a file larger than
    the limit: the limit reclaimed its page cache), ksmd running; nothing of theirs migrates (mlocked, unevictable
    pages not compacted)."""
    ksm = "/sys/kernel/mm/ksm"
    vm.run(f"mkdir -p {MEM_DIR} && sysctl -qw vm.nr_hugepages=6 vm.compact_unevictable_allowed=0 && "
           f"echo 4096 > {ksm}/pages_to_scan && echo 20 > {ksm}/sleep_millisecs && echo 1 > {ksm}/run && "
           "findmnt -t hugetlbfs /dev/hugepages")
    for kind, pages, props in HOLDERS:
        pre = (f"dd if=/dev/zero of={MEMCG_FILL} bs=1M count=96 status=none && cat {MEMCG_FILL} > /dev/null && "
               f"rm {MEMCG_FILL} && ") if kind == "anon" else ""
        vm.run(f"systemd-run -q --unit=khb-mem-{kind} {props} /bin/sh -c "
               f"'{pre}exec python3 /root/distro_memory.py hold {kind} {pages} {MEM_DIR}'")
    vm.run(f"for i in $(seq 900); do [ $(ls {MEM_DIR}/*.pid 2>/dev/null | wc -l) = {len(HOLDERS)} ] && exit 0; "
           "sleep 1; done; systemctl status 'khb-mem-*' --no-pager; exit 1", timeout=1000)
    vm.run(f"for i in $(seq 900); do [ $(cat {ksm}/pages_sharing) -ge 508 ] && exit 0; sleep 1; done; "
           f"grep . {ksm}/*; exit 1", timeout=1000)


def memory_report(vm: VM, tag: str) -> dict:
    """Every holder's pages as it sees them now (distro_memory.py report)."""
    return json.loads(vm.run(f"python3 /root/distro_memory.py report {tag} {MEM_DIR}", timeout=600))


def check_memory_kinds(rep: dict) -> None:
    """Each holder's pages are of its kind: THP, hugetlbfs, KSM-merged, in the limited memory cgroup."""
    k = rep["kinds"]
    for kind, pages, _ in HOLDERS:
        r = k[kind]
        assert r["n_bad"] == 0 and r["pages"] == pages and -1 not in mem.expand(r["pfn_runs"]), (kind, r["bad_pages"])
        # every page is mlocked (smaps' Locked is proportional: a KSM page shared 128 times counts 1/128)
        assert kind == "hugetlb" or r["flags"]["mlocked"] == r["flags"]["distinct"], (kind, r["flags"])
    thp, huge, ksm = k["thp"]["flags"], k["hugetlb"]["flags"], k["ksm"]["flags"]
    assert k["thp"]["smaps"]["AnonHugePages"] >= 2048 * 4 and thp["thp"] == thp["distinct"] == 2048, k["thp"]
    hugetlb_kb = k["hugetlb"]["smaps"]["Private_Hugetlb"] + k["hugetlb"]["smaps"]["Shared_Hugetlb"]
    assert hugetlb_kb == 2048 * 4 and huge["huge"] == huge["distinct"] == 2048, k["hugetlb"]
    # merged: 512 pages on 4 pfns, ksmd's counters agree (6.12's /proc/kpageflags sets KPF_KSM on every anonymous
    # page, the THP and plain holders' too, so that bit proves nothing here)
    assert ksm["distinct"] == 4 and rep["ksm"]["pages_shared"] >= 4 and rep["ksm"]["pages_sharing"] >= 508, \
        (ksm, rep["ksm"])
    assert "/system.slice/khb-mem-anon.service" in k["anon"]["cgroup"], k["anon"]["cgroup"]


def same_memory(before: dict, after: dict) -> None:
    """Every holder's pages are where they were, with the same bytes."""
    for kind, r in before["kinds"].items():
        a = after["kinds"][kind]
        assert a["n_bad"] == 0, (kind, after["tag"], a["bad_pages"])
        assert a["sha256"] == r["sha256"] and a["pfn_runs"] == r["pfn_runs"], (kind, after["tag"])
        assert a["pid"] == r["pid"], (kind, after["tag"])  # the same process holds them


def image_holds_memory(store_img: Path, slot: int, rep: dict) -> int:
    """Read every holder's page from the slot's image on the host at the pfn pagemap reported; returns the count."""
    from khibernate.store import api as store

    src = store.open_slot(str(store_img), store.read(str(store_img)).slot(slot))
    n = 0
    try:
        for kind, r in rep["kinds"].items():
            pfns = mem.expand(r["pfn_runs"])
            data = b"".join(src.read_page(p) for p in pfns)
            bad = [i for i in range(len(pfns)) if data[i * mem.PAGE:(i + 1) * mem.PAGE] != mem.fill(kind, i)]
            assert not bad, f"slot {slot}: {kind} pages {bad[:10]} (pfns {[pfns[i] for i in bad[:10]]}) differ"
            assert hashlib.sha256(data).hexdigest() == r["sha256"], kind
            n += len(pfns)
    finally:
        src.close()
    return n


def test_memory_as_a_distribution_uses_it_survives_a_snapshot(s: Session):
    """THP-backed anonymous memory, hugetlbfs pages, KSM-merged pages and a memcg-limited service: a snapshot keeps
    every page in place and bit-exact, and the image holds each at the pfn pagemap reports (read on the host)."""
    vm = s.vm
    start_memory_holders(vm)
    memcg = "/sys/fs/cgroup/system.slice/khb-mem-anon.service"
    limit, current, events = vm.run(f"cat {memcg}/memory.max {memcg}/memory.current; "
                                    f"sed -n 's/^max //p' {memcg}/memory.events").split()
    assert int(limit) == 64 << 20 and int(current) <= int(limit) and int(events) > 0, (limit, current, events)
    before = memory_report(vm, "before")
    check_memory_kinds(before)
    s.memory = before
    st, out = vm.run_status("khibernate snapshot --target /dev/vdb --json", timeout=1800)
    assert st == 0, out[-3000:]
    r = json.loads(out[out.index("{\n"):])
    FIGURES.update(snapshot_pause_s=r["pause_seconds"], snapshot_capture_job_started_uptime_s=r[
        "capture_job_started_uptime"], snapshot_image_mb=round(r["bytes"] / 1e6, 1), snapshot_save_s=r["save_seconds"])
    same_memory(before, memory_report(vm, "after-snapshot"))
    FIGURES["memory_pages_checked_in_snapshot"] = image_holds_memory(s.machine.dir / "store.img", r["slot"], before)


def test_systemctl_hibernate_powers_the_machine_off(s: Session):
    vm = s.vm
    time.sleep(2)
    s.before = {"boot_id": vm.boot_id, "counter": counter(vm),
                "udev": vm.run("systemctl show -p MainPID --value systemd-udevd").strip(),
                "journald": vm.run("systemctl show -p MainPID --value systemd-journald").strip()}
    since, stamp = len(vm.console_text()), unit_start_stamp(vm, "systemd-hibernate.service")
    t0 = time.monotonic()
    vm.run("systemctl hibernate", timeout=120)
    s.watcher = vm.send(unit_run_watcher("systemd-hibernate.service", stamp))
    wait_power_off(vm, s.watcher, 1800, since=since)
    FIGURES["hibernate_s"] = time.monotonic() - t0
    console = vm.console_text()
    assert "hibernation image complete in slot" in console, console[-3000:]
    # the capture kernel wrote the store file through dm-linear over its extents (the disk under the root + offset)
    m = re.search(r"Command line: .*khibernate\.target=/dev/mapper/khibernate-store .*khibernate\.target_map="
                  r"(\d+):(\d+):(\d+)", console)
    assert m, console[-3000:]
    s.store_offset = int(m.group(3))
    # the capture environment was built in the guest from this system, with its disk's modules (capture build)
    m = re.search(r"khibernate-capture: job hibernate .* up (\d+\.\d+) s", console)
    assert m, console[-3000:]
    FIGURES["capture_kernel_boot_to_job_s"] = float(m.group(1))
    vm.close()


def test_the_next_boot_resumes_the_same_system(s: Session):
    assert s.before, "needs the hibernation of the test before"
    # the hibernated boot's QEMU, also when the test before failed without closing it (run 12 left it running for
    # two hours beside the next boot on the same disk): two QEMUs must never share the disk
    s.vm.close()
    s.vm = s.machine.vm(memory_mb=MEMORY_MB, wait_ready=False)
    t0 = time.monotonic()
    s.vm.start()
    vm = s.vm
    wait_resumed(vm, 1800, boot_id=s.before["boot_id"])
    FIGURES["resume_to_shell_s"] = time.monotonic() - t0
    # systemd-hibernate.service's run (khibernate hibernate, back after the resume) ended well; the harness's agent
    # was restarted after it (vmtest.machine.AGENT_REARM_UNIT), which ended the watcher sent before the hibernation
    assert sorted(vm.run("systemctl show -p ActiveState,Result systemd-hibernate.service").split()) == [
        "ActiveState=inactive", "Result=success"]  # systemctl prints them in its own order
    console = vm.console_text()
    assert f"khibernate: resume from {STORE_FILE}" in console, console[-3000:]
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


def test_journal_shows_one_boot_with_the_hibernation_in_it(s: Session):
    vm = s.vm
    boots = [b for b in vm.run("journalctl --list-boots --no-pager").splitlines()
             if re.match(r"\s*-?\d+\s+[0-9a-f]{32}", b)]
    assert len(boots) == 1, boots
    log = vm.run("journalctl -b 0 --no-pager -o cat -u systemd-hibernate.service -u counter.service", timeout=120)
    hib = log.find("khibernate")
    assert hib >= 0 and "resumed from slot" in log[hib:] and re.search(r"tick \d+", log[hib:]), log[-3000:]
    # the hibernation booted the capture environment setup had built: it only jumped
    assert re.search(r"hibernate: slot .* initramfs \S+ \(cached\)", log), log[-3000:]
    vm.run("logger -t after-resume journald-runs-on && sleep 1 && journalctl -b 0 -t after-resume | grep -q runs-on")


def store_file_from_disk(disk: Path, offset: int, dest: Path) -> None:
    """The store file's bytes as the capture kernel wrote them, gathered on the host from the root partition of
    ``disk`` by the extent map the file keeps at ``offset`` (the guest runs on; the image was written raw)."""
    base = rootfs.PARTITION_OFFSET
    with open(disk, "rb") as d, open(dest, "wb") as out:
        d.seek(base + offset + extentmap.MAP_OFFSET)
        m = extentmap.parse(d.read(extentmap.MAP_BYTES_MAX))
        assert m.resume_offset == offset, (m.resume_offset, offset)
        out.truncate(m.file_bytes)
        for e in m.extents:
            for pos in range(0, e.length, 1 << 20):
                n = min(1 << 20, e.length - pos)
                d.seek(base + e.physical + pos)
                chunk = d.read(n)
                if chunk.count(0) != n:  # sparse: zeros stay holes
                    out.seek(e.logical + pos)
                    out.write(chunk)


def test_memory_is_bit_exact_after_the_resume(s: Session, tmp_path: Path):
    """The holders' pages after hibernate + resume: same pfns, same bytes, the same services running; the
    hibernation image holds each at its pfn (read on the host)."""
    assert s.memory, "needs the memory holders of the snapshot test"
    vm = s.vm
    after = memory_report(vm, "after-resume")
    same_memory(s.memory, after)
    check_memory_kinds(after)
    slot = int(re.search(r"resumed from slot (\d+)", vm.run("journalctl -b 0 -u systemd-hibernate.service -o cat"))
               .group(1))
    assert re.search(rf"slot {slot}: resumed", vm.run(f"khibernate target list {STORE_FILE}"))
    copy = tmp_path / "store"
    store_file_from_disk(s.machine.disk, s.store_offset, copy)
    FIGURES["memory_pages_checked_in_hibernation_image"] = image_holds_memory(copy, slot, s.memory)
    vm.run("systemctl stop 'khb-mem-*' && rm -rf /run/khb-mem /dev/hugepages/khb-distro-memory && "
           "echo 2 > /sys/kernel/mm/ksm/run && sysctl -qw vm.nr_hugepages=0 vm.compact_unevictable_allowed=1")


def test_watch_service_captures_a_warning_and_the_system_runs_on(s: Session):
    """The package's khibernate-watch unit on setup's target: an LKDTM WARNING -> one capture under
    /var/crash/khibernate/<date>-warn/ (vmcore, dmesg.txt, event.json); journald and the counter run on."""
    vm = s.vm
    vm.run("systemctl enable --now khibernate-watch.service")
    try:
        vm.run("for i in $(seq 120); do journalctl -b 0 -u khibernate-watch -o cat | grep -q 'following /dev/kmsg' "
               "&& exit 0; sleep 1; done; journalctl -b 0 -u khibernate-watch -o cat | tail -20; exit 1", timeout=300)
        pid, n = counter(vm)
        vm.run("echo WARNING > /sys/kernel/debug/provoke-crash/DIRECT")
        t0 = time.monotonic()
        # event.json is written last, whether the capture and its export succeeded or not
        vm.run("for i in $(seq 1200); do ls /var/crash/khibernate/*-warn/event.json >/dev/null 2>&1 && exit 0; "
               "sleep 1; done; journalctl -b 0 -u khibernate-watch -o cat | tail -30; exit 1", timeout=1500)
        event = vm.run("cat /var/crash/khibernate/*-warn/event.json")
        assert '"ok": true' in event and '"error"' not in event, event
        FIGURES["watch_warning_to_capture_s"] = time.monotonic() - t0
        folders = vm.run("ls -d /var/crash/khibernate/*/").split()
        assert len(folders) == 1 and folders[0].rstrip("/").endswith("-warn"), folders
        assert "WARNING:" in vm.run(f"cat {folders[0]}dmesg.txt")
        assert int(vm.run(f"stat -c %s {folders[0]}vmcore")) > 1 << 20
        assert vm.run("systemctl is-active counter.service systemd-journald khibernate-watch").split() == ["active"] * 3
        now_pid, now_n = counter(vm)
        assert now_pid == pid and now_n > n
        vm.run("logger -t after-capture still-here && sleep 1 && journalctl -b 0 -t after-capture | grep -q still-here")
    finally:  # disabled also when the capture failed: the removal's fingerprint must not see it
        vm.run("systemctl disable --now khibernate-watch.service")


def test_a_copied_store_file_is_refused(s: Session):
    """A copy (what a backup restore or a defragmenter does): the recorded map no longer says where the file is, so
    snapshot and setup refuse it before anything is frozen or written."""
    vm = s.vm
    vm.run(f"cp {STORE_FILE} {STORE_FILE}.copy && mv {STORE_FILE}.copy {STORE_FILE} && sync", timeout=600)
    mark = len(vm.console_text())
    status, out = vm.run_status(f"khibernate snapshot --target {STORE_FILE}", timeout=300)
    assert status != 0 and "has moved on the device" in out, out
    assert "Freezing user space" not in vm.console_text()[mark:]
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    status, out = vm.run_status(f"khibernate setup --target {STORE_FILE}", timeout=300)
    assert status == 1 and "has moved on the device" in out, out
    vm.run(f"rm -r {STORE_FILE.rsplit('/', 1)[0]}")


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
