"""`khibernate hibernate` and `khibernate resume` across a cold boot: the saved kernel runs on in a NEW QEMU process.

Per round trip: a workload guest (counter, mlocked pattern, tmpfs data, a file on a read-write ext4 disk) runs
`khibernate hibernate`; QEMU exits (the capture kernel powered it off); a new QEMU boots the same kernel with
`khibernate.resume=/dev/vda` on its command line (the test VM's /init runs `khibernate resume` before anything else,
like swsusp's resume=); the capture kernel restores the image and enters the saved kernel, whose `hibernate` command
finishes with a "resumed" report.  Then the original kernel must be the one running: the same boot_id, the counter
process counting on from where it stopped, the pattern and tmpfs data intact, the ext4 file readable, a new write
going through, and after a clean shutdown `e2fsck -fn` on the host finds the filesystem clean.

Also here: the same image refused the second time (normal boot), and by `resume --again` from a booted guest
because the ext4 disk moved on, then resumed with --again --ignore-changed-filesystems; every refusal before a
write (flipped byte, truncated slot, another kernel build, another memory size) boots on normally and leaves
the slot tried (never resumed by a later boot); a resume boot that reserved another crash region than the
hibernating one (either way round) resumes all the same; a boot that mounted and wrote the ext4 disk in
between — after a refused resume, or without the resume hook at all — makes the resume refuse, naming the
filesystem; and swsusp of the same guest for the README's figures.  Those refusals reuse the one hibernated image
(copies of its store and ext4 disks), so they cost boots, not hibernations.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from khibernate.store.superblock import FLAG_HIBERNATE
from tests.vm.test_snapshot import HELPERS, counter, start_workload
from vmtest.diskfile import blank, copy_sparse
from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

HIB = "khibernate hibernate --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img --json"
STORE_MB = 640
EXT4_MB = 64
FIGURES: dict[str, dict] = {}


def _ext4(path: Path) -> Path:
    blank(path, EXT4_MB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


def _slot_state(disk: Path, index: int) -> str:
    from khibernate.store import api as store

    return store.read(str(disk)).slot(index).state.name.lower()


def hibernate(kernel, name: str, tmp: Path, smp: int = 1, memory_mb: int = 1024,
              crash: str = "crashkernel=256M", before=None, command: str = HIB) -> dict:
    """Boot a workload guest (``crash``: its crashkernel= word), hibernate it (``command``); returns what the resume
    must find (QEMU has exited).  ``before(vm)`` runs once the workload runs, before the hibernation."""
    from vmtest.vm import VM

    ext4 = _ext4(tmp / f"{name}-ext4.img")
    with VM(kernel=kernel, append=crash, memory_mb=memory_mb, smp=smp, extra_files=HELPERS,
            disk_mb=STORE_MB, disks=[ext4], name=f"{name}-hib", timeout=300) as vm:
        vm.run("khibernate target init /dev/vda")
        start_workload(vm)
        vm.run("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && cp /tmp/blob.sha /mnt/blob.sha && "
               "echo written-just-before-hibernate > /mnt/before")  # no sync here: hibernate syncs first
        if before is not None:
            before(vm)
        boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
        pid, n = counter(vm)
        t0 = time.monotonic()
        cid = vm.send(command)
        assert vm.wait_exit(timeout=900 * TIMEOUT_SCALE) == 0, "the capture kernel should power the machine off"
        hib_s = time.monotonic() - t0
        console = vm.console_text()
        said = vm.agent_log.read_text(errors="replace")  # what `hibernate` said before the jump
        store_disk = vm.disk
    assert "hibernation image complete in slot" in console, console[-3000:]
    pristine = tmp / f"{name}-store-pristine.img"
    copy_sparse(store_disk, pristine)
    ext4_pristine = tmp / f"{name}-ext4-pristine.img"  # as the hibernated kernel left it: mounted, in use
    copy_sparse(ext4, ext4_pristine)
    from khibernate.store import api as store

    sb = store.read(str(store_disk))
    rec = max((s for s in sb.slots if s.state.name == "COMPLETE" and s.flags & FLAG_HIBERNATE), key=lambda s: s.seq)
    return {"kernel": kernel, "name": name, "smp": smp, "memory_mb": memory_mb, "store": store_disk, "ext4": ext4,
            "pristine": pristine, "ext4_pristine": ext4_pristine, "cid": cid, "boot_id": boot_id, "counter": (pid, n),
            "hibernate_seconds": hib_s, "slot": rec.index, "image_bytes": rec.length,
            "crash_region": _crash_region(console), "said": said}


def _crash_region(console: str) -> str:
    """A boot's crash region as khibernate prints a range ('[0x10000000-0x1fffffff]'), from the kernel's
    reservation line; '' when it reserved none."""
    m = re.search(r"crashkernel reserved: (0x[0-9a-f]+) - (0x[0-9a-f]+)", console)
    return f"[{int(m.group(1), 16):#x}-{int(m.group(2), 16) - 1:#x}]" if m else ""


def resume(h: dict, name: str, append: str = "", disks: list[Path] | None = None, crash: str = "crashkernel=256M"):
    """A new QEMU on the hibernated guest's disks with resume on its command line; returns (vm, report, seconds)
    with the VM still running (the caller closes it)."""
    from vmtest.vm import VM

    vm = VM(kernel=h["kernel"], append=f"{crash} khibernate.resume=/dev/vda {append}".strip(),
            memory_mb=h["memory_mb"], smp=h["smp"], disks=disks or [h["store"], h["ext4"]], name=name,
            timeout=300, wait_ready=False)
    t0 = time.monotonic()
    vm.start()
    try:
        st, out = vm.result_elsewhere(h["cid"], timeout=900 * TIMEOUT_SCALE)
        seconds = time.monotonic() - t0
        assert st == 0, out
        report = json.loads(out[out.index("{\n"):])  # after the JSON lines of --json's messages
        vm.wait_for_shell(timeout=60 * TIMEOUT_SCALE, new_boot=False)
    except BaseException:
        vm.close()
        vm._report_logs()
        raise
    return vm, report, seconds


def check_original_runs_on(vm, h: dict, report: dict) -> None:
    """The kernel running is the one that hibernated, and its data survived."""
    assert report["resumed"] is True and report["slot"] == h["slot"], report
    assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == h["boot_id"]
    pid0, n0 = h["counter"]
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0, ((pid0, n0), (pid1, n1))
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    assert vm.run("sha256sum -c /tmp/blob.sha").strip().endswith("OK")
    assert vm.run("cat /mnt/before").strip() == "written-just-before-hibernate"
    assert vm.run("cd /dev/shm && sha256sum -c /mnt/blob.sha").strip().endswith("OK")
    assert vm.run("echo written-after-resume > /mnt/after && sync && cat /mnt/after").strip() == "written-after-resume"
    assert vm.run("dd if=/dev/vda bs=4096 count=1 2>/dev/null | head -c 8").startswith("KHSTORE")
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"  # the stale capture image was unloaded
    assert vm.run("echo shell answers").strip() == "shell answers"
    text = vm.console_text()
    assert "khibernate-restore: entering the saved kernel" in text
    assert "all read back equal" in text


def shutdown_clean(vm, h: dict) -> None:
    """Unmount, power off, and let e2fsck on the host judge the ext4 filesystem."""
    vm.send("umount /mnt && sync && poweroff -f")
    assert vm.wait_exit(timeout=120 * TIMEOUT_SCALE) == 0
    vm.close()
    r = subprocess.run(["e2fsck", "-fn", str(h["ext4"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _figures(h: dict, report: dict, resume_s: float, key: str) -> None:
    restore = report["restore"]
    FIGURES[key] = {"hibernate_s": round(h["hibernate_seconds"], 1), "resume_s": round(resume_s, 1),
                    "image_mb": round(h["image_bytes"] / 1e6, 1), "restore_mb_s": restore["throughput_mb_s"],
                    "restore_write_s": round(restore["write_seconds"], 2),
                    "verify_s": restore.get("verify_seconds")}
    print(f"\n[hibernate {key}] hibernate (command -> power off) {h['hibernate_seconds']:.1f} s, resume (new QEMU "
          f"start -> saved kernel's command finished) {resume_s:.1f} s, image {h['image_bytes'] / 1e6:.1f} MB, "
          f"restore {restore['bytes_written'] / 1e6:.0f} MB at {restore['throughput_mb_s']} MB/s "
          f"(write+read-back {restore['write_seconds']:.2f} s, image checks {restore.get('verify_seconds')} s)")


def resume_and_check(h: dict, name: str, key: str, cpus: str | None = None, crash: str = "crashkernel=256M",
                     disks: list[Path] | None = None) -> str:
    """resume + check_original_runs_on (+ the CPUs online) + figures + clean shutdown with e2fsck; returns the
    resume boot's console up to the resume."""
    vm, report, resume_s = resume(h, name, crash=crash, disks=disks)
    try:
        text = vm.console_text()
        check_original_runs_on(vm, h, report)
        if cpus:
            assert vm.run("cat /sys/devices/system/cpu/online").strip() == cpus
        _figures(h, report, resume_s, key)
        shutdown_clean(vm, h if disks is None else {**h, "ext4": disks[1]})
    finally:
        vm.close()
    return text


