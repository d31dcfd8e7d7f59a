"""Hibernate and resume figures of the Debian 12 machine (systemd, initramfs-tools, the 6.12-distro kernel), khibernate
beside swsusp in the same run:

    python3 benchmarks/distro_hibernate.py [--memory MB] [--smp N]

One machine (vmtest.machine, a copy of the cached disk), a counter service running, three boots:

1. khibernate installed with apt, `target init` + `setup` on a store disk; `systemctl hibernate` (setup's drop-in runs
   `khibernate hibernate`), power off;
2. power on: initramfs-tools' premount resumes it; then `apt remove khibernate` (the system as before the install),
   a swap file on the root filesystem (`dd`, `mkswap`, `swapon`), `systemctl hibernate` (systemd-sleep writes `disk`
   to /sys/power/state: swsusp), power off;
3. power on with `resume=UUID=<root> resume_offset=<the swap file's first block>` on the command line (what a user
   puts into GRUB_CMDLINE_LINUX): initramfs-tools' own resume script resumes it.

Figures (host clock): hibernate = `systemctl hibernate` sent -> QEMU exits (powered off); resume = QEMU started ->
the counter service seen counting on (same MainPID, a value past the one before); also the resumed shell, the image
sizes and, for khibernate, the capture kernel's uptime when its job started.  Printed as JSON, one object per method.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTER_UNIT = """[Unit]
Description=counter
[Service]
ExecStart=/bin/sh -c 'mkdir -p /var/lib/counter; i=0; while :; do i=$((i+1)); echo $i > /var/lib/counter/value; \
sleep 1; done'
[Install]
WantedBy=multi-user.target
"""
SWAP_MB = 1024
STORE_MB = 1024


def counter(vm) -> tuple[int, int]:
    pid = int(vm.run("systemctl show -p MainPID --value counter.service").strip())
    return pid, int(vm.run("cat /var/lib/counter/value").strip())


def hibernate(vm) -> tuple[tuple[int, int], float, str]:
    """(counter before, seconds from `systemctl hibernate` to the power-off, the console)."""
    from vmtest.machine import unit_run_watcher, unit_start_stamp, wait_power_off

    time.sleep(3)
    before = counter(vm)
    since, stamp = len(vm.console_text()), unit_start_stamp(vm, "systemd-hibernate.service")
    t0 = time.monotonic()
    vm.run("systemctl hibernate", timeout=120)
    wait_power_off(vm, vm.send(unit_run_watcher("systemd-hibernate.service", stamp)), 1800, since=since)
    seconds = time.monotonic() - t0
    console = vm.console_text()[since:]
    vm.close()
    return before, seconds, console


def resume(machine, before: tuple[int, int], boot_id: str, memory_mb: int, smp: int, append: str = ""):
    """Power on; (the VM, seconds to the resumed shell, seconds to the counter counting on)."""
    from vmtest.machine import wait_resumed

    vm = machine.vm(extra_append=append, memory_mb=memory_mb, smp=smp, wait_ready=False)
    t0 = time.monotonic()
    vm.start()
    wait_resumed(vm, 1800, boot_id=boot_id)
    shell = time.monotonic() - t0
    while True:
        now = counter(vm)
        if now[0] == before[0] and now[1] > before[1]:
            return vm, shell, time.monotonic() - t0
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"the counter did not count on after the resume ({before} -> {now})")
        time.sleep(0.2)


def swap_file(vm) -> str:
    """A swap file on the root filesystem, active; returns resume= and resume_offset= for the command line."""
    vm.run(f"dd if=/dev/zero of=/swapfile bs=1M count={SWAP_MB} status=none && chmod 600 /swapfile && "
           "mkswap /swapfile >/dev/null && swapon /swapfile", timeout=900)
    offset = vm.run("filefrag -v /swapfile | awk '$1 == \"0:\" {print $4}'").strip().rstrip(".")
    uuid = vm.run("findmnt -no UUID /").strip()
    assert uuid and offset.isdigit(), (uuid, offset)
    return f"resume=UUID={uuid} resume_offset={offset}"


def main() -> None:
    from vmtest import diskfile, package, rootfs
    from vmtest.machine import AGENT_REARM_UNIT, Machine, wait_system_running

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", type=int, default=1536, help="guest RAM in MiB")
    ap.add_argument("--smp", type=int, default=1, help="guest CPUs")
    args = ap.parse_args()
    m = Machine(rootfs.distro_image(), "distro-hibernate-figures")
    m.create()
    deb = package.build()
    m.put_file(deb, f"/root/{deb.name}")
    m.extra_disks.append(diskfile.blank(m.dir / "store.img", STORE_MB))
    vm = m.vm(memory_mb=args.memory, smp=args.smp)
    vm.start()
    wait_system_running(vm)
    # the harness's agent is restarted after each hibernation (vmtest.machine.AGENT_REARM_UNIT)
    vm.run(f"cat > /etc/systemd/system/counter.service <<'EOF'\n{COUNTER_UNIT}EOF\n"
           f"cat > /etc/systemd/system/vmtest-agent-rearm.service <<'EOF'\n{AGENT_REARM_UNIT}EOF\n"
           "systemctl daemon-reload && systemctl enable --now counter.service && "
           "systemctl enable vmtest-agent-rearm.service")
    vm.run("cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./khibernate_*.deb", timeout=3600)
    vm.run("khibernate target init /dev/vdb && khibernate setup --target /dev/vdb", timeout=3600)
    boot_id = vm.boot_id
    before, hib_s, console = hibernate(vm)
    m_job = re.search(r"khibernate-capture: job hibernate .* up (\d+\.\d+) s", console)
    m_img = re.search(r"hibernation image complete in slot \d+ of \S+ \(([\d.]+) MB", console)
    vm, shell_s, res_s = resume(m, before, boot_id, args.memory, args.smp)
    print(json.dumps({"method": "khibernate", "hibernate_s": round(hib_s, 1), "resume_to_shell_s": round(shell_s, 1),
                      "resume_to_service_s": round(res_s, 1),
                      "capture_job_started_uptime_s": float(m_job.group(1)) if m_job else None,
                      "image_mb": float(m_img.group(1)) if m_img else None}), flush=True)
    vm.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y khibernate", timeout=3600)
    append = swap_file(vm)
    boot_id = vm.boot_id
    before, hib_s, console = hibernate(vm)
    m_img = re.search(r"PM: hibernation: Image created \((\d+) pages copied", console)
    vm, shell_s, res_s = resume(m, before, boot_id, args.memory, args.smp, append)
    print(json.dumps({"method": "swsusp", "hibernate_s": round(hib_s, 1), "resume_to_shell_s": round(shell_s, 1),
                      "resume_to_service_s": round(res_s, 1), "append": append,
                      "image_mb": round(int(m_img.group(1)) * 4096 / 1e6, 1) if m_img else None}), flush=True)
    vm.send("systemctl poweroff")
    vm.wait_exit(600)
    vm.close()


if __name__ == "__main__":
    main()
