"""The two test tiers: what a VM-tier test needs, and skip-or-fail when it is missing.

Without ``KHIBERNATE_RUN_VM_TESTS=1`` a test whose host or cached input is missing skips with a one-line reason
(a plain ``pytest`` as non-root stays green); with it (scripts/test.sh, .ci/run) the same test fails instead, and
missing test kernels are built rather than reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from vmtest.debian import CachedKernel

RUN_VM_TESTS = os.environ.get("KHIBERNATE_RUN_VM_TESTS", "") == "1"
HINT = "run scripts/setup.sh as root"


def unavailable(reason: str) -> NoReturn:
    """Skip (fast tier) or fail (KHIBERNATE_RUN_VM_TESTS=1) the current test because ``reason`` is missing."""
    if RUN_VM_TESTS:
        pytest.fail(f"{reason} (KHIBERNATE_RUN_VM_TESTS=1: not skipped)", pytrace=False)
    pytest.skip(f"{reason}; set KHIBERNATE_RUN_VM_TESTS=1 to make this a failure")


def vm_host_problem() -> str | None:
    """Why this host cannot boot the test VMs (root, QEMU, cached test kernels), or None if it can."""
    from vmtest.kernel import LINES, find_cached
    from vmtest.vm import VMError, check_host

    try:
        check_host()
    except VMError as e:
        return f"VM test: {e}"
    if not RUN_VM_TESTS:
        missing = [line for line in LINES if find_cached(line) is None]
        if missing:
            return f"VM test: test kernel {', '.join(missing)} not built ({HINT}, ~10 min per kernel)"
    return None


def kernel_bzimage(line: str = "6.12") -> Path:
    """The cached test kernel's bzImage: built now under KHIBERNATE_RUN_VM_TESTS=1, else skip if not cached."""
    from vmtest.kernel import ensure_kernel, find_cached

    tk = find_cached(line)
    if tk is None and RUN_VM_TESTS:
        try:
            tk = ensure_kernel(line)
        except OSError as e:
            unavailable(f"test kernel {line} not built, and building it here failed ({e}): {HINT}")
    if tk is None:
        unavailable(f"test kernel {line} not built ({HINT} or `python3 -m vmtest.kernel {line}`)")
    return tk.bzimage


def debian_vmlinuz() -> Path:
    """A Debian distribution kernel from /boot or the setup cache (never downloaded during a test)."""
    from vmtest import debian

    found = debian.find()
    if found is None:
        unavailable(f"no Debian kernel in /boot or {debian.DEBS} ({HINT} or `python3 -m vmtest.debian`)")
    return found


def debian_kernel_with_dbg() -> CachedKernel:
    """The cached Debian kernel package whose debug vmlinux setup extracted (never downloaded during a test)."""
    from vmtest import debian

    k = debian.cached_kernel()
    if k is None or not k.vmlinux.exists():
        unavailable(f"no Debian kernel with its debug vmlinux in {debian.DEBS} ({HINT} or `python3 -m vmtest.debian`)")
    return k