@pytest.fixture(scope="module")
def hibernated_612(module_tmp):
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    return hibernate(ensure_kernel("6.12"), "hib-6.12", module_tmp)


def test_resume_refused_twice_then_again_and_swsusp(hibernated_612, tmp_path) -> None:
    """6.12, 1 CPU: resume, clean ext4; the second resume is refused (normal boot); --again resumes again;
    then swsusp of the same (resumed) guest to a swap disk and its resume=, for the figures."""
    from vmtest.vm import VM

    h = hibernated_612
    resume_and_check(h, "hib-6.12-resume", "6.12 1 GiB 1 CPU")
    assert _slot_state(h["store"], h["slot"]) == "resumed"
    # the same image a second time: refused before anything is touched, this boot goes on — also with the old
    # khibernate.resume_again=1 on the command line, which used to resume the same image at every boot
    with VM(kernel=h["kernel"], append="crashkernel=256M khibernate.resume=/dev/vda khibernate.resume_again=1",
            memory_mb=1024, disks=[h["store"], h["ext4"]], name="hib-6.12-twice", timeout=300) as vm:
        assert vm.boot_id != h["boot_id"]
        text = vm.console_text()
        assert "it was resumed before" in text and "--again" in text and "booting normally" in text, text
        assert "Freezing user space" not in text
    # --again (by hand: no kernel command-line word resumes an image again) from a booted guest: the resumed kernel
    # wrote and unmounted the ext4 disk, so it is refused, naming it; with --ignore-changed-filesystems it resumes
    # (the ext4 disk is the one that moved on: not checked after this)
    vm = VM(kernel=h["kernel"], append="crashkernel=256M", memory_mb=1024, disks=[h["store"], h["ext4"]],
            name="hib-6.12-again", timeout=300)
    try:
        vm.start()
        again = ("khibernate resume --target /dev/vda --again --kernel /boot/bzImage --capture-initrd "
                 "/boot/initrd.img")
        st, out = vm.run_status(again, timeout=300)
        assert st == 1 and "ext4 /mnt on /dev/vdb" in out and "changed since hibernate" in out, out
        assert "--again resumes an image" in out  # the warning
        vm.send(again + " --ignore-changed-filesystems")
        st, out = vm.result_elsewhere(h["cid"], timeout=900 * TIMEOUT_SCALE)
        assert st == 0, out
        report = json.loads(out[out.rindex('{\n  "resumed"'):])
        vm.wait_for_shell(timeout=60 * TIMEOUT_SCALE, new_boot=False)
        assert report["resumed"] and report["again"] is True
        assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == h["boot_id"]
        pid1, n1 = counter(vm)
        assert pid1 == h["counter"][0] and n1 >= h["counter"][1]
    finally:
        vm.close()
    # the peer for the figures: in-kernel hibernation of the same guest to a swap disk, then its resume=
    from vmtest.swsusp import swsusp_round_trip

    sw = swsusp_round_trip(h["kernel"], tmp_path, start_workload, HELPERS, h["memory_mb"], h["smp"],
                           name="hib-6.12-swsusp")
    k = next(iter(FIGURES.values()), {})
    FIGURES["swsusp"] = {"hibernate_s": round(sw.hibernate_s, 1), "resume_s": round(sw.resume_s, 1),
                         "image": sw.image()}
    print(f"\n[swsusp 6.12 1 GiB 1 CPU, same guest, LZO to a swap disk] hibernate (echo disk -> power off) "
          f"{sw.hibernate_s:.1f} s ({sw.image()}), resume (new QEMU start -> resumed command finished) "
          f"{sw.resume_s:.1f} s; khibernate: hibernate {k.get('hibernate_s')} s, resume {k.get('resume_s')} s, "
          f"image {k.get('image_mb')} MB")


