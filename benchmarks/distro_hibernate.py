"""Hibernate and resume figures of the Debian 12 machine (systemd, initramfs-tools, the 6.12-distro kernel), khibernate
beside swsusp in the same run:

    python3 benchmarks/distro_hibernate.py [--memory MB]

One machine (vmtest.machine, a copy of the cached disk): khibernate installed with apt and set up on a store disk,
a counter service running.  Then, for each method:

- khibernate: `systemctl hibernate` (setup's drop-in runs `khibernate hibernate`);
- swsusp: `khibernate setup --remove`, a swap file on the root filesystem (`dd`, `mkswap`, `swapon`), initramfs-tools'
  `RESUME=UUID=<root> RESUME_OFFSET=<its first block>` in /etc/initramfs-tools/conf.d/resume, `update-initramfs -u`,
  `systemctl hibernate` (systemd-sleep writes `disk` to /sys/power/state).

Figures (host clock): hibernate = the `systemctl hibernate` command sent -> QEMU exits (powered off); resume = QEMU
started -> the counter service seen counting again in the resumed boot (same MainPID, value past the one before).
Printed as JSON, one object per method.
"""

from __future__ import annotations

import argparse
import json
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


def counter(vm) -> tuple[int, int]:
    pid = int(vm.run("systemctl show -p MainPID --value counter.service").strip())
    return pid, int(vm.run("cat /var/lib/counter/value").strip())


def swsusp_setup(vm) -> None:
    """A swap file on the root filesystem, with resume=/resume_offset= for initramfs-tools."""
    vm.run("khibernate setup --remove", timeout=900)
    vm.run(f"dd if=/dev/zero of=/swapfile bs=1M count={SWAP_MB} status=none && chmod 600 /swapfile && "
           "mkswap /swapfile >/dev/null && swapon /swapfile", timeout=600)
    offset = vm.run("python3 -c \"import os; from khibernate.store import fiemap; fd = os.open('/swapfile', 0); "
                    "print(fiemap.read_extents(fd)[0].physical // 4096)\"").strip()
    uuid = vm.run("findmnt -no UUID /").strip()
    vm.run(f"printf 'RESUME=UUID={uuid}\\nRESUME_OFFSET={offset}\\n' > /etc/initramfs-tools/conf.d/resume && "
           "update-initramfs -u", timeout=900)


def one_round(machine, method: str, memory_mb: int) -> dict[str, float]:
    from vmtest.machine import wait_system_running

    vm = machine.vm(memory_mb=memory_mb)
    vm.start()
    try:
        wait_system_running(vm)
        if method == "swsusp":
            swsusp_setup(vm)
            vm.run("swapon /swapfile 2>/dev/null || true")
        time.sleep(3)
        pid, n = counter(vm)
        t0 = time.monotonic()
        vm.run("systemctl hibernate", timeout=120)
        vm.wait_exit(1800)
        hibernate_s = time.monotonic() - t0
    finally:
        vm.close()
    vm = machine.vm(memory_mb=memory_mb, wait_ready=False)
    t0 = time.monotonic()
    vm.start()
    try:
        vm.wait_for_shell(timeout=1800, new_boot=False)
        shell_s = time.monotonic() - t0
        while True:
            now_pid, now_n = counter(vm)
            if now_pid == pid and now_n > n:
                break
            time.sleep(0.2)
        resume_s = time.monotonic() - t0
        vm.send("systemctl poweroff")
        vm.wait_exit(300)
    finally:
        vm.close()
    return {"method": method, "hibernate_s": round(hibernate_s, 1), "resume_to_shell_s": round(shell_s, 1),
            "resume_to_service_s": round(resume_s, 1)}


def main() -> None:
    from vmtest import package, rootfs
    from vmtest.machine import Machine, wait_system_running

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", type=int, default=1536, help="guest RAM in MiB")
    args = ap.parse_args()
    m = Machine(rootfs.distro_image(), "bench-distro-hib")
    m.create()
    deb = package.build()
    m.put_file(deb, f"/root/{deb.name}")
    with open(m.dir / "store.img", "wb") as f:
        f.truncate(1 << 30)
    m.extra_disks.append(m.dir / "store.img")
    with m.vm(memory_mb=args.memory) as vm:
        wait_system_running(vm)
        vm.run("cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./khibernate_*.deb", timeout=900)
        vm.run("khibernate target init /dev/vdb && khibernate setup --target /dev/vdb", timeout=900)
        vm.run(f"cat > /etc/systemd/system/counter.service <<'EOF'\n{COUNTER_UNIT}EOF\n"
               "systemctl daemon-reload && systemctl enable counter.service")
        vm.send("systemctl poweroff")
        vm.wait_exit(300)
    for method in ("khibernate", "swsusp"):
        print(json.dumps(one_round(m, method, args.memory)), flush=True)


if __name__ == "__main__":
    main()
