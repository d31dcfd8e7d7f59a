"""Hibernate into a sealed store and resume it (issue 24): the key reaches the restoring capture kernel.

One guest boot and one resume boot (6.12, 1 GiB, 1 CPU, the workload of tests/vm/test_hibernate.py):

1. The guest makes its store sealed with a passphrase file in its ramfs root (memory, not disk); `hibernate`
   without the key is refused saying which option to give; with `--passphrase-file` the capture kernel seals the
   image and powers QEMU off.
2. A new QEMU boots with `khibernate.resume=/dev/vda`: the initramfs's `khibernate resume` (no key option) asks
   for the passphrase on the console, the test types it (no echo: it never appears on the console), the resume
   boot derives the image key, hands it to the restoring capture kernel through the mailbox page, which
   authenticates every block before it writes — and the saved kernel runs on (same boot_id, counter, pattern,
   tmpfs data, ext4 file).
3. In that resumed guest: `resume --check` with a wrong passphrase file says so, with the right one says the
   image would be resumed; then a byte of a block of the sealed slot is flipped ON THE HOST (the disk file QEMU
   has open, cache=unsafe: QEMU reads through the host page cache) and `resume --again` with the passphrase file
   is refused by the capture kernel (the block fails authentication) before any write: it jumps back and the
   guest runs on unchanged; the ext4 is clean at the end (e2fsck on the host).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.vm.test_hibernate import (
    HIB,
    _figures,
    _slot_state,
    check_original_runs_on,
    counter,
    hibernate,
    shutdown_clean,
)
from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

PASSPHRASE = "sealed resume: correct horse battery staple"
PASSFILE = "/tmp/passphrase"  # the guest's root is ramfs: memory, not disk
PROMPT = "khibernate: passphrase of the hibernation image in /dev/vda: "
RESUME_AGAIN = ("khibernate resume --target /dev/vda --again --ignore-changed-filesystems --kernel /boot/bzImage "
                "--capture-initrd /boot/initrd.img")


def _seal_the_store(vm) -> None:
    """The store made sealed (passphrase file in ramfs); `hibernate` without the key refused before anything."""
    vm.run(f"printf '%s\\n' '{PASSPHRASE}' > {PASSFILE} && chmod 600 {PASSFILE} && printf 'wrong\\n' > /tmp/wrong")
    out = vm.run(f"khibernate target init /dev/vda --force --passphrase-file {PASSFILE}", timeout=300)
    assert "sealing: sealed" in out, out
    st, out = vm.run_status(HIB, timeout=300)
    assert st != 0 and "give its key to `hibernate`" in out and "--passphrase-file FILE" in out, out
    assert "Freezing user space" not in vm.console_text()


def _flip_a_block_byte(h: dict) -> int:
    """Flip one byte in the middle of a block of the sealed slot, in the disk file on the host; its offset."""
    from khibernate.seal.keysource import Passphrase
    from khibernate.store import api as store

    rec = store.read(str(h["store"])).slot(h["slot"])
    with store.open_slot(str(h["store"]), rec, Passphrase(PASSPHRASE.encode())) as src:
        entry = src.index[len(src.index) // 2]
    at = rec.offset + entry.offset + entry.csize // 2
    with open(h["store"], "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    return at


def test_hibernate_sealed_resume_with_the_typed_passphrase(tmp_path) -> None:
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    t0 = time.monotonic()
    h = hibernate(ensure_kernel("6.12"), "hib-sealed", tmp_path, before=_seal_the_store,
                  command=f"{HIB} --passphrase-file {PASSFILE}")
    from khibernate.store import api as store
    from khibernate.store.superblock import STORE_SEALED

    assert store.read(str(h["store"])).flags & STORE_SEALED
    vm = VM(kernel=h["kernel"], append="crashkernel=256M khibernate.resume=/dev/vda", memory_mb=h["memory_mb"],
            smp=h["smp"], disks=[h["store"], h["ext4"]], name="hib-sealed-resume", timeout=300, wait_ready=False)
    t1 = time.monotonic()
    vm.start()
    try:
        vm.wait_for(re.escape(PROMPT), timeout=600 * TIMEOUT_SCALE)
        asked = time.monotonic()
        vm.console_write(PASSPHRASE.encode() + b"\n")
        st, out = vm.result_elsewhere(h["cid"], timeout=900 * TIMEOUT_SCALE)
        resume_s = time.monotonic() - t1
        assert st == 0, out
        report = json.loads(out[out.index("{\n"):])
        vm.wait_for_shell(timeout=60 * TIMEOUT_SCALE, new_boot=False)
        text = vm.console_text()
        assert PASSPHRASE not in text, "the typed passphrase was echoed on the console"
        assert "resume: the image is sealed: its key derived" in text, text[-4000:]
        assert re.search(r"free pages zeroed \(sealed", text), text[-4000:]
        check_original_runs_on(vm, h, report)
        _figures(h, report, resume_s, "6.12 1 GiB 1 CPU sealed")
        print(f"\n[hibernate sealed] prompt after {asked - t1:.1f} s of the resume boot; passphrase typed -> saved "
              f"kernel's command finished {time.monotonic() - asked:.1f} s")
        assert _slot_state(h["store"], h["slot"]) == "resumed"
        # --check with a key: a wrong passphrase is one clear error, the right one would resume (nothing marked)
        st, out = vm.run_status(f"{RESUME_AGAIN} --check --passphrase-file /tmp/wrong", timeout=300)
        assert st == 1 and "does not open" in out and "wrong key" in out, out
        st, out = vm.run_status(f"{RESUME_AGAIN} --check --passphrase-file {PASSFILE}", timeout=300)
        assert st == 0 and "would be resumed" in out, out
        # a byte of the sealed slot changed on the host: the capture kernel refuses it before any write
        _flip_a_block_byte(h)
        pid0, n0 = counter(vm)
        st, out = vm.run_status(f"{RESUME_AGAIN} --passphrase-file {PASSFILE}", timeout=900 * TIMEOUT_SCALE)
        assert st == 1 and re.search(r"refused the image: .*(sealed: changed since it was sealed|fails "
                                     "authentication)", out), out
        assert "Freezing user space" in vm.console_text()[len(text):]  # it went through the capture kernel
        assert "entering the saved kernel" not in vm.console_text()[len(text):]
        time.sleep(2.5)
        pid1, n1 = counter(vm)
        assert pid1 == pid0 and n1 > n0  # the guest runs on: nothing was written into its memory
        assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
        assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == h["boot_id"]
        shutdown_clean(vm, h)
    finally:
        vm.close()
    assert _slot_state(h["store"], h["slot"]) == "tried"
    print(f"\n[hibernate sealed] the whole test (one hibernation boot, one resume boot) {time.monotonic() - t0:.0f} s")
