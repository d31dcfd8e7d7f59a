"""Fixtures for the VM tests: the cached test kernel and real workload vmcores (made once, cached on disk).

Whether this host can run them at all is decided before any fixture by tests/conftest.py (skip with a reason, or
fail under KHIBERNATE_RUN_VM_TESTS=1).
"""

from __future__ import annotations

import pytest

from tests.image.conftest import synth, synth_elf  # noqa: F401  (the view mount tests mount the synthetic core)
from tests.vm.vmcores import RealDump, workload_dump
from vmtest.kernel import TestKernel, ensure_kernel
from vmtest.vm import VMError, check_host


@pytest.fixture(scope="session")
def test_kernel() -> TestKernel:
    """The jump-capable test kernel (built on first use, ~7 min; cached afterwards)."""
    try:
        check_host()
    except VMError as e:
        pytest.fail(f"VM tests cannot run here: {e}", pytrace=False)
    return ensure_kernel()


@pytest.fixture(scope="session")
def workload_1g() -> RealDump:
    """A QMP dump of a 1 GiB guest of the 6.12 test kernel under the standard workload."""
    return workload_dump("wl1g")


@pytest.fixture(scope="session")
def workload_2g_smp2() -> RealDump:
    """2 GiB, 2 vCPUs, a bigger workload."""
    return workload_dump("wl2g", memory_mb=2048, smp=2, anon_mb=320, tmpfs_mb=200, bdev_mb=48)


@pytest.fixture(scope="session")
def kdump_1g() -> RealDump:
    """/proc/vmcore of a kdump kernel (crashkernel=256M), same workload."""
    return workload_dump("kd1g", method="kdump")


@pytest.fixture(scope="session")
def workload_1g_linux73() -> RealDump:
    """The same 1 GiB workload on the 7.3 kernel line."""
    return workload_dump("wl1g-7.3", line="7.3")