def _refused(h: dict, name: str, store: Path, expect: str, kernel=None, memory_mb: int | None = None,
             crash: str = "crashkernel=256M", ext4: Path | None = None) -> str:
    """Boot with resume on a (damaged or foreign) image: the reason on the console, a normal boot, the slot tried
    (marked before any check: no later boot takes it) and otherwise untouched.
    The same two disks as at hibernate time: the firmware's memory map depends on the devices (SeaBIOS reserves
    more at the top of RAM with two virtio disks than with one), and another map is refused like another -m."""
    from vmtest.vm import VM

    before = _slot_state(store, h["slot"])
    with VM(kernel=kernel or h["kernel"], append=f"{crash} khibernate.resume=/dev/vda",
            memory_mb=memory_mb or h["memory_mb"], disks=[store, ext4 or h["ext4"]], name=name, timeout=300) as vm:
        text = vm.console_text()
        assert vm.boot_id != h["boot_id"]
        assert "booting normally" in text and re.search(expect, text), text[-4000:]
        assert vm.run("echo normal boot").strip() == "normal boot"
    assert before == "complete" and _slot_state(store, h["slot"]) == "tried"
    return text


def test_resume_refusals_touch_nothing(hibernated_612, tmp_path) -> None:
    """Flipped byte in a block, truncated slot, another kernel build, another -m: each is
    refused before any write (the flipped byte by the capture kernel, which jumps back), and the boot goes on."""
    from khibernate.store import api as store
    from vmtest.kernel import ensure_kernel

    h = hibernated_612
    rec = store.read(str(h["pristine"])).slot(h["slot"])
    ext4 = tmp_path / "ext4.img"  # as at hibernate time (the boots below only read it)
    copy_sparse(h["ext4_pristine"], ext4)

    def copy(name: str) -> Path:
        p = tmp_path / f"{name}.img"
        copy_sparse(h["pristine"], p)
        return p

    flipped = copy("flipped")
    src = store.open_slot(str(flipped), rec)
    entry = src.index[len(src.index) // 2]
    src.close()
    with open(flipped, "r+b") as f:
        f.seek(rec.offset + entry.offset + entry.csize // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    text = _refused(h, "hib-refuse-flipped", flipped, r"refused the image: .*(crc32|checksum)", ext4=ext4)
    assert "Freezing user space" in text  # this one went through the capture kernel, which jumped back
    truncated = copy("truncated")
    with open(truncated, "r+b") as f:
        f.seek(rec.offset + rec.length - 65536)
        f.write(bytes(65536))
    _refused(h, "hib-refuse-truncated", truncated, r"resume: .*(trailer|truncated|corrupt)", ext4=ext4)
    _refused(h, "hib-refuse-build", copy("build"), r"kernel release: image 6\.12.*7\.3", kernel=ensure_kernel("7.3"),
             ext4=ext4)
    _refused(h, "hib-refuse-mem", copy("mem"), r"memory ranges differ", memory_mb=1152, ext4=ext4)


SWAPPED = re.compile(r"resume: the image was saved from crash region (\[\S+\]), this boot's crash region "
                     r"(\[\S+\]): the "
                     r"restore kernel runs in the saved region all the same, the jump swapping this boot's 256 MiB")


def test_resume_when_this_boot_reserved_another_crash_region(hibernated_612, tmp_path) -> None:
    """Hibernated with crashkernel=256M (the top of RAM), resumed by a boot whose region is pinned elsewhere
    (crashkernel=256M@0x10000000, as KASLR moves it): the restore kernel runs in the saved region all the same
    (the jump swaps the resume boot's pages out of it) and the saved kernel runs on at this first boot, boot_id and
    workload intact, the ext4 clean. The same image and ext4 as hibernated (pristine copies)."""
    h = hibernated_612
    store, ext4 = tmp_path / "store.img", tmp_path / "ext4.img"
    copy_sparse(h["pristine"], store)
    copy_sparse(h["ext4_pristine"], ext4)
    text = resume_and_check(h, "hib-6.12-other-region", "6.12 1 GiB 1 CPU, resume boot's region elsewhere",
                            crash="crashkernel=256M@0x10000000", disks=[store, ext4])
    m = SWAPPED.search(text)
    assert m and m.group(1) == h["crash_region"] and m.group(2) == "[0x10000000-0x1fffffff]", (h["crash_region"],
                                                                                               text[-4000:])
    assert _slot_state(store, h["slot"]) == "resumed"


def _boot_and_write(h: dict, name: str, store: Path, ext4: Path) -> None:
    """A normal boot (no resume on its command line: another kernel, or an initramfs without the hook) that mounts
    the ext4 disk read-write, writes 16 MiB, deletes the file the hibernated kernel wrote, and shuts down."""
    from vmtest.vm import VM

    with VM(kernel=h["kernel"], append="crashkernel=256M", memory_mb=h["memory_mb"], disks=[store, ext4], name=name,
            timeout=300) as vm:
        vm.run("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && dd if=/dev/urandom of=/mnt/other-boot bs=1M count=16 "
               "2>/dev/null && rm /mnt/before && sync && umount /mnt")


def test_a_boot_that_wrote_the_disk_makes_the_resume_refuse(hibernated_612, tmp_path) -> None:
    """The data-loss case of issue 18, both ways: (1) a resume refused (another -m), a normal boot writes the ext4
    disk, the right -m → refused: the image was tried, and the ext4 filesystem is named as changed; (2) a boot
    without the resume hook writes the disk, then a resume boot → refused, naming it.  Each time the other boot's
    work survives (e2fsck clean, its file there, the deleted file gone)."""
    h = hibernated_612
    t0 = time.monotonic()
    for case in ("refused-first", "no-hook"):
        store, ext4 = tmp_path / f"{case}-store.img", tmp_path / f"{case}-ext4.img"
        copy_sparse(h["pristine"], store)
        copy_sparse(h["ext4_pristine"], ext4)
        if case == "refused-first":
            _refused(h, f"hib-{case}-mem", store, r"memory ranges differ", memory_mb=1152, ext4=ext4)
        _boot_and_write(h, f"hib-{case}-write", store, ext4)
        expect = "ext4 /mnt on /dev/vdb, UUID [0-9a-f-]+ changed since hibernate"
        if case == "refused-first":
            expect = "a boot tried it before.*besides: .*" + expect
        from vmtest.vm import VM

        with VM(kernel=h["kernel"], append="crashkernel=256M khibernate.resume=/dev/vda", memory_mb=h["memory_mb"],
                disks=[store, ext4], name=f"hib-{case}-resume", timeout=300) as vm:
            text = vm.console_text()
            assert vm.boot_id != h["boot_id"] and "booting normally" in text
            assert re.search(expect, text), text[-4000:]
            assert "Freezing user space" not in text  # refused before any jump
        assert _slot_state(store, h["slot"]) == "tried"
        r = subprocess.run(["e2fsck", "-fn", str(ext4)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        ls = subprocess.run(["debugfs", "-R", "ls -l /", str(ext4)], capture_output=True, text=True).stdout
        assert "other-boot" in ls and " before" not in ls, ls
    print(f"\n[hibernate] the two changed-disk refusals (5 boots) took {time.monotonic() - t0:.0f} s")


def test_hibernate_resume_two_cpus(tmp_path) -> None:
    """6.12 with 2 CPUs: secondary CPUs restart through the saved kernel's real-mode trampoline in low memory.
    Hibernated from a region pinned at 0x10000000, resumed by a boot that reserved crashkernel=256M at the top of
    RAM: the restore kernel runs in the pinned (saved) region all the same, and the saved kernel runs on at the
    first boot."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    h = hibernate(ensure_kernel("6.12"), "hib-6.12-smp2", tmp_path, smp=2, crash="crashkernel=256M@0x10000000")
    assert h["crash_region"] == "[0x10000000-0x1fffffff]", h["crash_region"]
    text = resume_and_check(h, "hib-6.12-smp2-resume", "6.12 1 GiB 2 CPUs, resume boot's region elsewhere",
                            cpus="0-1")
    m = SWAPPED.search(text)
    assert m and m.group(1) == "[0x10000000-0x1fffffff]" and m.group(2) != m.group(1), text[-4000:]


def test_hibernate_resume_7_3(tmp_path) -> None:
    """The 7.x kexec-jump ABI: the same round trip on 7.3."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    h = hibernate(ensure_kernel("7.3"), "hib-7.3", tmp_path)
    resume_and_check(h, "hib-7.3-resume", "7.3 1 GiB 1 CPU")


def test_failure_after_the_first_write_powers_off(hibernated_612, tmp_path) -> None:
    """A restore failing once memory is being overwritten never returns into the half-overwritten boot: the capture
    kernel powers the machine off (khibernate.fault=restore-raise), and the slot is already marked resumed."""
    from vmtest.vm import VM

    h = hibernated_612
    store, ext4 = tmp_path / "fault.img", tmp_path / "ext4.img"
    copy_sparse(h["pristine"], store)
    copy_sparse(h["ext4_pristine"], ext4)
    vm = VM(kernel=h["kernel"], append="crashkernel=256M khibernate.resume=/dev/vda "
            "khibernate.resume_append=khibernate.fault=restore-raise", memory_mb=h["memory_mb"],
            disks=[store, ext4], name="hib-fault-after-write", timeout=300, wait_ready=False)
    try:
        vm.start()
        assert vm.wait_exit(timeout=600 * TIMEOUT_SCALE) == 0
        text = vm.console_text()
    finally:
        vm.close()
    assert "FAILED after the first write to memory" in text and "powering off" in text, text[-3000:]
    assert "entering the saved kernel" not in text and "jumping back" not in text
    assert _slot_state(store, h["slot"]) == "resumed"
