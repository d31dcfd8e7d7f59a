"""Issue 25 in real VMs: a Xen 4.17 host (Debian's packages) with Debian's 6.1 as PV dom0, under QEMU/TCG.

khibernate loads through the hypervisor: a dom0 panic boots khibernate's capture kernel, whose /proc/vmcore (the
whole host, with Xen's notes) khibernate saves and exports, and crash opens the export with dom0's vmlinux; a
hypervisor crash of a Xen built with debug info, whose saved dump crash opens with that build's xen-syms; doctor's
verdict on the host; Xen→Xen (`kexec load --vmm`) and from the new Xen, Xen→Linux.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.tiers import HINT, unavailable
from vmtest import crash_build, debian, xen
from vmtest.xen import LOAD_VIRTIO_BLK, NATIVE_APPEND, XenVM

pytestmark = pytest.mark.vm

K = "khibernate"
CAPTURE_APPEND = f"{NATIVE_APPEND} nr_cpus=1 irqpoll reset_devices"


@pytest.fixture(scope="module")
def host() -> tuple[xen.XenHypervisor, debian.CachedKernel]:
    """The cached Xen and Debian kernel (setup fetched them; nothing is downloaded here)."""
    x, k = xen.cached(), debian.cached_kernel()
    if x is None or k is None:
        unavailable(f"no cached Xen hypervisor or Debian kernel in {xen.XEN_CACHE} ({HINT} or "
                    "`python3 -m vmtest.debian && python3 -m vmtest.xen`)")
    return x, k


@dataclasses.dataclass
class CrashRun:
    """What one host crash produced: doctor's verdict before it, the capture kernel's view, the saved image."""

    doctor: str
    doctor_json: dict
    status: str
    load_seconds: float
    kexec_tools_seconds: float
    info: dict
    cmdline: str
    image: Path
    boot_seconds: float
    console: str
    timings: dict


def _save_to_disk(vm, name: str, options: str = "") -> int:
    """In the capture kernel: save /proc/vmcore as /tmp/NAME (khibernate image save OPTIONS) and write it raw to the
    VM's disk (/dev/vda); returns its size in bytes (what _copy_out reads back on the host)."""
    vm.run(f"{K} image save /proc/vmcore /tmp/{name} {options} --threads 1", timeout=900)
    size = int(vm.run(f"stat -c %s /tmp/{name}").strip())
    vm.run(LOAD_VIRTIO_BLK, timeout=120)
    vm.run(f"dd if=/tmp/{name} of=/dev/vda bs=1M conv=fsync 2>&1 | tail -1", timeout=600)
    return size


def _copy_out(disk: Path, size: int, dest: Path) -> Path:
    """The first ``size`` bytes of the VM's disk (an image _save_to_disk wrote) as ``dest``."""
    with open(disk, "rb") as src, open(dest, "wb") as dst:
        dst.write(src.read(size))
    return dest


