"""Fixtures: the synthetic kernel and its ELF cores (generated in-process, cached per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image import synthkernel


@pytest.fixture(scope="session")
def synth() -> synthkernel.SynthKernel:
    return synthkernel.build()


@pytest.fixture(scope="session")
def synth_elf(synth: synthkernel.SynthKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("synth") / "vmcore"
    synth.write_elf(p)
    return p


@pytest.fixture(scope="session")
def workload_1g():  # noqa: ANN201 - RealDump; imported lazily so non-VM tests never touch the harness
    from tests.vm.vmcores import workload_dump

    return workload_dump("wl1g")


@pytest.fixture(scope="session")
def workload_2g_smp2():  # noqa: ANN201 - RealDump: 2 GiB, 2 vCPUs, a bigger workload
    from tests.vm.vmcores import workload_dump

    return workload_dump("wl2g", memory_mb=2048, smp=2, anon_mb=320, tmpfs_mb=200, bdev_mb=48)


@pytest.fixture(scope="session")
def kdump_1g():  # noqa: ANN201 - RealDump: /proc/vmcore of a kdump kernel (crashkernel=256M), same workload
    from tests.vm.vmcores import workload_dump

    return workload_dump("kd1g", method="kdump")


@pytest.fixture(scope="session")
def workload_1g_linux73():  # noqa: ANN201 - RealDump: the same 1 GiB workload on the 7.3 kernel line
    from tests.vm.vmcores import workload_dump

    return workload_dump("wl1g-7.3", line="7.3")