@pytest.fixture(scope="module")
def dom0_crash(host, module_tmp) -> CrashRun:
    """Boot the host, ask doctor, load the capture kernel with kexec-tools (timed, then unloaded) and with
    khibernate, crash dom0 (sysrq-c); in the capture kernel save /proc/vmcore and copy the image to the disk."""
    x, k = host
    out = module_tmp
    # the capture kernel keeps the saved image in its RAM (ramfs) before copying it to the disk: 512 MiB region
    with XenVM(x, k, name="xen-dom0-crash", disk_mb=512, memory_mb=2048, crash_mb=512) as vm:
        boot = vm.milestones["ready"]
        doctor = vm.run_status(f"{K} doctor", timeout=180)[1]
        doctor_json = json.loads(vm.run_status(f"{K} doctor --json", timeout=180)[1])
        t = time.monotonic()
        vm.run(f"kexec -p /boot/bzImage --initrd=/boot/initrd.img --append='{CAPTURE_APPEND}'", timeout=300)
        kt = time.monotonic() - t
        t = time.monotonic()
        assert "crash (kdump) image loaded: yes" in vm.run(f"{K} kdump status", timeout=120)
        cli_start = time.monotonic() - t  # a khibernate command that does next to nothing: Python's start
        vm.run("kexec -p -u", timeout=120)
        assert "crash (kdump) image loaded: no" in vm.run(f"{K} kdump status", timeout=120)
        t = time.monotonic()
        vm.run(f"{K} kdump load /boot/bzImage --initrd /boot/initrd.img --append '{CAPTURE_APPEND}'", timeout=300)
        kh = time.monotonic() - t
        status = vm.run(f"{K} kdump status", timeout=120)
        vm.mark()
        t0 = time.monotonic()
        vm.send("echo c > /proc/sysrq-trigger")
        vm.wait_for(r"Kernel panic - not syncing: sysrq triggered crash", timeout=120)
        vm.wait_for(r"\(XEN\) .*Executing kexec image", timeout=120)
        t1 = time.monotonic()
        vm.wait_for(r"Linux version", timeout=180)
        vm.wait_for_shell(timeout=400)
        t2 = time.monotonic()
        cmdline = vm.run("cat /proc/cmdline")
        info = json.loads(vm.run(f"{K} image info /proc/vmcore --json", timeout=300))
        size = _save_to_disk(vm, "host.khi")
        t3 = time.monotonic()
        console = vm.console_text()
    image = _copy_out(vm.disk, size, out / "host.khi")
    return CrashRun(doctor, doctor_json, status, kh, kt, info, cmdline, image, boot, console,
                    {"crash_to_xen_kexec": t1 - t0, "to_capture_shell": t2 - t1, "save_and_copy": t3 - t2,
                     "khibernate_status_command": cli_start})


def test_doctor_on_the_xen_host(dom0_crash):
    """doctor says what works on a Xen dom0 (kexec, kdump through Xen) and what cannot (jump, watch) and why."""
    d = dom0_crash.doctor_json
    assert d["possible"]["kexec"] is True and d["possible"]["kdump"] is True, dom0_crash.doctor
    assert d["possible"]["jump"] is False and d["possible"]["watch"] is False, dom0_crash.doctor
    assert "preserve-context" in dom0_crash.doctor and "Xen" in dom0_crash.doctor, dom0_crash.doctor
    assert "kexec : possible" in dom0_crash.doctor and "jump  : NOT possible" in dom0_crash.doctor


def test_dom0_panic_boots_khibernate_capture_kernel(dom0_crash):
    """khibernate's crash image went into Xen, and a dom0 panic made Xen boot it with the whole host's memory."""
    r = dom0_crash
    print(f"\n[xen] host boot {r.boot_seconds:.1f} s; kdump load: khibernate {r.load_seconds:.1f} s, kexec-tools "
          f"{r.kexec_tools_seconds:.1f} s; {r.timings}")
    assert "crash (kdump) image loaded: yes" in r.status
    assert re.search(r"\belfcorehdr=0x[0-9a-f]+\b", r.cmdline), r.cmdline
    assert "(XEN) Hardware Dom0 crashed" in r.console
    notes = r.info["notes"]
    assert "VMCOREINFO_XEN/0" in notes and "VMCOREINFO/0" in notes, notes  # Xen's and dom0's
    assert "Xen/16777217" in notes and "Xen/16777218" in notes and "CORE/1" in notes, notes  # crash info, regs
    assert r.info["osrelease"] == "6.1.0-57-amd64" or r.info["osrelease"].endswith("-amd64")
    # the low memory the capture kernel reuses is read from the backup: the dump starts at 0
    assert r.info["ranges"][0][0] == "0x0", r.info["ranges"]


@pytest.fixture(scope="module")
def host_elf(dom0_crash, module_tmp) -> Path:
    """The saved image, verified, exported as an ELF vmcore (what crash and makedumpfile read)."""
    elf = module_tmp / "host.elf"
    _khibernate("image", "verify", str(dom0_crash.image))
    _khibernate("image", "export", str(dom0_crash.image), str(elf), "--format", "elf")
    return elf


def _khibernate(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "khibernate", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_crash_reads_the_exported_host_dump(host_elf, host):
    """crash opens the export of the whole host's dump with dom0's debug vmlinux (it finds dom0's memory through
    the p2m root in Xen's crash info note): the panic, the tasks, the log.

    With Debian's hypervisor symbols it cannot: xen-hypervisor-4.17-amd64-dbg ships xen-syms with an ELF symbol
    table only, no DWARF, and crash's gdb needs DWARF ("no debugging data available", checked here so a xen-syms
    with debug info is noticed). The hypervisor-crash test boots a Xen built with debug info and opens its dump
    with that build's xen-syms (test_crash_opens_the_hypervisor_dump_with_xen_syms)."""
    x, k = host
    vmlinux = debian.cached_kernel()
    assert vmlinux is not None and vmlinux.vmlinux.exists(), "setup caches the Debian kernel's debug vmlinux"
    r = subprocess.run(["crash", "-s", str(vmlinux.vmlinux), str(host_elf)], input="sys\nps\nlog\nquit\n",
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert 'PANIC: "Kernel panic - not syncing: sysrq triggered crash"' in out, out[-3000:]
    assert "RELEASE: 6.1.0-57-amd64" in out or "RELEASE: " + k.kver in out, out[-3000:]
    assert re.search(r">\s+\d+\s+\S+\s+\d+\s+\S+\s+RU .* sh$", out, re.M), out[-3000:]  # the shell that crashed
    r = subprocess.run(["crash", "-s", str(x.syms), str(host_elf)], input="sys\nquit\n", capture_output=True,
                       text=True, timeout=300)
    assert "no debugging data available" in r.stdout + r.stderr


def test_xen_filters_agree_with_makedumpfile(host_elf, dom0_crash, tmp_path):
    """Xen's frame table read by khibernate: with the count_info layout makedumpfile 1.7.2 assumes, --xen dom0
    keeps exactly the frames `makedumpfile -X` keeps (both read the hypervisor's symbols from VMCOREINFO_XEN); with
    Xen 4.17's own layout it also drops the free frames makedumpfile misreads, leaving dom0's 640 MiB and the
    hypervisor's frames; --xen hypervisor keeps the hypervisor's alone."""
    from khibernate.image.sources import open_source
    from khibernate.image.sources import xen as xen_image

    mdf, ours, hv = tmp_path / "mdf-X.kdump", tmp_path / "ours-X.kdump", tmp_path / "ours-hv.kdump"
    r = subprocess.run(["makedumpfile", "-c", "-d", "1", "-X", str(host_elf), str(mdf)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for out, mode in ((ours, "dom0"), (hv, "hypervisor")):
        _khibernate("image", "export", str(dom0_crash.image), str(out), "--format", "kdump", "--compress", "zlib",
                    "--xen", mode)

    def dumpable(path: Path) -> int:
        with open_source(str(path)) as src:
            return int.from_bytes(src.page_present_mask(0, src.max_pfn), "little")

    a, b, c = dumpable(mdf), dumpable(ours), dumpable(hv)
    with open_source(str(dom0_crash.image)) as src:
        old = xen_image.XenFilteredSource(src, xen_image.frame_filter(src, "dom0", xen_image.PGC_BEFORE_4_17))
        as_makedumpfile = int.from_bytes(old.page_present_mask(0, src.max_pfn), "little")
        total = sum(r.size for r in src.ranges) // 4096
        # no frame --xen hypervisor keeps is dom0's (but the Xen heap pages Xen shares with it: shared_info ...)
        frames = xen_image.frame_filter(src, "hypervisor")
        dom0_owned = 0
        for pfn in (i // 8 for i, bit in enumerate(reversed(bin(c)[2:])) if bit == "1"):  # one byte per page
            raw = frames.aspace.read(frames.frame_table + pfn * frames.entry_size, frames.entry_size)
            count_info = int.from_bytes(raw[frames.off_count_info:frames.off_count_info + 8], "little")
            owner = int.from_bytes(raw[frames.off_domain:frames.off_domain + 4], "little")
            dom0_owned += bool(count_info & xen_image.PGC_ALLOCATED and owner == frames.domains[0]
                               and not count_info & xen_image.PGC_XEN_HEAP)  # Xen heap pages shared with dom0 stay
    kept, kept_hv, dom0_pages = b.bit_count(), c.bit_count(), 640 << 8
    print(f"\n[xen] frames: {total} in the dump; makedumpfile -X keeps {a.bit_count()}, --xen dom0 {kept}, "
          f"--xen hypervisor {kept_hv}")
    assert a == as_makedumpfile
    assert b & ~a == 0 and dom0_pages <= kept < dom0_pages + (64 << 8)
    assert 0 < kept_hv < 64 << 8 and dom0_owned == 0


def test_xen_to_xen_then_xen_to_linux(host):
    """kexec load --vmm: a new Xen boots with dom0 (command lines split at '--'); from its dom0, Xen→Linux."""
    x, k = host
    marker = f"khb.marker={uuid.uuid4().hex[:12]}"
    xen_args = xen.xen_cmdline(640, 256, "khb.xen=2")
    with XenVM(x, k, name="xen-to-xen", extra_files=[(x.image, "/boot/xen")]) as vm:
        first = vm.boot_id
        append = f"{xen_args} -- {xen.DOM0_APPEND} {marker}"
        # the new dom0's initrd: this one's root (initrd.img) plus /boot, so the new dom0 can kexec the kernel on
        vm.run("cd / && printf 'boot\\nboot/bzImage\\nboot/initrd-nopy.img\\n' | cpio -o -H newc > /tmp/boot.cpio "
               "&& cat /tmp/boot.cpio /boot/initrd.img > /tmp/dom0.img", timeout=120)  # before the zstd part
        plan = vm.run(f"{K} kexec load --vmm /boot/xen /boot/bzImage --initrd /tmp/dom0.img --append '{append}' "
                      "--dry-run", timeout=300)
        assert "EM_386" in plan and "multiboot information" in plan, plan
        # kexec-tools' equivalent, in the same dom0 (timed, then unloaded): its multiboot loader through libxenctrl
        t = time.monotonic()
        vm.run(f"kexec -l /boot/xen --type=multiboot-x86 --command-line='{xen_args}' "
               f"--module='/boot/bzImage {xen.DOM0_APPEND} {marker}' --module=/tmp/dom0.img", timeout=300)
        kexec_tools = time.monotonic() - t
        assert "kexec image loaded:         yes" in vm.run(f"{K} kexec status", timeout=120)
        vm.run(f"{K} kexec unload", timeout=120)
        t = time.monotonic()
        vm.run(f"{K} kexec load --vmm /boot/xen /boot/bzImage --initrd /tmp/dom0.img --append '{append}'",
               timeout=300)
        khb = time.monotonic() - t
        vm.mark()
        t0 = time.monotonic()
        vm.send(f"{K} kexec exec")
        vm.wait_for(r"\(XEN\) Xen version 4\.17", timeout=180)
        vm.wait_for(r"\(XEN\) Command line: .*khb\.xen=2", timeout=60)
        vm.wait_for_shell(timeout=400)
        second_xen = time.monotonic() - t0
        assert vm.boot_id != first
        assert marker in vm.run("cat /proc/cmdline").split()
        assert vm.run("cat /sys/hypervisor/type").strip() == "xen"
        vm.prepare()
        # from the new Xen's dom0: Xen→Linux, the kernel booted natively on the whole machine
        vm.run(f"{K} kexec load /boot/bzImage --initrd /boot/initrd-nopy.img --append '{NATIVE_APPEND} {marker}'",
               timeout=300)
        vm.mark()
        t0 = time.monotonic()
        vm.send(f"{K} kexec exec")
        vm.wait_for(r"Linux version", timeout=180)
        vm.wait_for_shell(timeout=300)
        linux = time.monotonic() - t0
        assert marker in vm.run("cat /proc/cmdline").split()
        assert vm.run_status("test -e /sys/hypervisor/type && cat /sys/hypervisor/type")[1].strip() != "xen"
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", vm.run("cat /proc/meminfo")).group(1))
        assert mem_kb > 1024 * 1024, mem_kb  # the whole machine (1.5 GiB), not dom0's 640 MiB
    print(f"\n[xen] Xen→Xen load: khibernate {khb:.1f} s, kexec-tools {kexec_tools:.1f} s; to the new dom0's shell "
          f"{second_xen:.1f} s; Xen→Linux to its shell {linux:.1f} s")


@pytest.fixture(scope="module")
def debug_host(host) -> tuple[xen.XenHypervisor, debian.CachedKernel]:
    """The cached Xen with its hypervisor swapped for the debug-info build of Debian's source (setup built it)."""
    x = xen.cached_debug()
    if x is None:
        unavailable(f"no debug-info Xen build in {xen.xen_build.BUILD_CACHE} (run `scripts/setup.sh --xen` as root "
                    "or `python3 -m vmtest.xen --debug-build`)")
    return x, host[1]


@dataclasses.dataclass
class HypervisorCrash:
    """What a hypervisor crash produced: the capture kernel's view and the saved image (hypervisor frames only)."""

    cmdline: str
    vmcore_size: int
    note_names: str
    info: dict
    image: Path
    console: str
    timings: dict


@pytest.fixture(scope="module")
def hv_crash(debug_host, module_tmp) -> HypervisorCrash:
    """Boot the debug-info Xen, load khibernate's capture kernel into it, crash Xen itself (its debug key 'C', what
    `xl debug-keys C` sends, typed on Xen's serial console after Ctrl-A x3); in the capture kernel save the
    hypervisor's frames of /proc/vmcore (`--xen hypervisor`) and copy the image to the disk."""
    x, k = debug_host
    out = module_tmp / "hv-crash"
    out.mkdir()
    with XenVM(x, k, name="xen-hv-crash", disk_mb=128, memory_mb=2048, crash_mb=512) as vm:
        assert "debug info" in x.version and re.search(r"\(XEN\) Xen version 4\.17", vm.console_text())
        vm.run(f"{K} kdump load /boot/bzImage --initrd /boot/initrd.img --append '{CAPTURE_APPEND}'", timeout=300)
        vm.mark()
        vm.console_write(b"\x01\x01\x01")
        vm.wait_for(r"\(XEN\) \*\*\* Serial input to Xen", timeout=60)
        vm.console_write(b"C")
        t0 = time.monotonic()
        vm.wait_for(r"\(XEN\) .*'C' pressed -> triggering crashdump", timeout=60)
        vm.wait_for(r"\(XEN\) .*Executing kexec image", timeout=120)
        vm.wait_for(r"Linux version", timeout=180)
        vm.wait_for_shell(timeout=400)
        t1 = time.monotonic()
        cmdline = vm.run("cat /proc/cmdline")
        size = int(vm.run("stat -c %s /proc/vmcore").strip())
        # the ELF header and notes open /proc/vmcore: Xen's VMCOREINFO and crash notes are among them
        names = vm.run("head -c 65536 /proc/vmcore | tr -c 'A-Za-z_' '\\n' | grep -E '^(VMCOREINFO_XEN|Xen|CORE)$' "
                       "| sort -u", timeout=120)
        info = json.loads(vm.run(f"{K} image info /proc/vmcore --json", timeout=300))
        saved = _save_to_disk(vm, "hv.khi", "--xen hypervisor")
        t2 = time.monotonic()
        console = vm.console_text()
    image = _copy_out(vm.disk, saved, out / "hv.khi")
    return HypervisorCrash(cmdline, size, names, info, image, console,
                           {"crash_to_capture_shell": t1 - t0, "save_and_copy": t2 - t1, "image_bytes": saved})


def test_hypervisor_crash_boots_khibernate_capture_kernel(hv_crash, debug_host):
    """Xen itself crashing starts the capture kernel khibernate loaded into Xen, with the host's memory and Xen's
    notes in /proc/vmcore; the crashed hypervisor is the debug-info build."""
    r = hv_crash
    print(f"\n[xen] hypervisor crash: {r.timings}")
    assert re.search(r"\belfcorehdr=0x[0-9a-f]+\b", r.cmdline), r.cmdline
    assert r.vmcore_size > 1 << 30, r.vmcore_size  # the machine's RAM (2 GiB) but the crash region
    assert r.note_names.split() == ["CORE", "VMCOREINFO_XEN", "Xen"], r.note_names
    built = debug_host[0].version.split("+")[0]  # 4.17.5+72-g01140da4e8-1 (debug info) -> 4.17.5
    assert r.info["xen_version"] == built, (r.info["xen_version"], debug_host[0].version)


@pytest.fixture(scope="module")
def hv_elf(hv_crash, module_tmp) -> Path:
    """The hypervisor crash's image, verified, exported as an ELF vmcore."""
    elf = module_tmp / "hv.elf"
    _khibernate("image", "verify", str(hv_crash.image))
    _khibernate("image", "export", str(hv_crash.image), str(elf), "--format", "elf")
    return elf


def test_crash_opens_the_hypervisor_dump_with_xen_syms(hv_elf, debug_host):
    """crash's Xen hypervisor mode (`crash xen-syms vmcore`) opens the export with the debug-info build's
    xen-syms: `sys` counts Xen's domains, `log` is Xen's console ring ending with the crash key and the
    kexec, `doms` reads dom0's struct domain (640 MiB: dom0_mem) — things only the hypervisor's symbols and types
    give. (`bt` prints "(no stack)": crash's Xen mode finds no stack for Xen >= 4.16's stack_base layout, see
    docs/xen.md; printed, not asserted.)

    The crash is the one setup built (trixie's 8.0.6): Debian 12's crash 8.0.2 stops at "cannot read cpu_info"
    on Xen >= 4.16 (checked here, so a fixed Debian crash is noticed)."""
    x, _ = debug_host
    built = crash_build.cached()
    assert built is not None, "scripts/setup.sh --xen builds crash (python3 -m vmtest.xen --debug-build)"
    commands = "sys\nlog\ndoms\nvcpus\npcpus\nbt\nquit\n"
    r = subprocess.run([str(built.binary), "-s", str(x.syms), str(hv_elf)], input=commands, capture_output=True,
                       text=True, timeout=900)
    out = r.stdout + r.stderr
    print(f"\n[xen] crash {built.info['version']} {x.syms} {hv_elf.name} (exit {r.returncode}):\n{out[-3000:]}")
    assert re.search(r"^\s*DOMAINS: 4$", out, re.M), out[-4000:]  # dom0, the idle domain, dom_xen, dom_io
    assert "(XEN) 'C' pressed -> triggering crashdump" in out, out[-4000:]
    assert "(XEN) Executing kexec image on cpu0" in out, out[-4000:]
    dom0 = rf"^[ >][ *]\s+0 [0-9a-f]{{16}} \S+ \S+\s+{640 << 8:x}\s+{640 << 8:x}\s+1\s"  # DID DOMAIN ST T MAX TOT VCPU
    assert re.search(dom0, out, re.M), out[-4000:]
    old = subprocess.run(["crash", "-s", str(x.syms), str(hv_elf)], input="quit\n", capture_output=True, text=True,
                         timeout=300)
    assert "cannot read cpu_info" in old.stdout + old.stderr, "Debian's crash reads Xen 4.17 now: drop the build"


def test_makedumpfile_reads_the_debug_xen_syms(hv_crash, debug_host, host, tmp_path):
    """makedumpfile --xen-syms reads the debug-info build's DWARF: the VMCOREINFO_XEN it generates from xen-syms
    (`-g`) has the same symbols, sizes and offsets as the note the crashed hypervisor itself wrote into the dump
    (so xen-syms is that hypervisor's). Debian's xen-syms, without DWARF, it cannot read."""
    x, _ = debug_host
    out = tmp_path / "vmcoreinfo-xen.txt"
    r = subprocess.run(["makedumpfile", "-g", str(out), "--xen-syms", str(x.syms)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    generated = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    in_dump = hv_crash.info["xen_vmcoreinfo"]
    shared = set(generated) & set(in_dump)
    assert {"SYMBOL(domain_list)", "SYMBOL(max_page)", "SIZE(page_info)", "OFFSET(page_info.count_info)",
            "OFFSET(domain.next_in_list)"} <= shared, (generated, in_dump)
    assert {k: generated[k] for k in shared} == {k: in_dump[k] for k in shared}
    debian_syms = host[0].syms
    r = subprocess.run(["makedumpfile", "-g", str(tmp_path / "debian.txt"), "--xen-syms", str(debian_syms)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, "Debian's xen-syms has DWARF now: the debug-info build may no longer be needed"
