"""The page filter against the guest kernel's own /proc/kpageflags (snapshot taken right before the dump)."""

from __future__ import annotations

import numpy as np
import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.pagefilter import PageClass, PageFilter
from khibernate.image.plan import plan
from khibernate.image.sources import open_source
from tests.vm.oracle import confusion, kpageflags_classes
from tests.vm.vmcores import RealDump

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("dump", ["workload_1g", "workload_2g_smp2", "kdump_1g", "workload_1g_linux73"])
def test_filter_agrees_with_kpageflags(dump: str, request: pytest.FixtureRequest) -> None:
    real: RealDump = request.getfixturevalue(dump)
    with open_source(real.vmcore) as src:
        pf = PageFilter(src, vmcoreinfo.from_source(src))
        ours = np.concatenate([c for _, c in pf.classes()])
        # pfns the dump holds (kdump omits its own)
        ram = np.concatenate([np.frombuffer(ch.ram, dtype=bool) for ch in plan(src, None, 0)])
    oracle = kpageflags_classes(real.flags())
    n = min(len(ours), len(oracle))
    stable = real.stable()[:n]
    # pages whose state changed while the dump was taken (before/after snapshots differ) have no single truth
    unstable = int((ram[:n] & ~stable).sum())
    assert unstable <= 0.01 * n, f"{unstable} of {n} pfns changed state around the dump: the oracle is too noisy"
    keep = ram[:n] & stable
    matrix, table = confusion(ours[:n][keep], oracle[:n][keep])
    print(f"\nfilter vs /proc/kpageflags ({dump}, pfns; {unstable} left out: changed state around the dump):\n"
          + table)
    for c in PageClass:
        total = matrix[c].sum()
        if total:
            assert matrix[c, c] / total >= 0.999, f"{c.name}: {matrix[c, c]} of {total} agree\n{table}"
    # the workload must exercise the classes that matter
    for c in (PageClass.FREE, PageClass.USER, PageClass.CACHE, PageClass.OTHER):
        assert matrix[c].sum() > 1000, f"workload produced too few {c.name} pages\n{table}"


def test_qemu_paging_dump_matches_plain_dump(tmp_path) -> None:  # noqa: ANN001
    """dump-guest-memory paging=true (PT_LOADs per virtual mapping, vmalloc aliases) reads like paging=false."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    with VM(ensure_kernel(), memory_mb=512, name="image-paging", timeout=300) as vm:
        vm.qmp("stop")
        vm.qmp("dump-guest-memory", paging=True, protocol=f"file:{tmp_path / 'paging'}")
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{tmp_path / 'plain'}")
    got = {}
    for name in ("paging", "plain"):
        with open_source(tmp_path / name) as src:
            v = vmcoreinfo.from_source(src)
            got[name] = (np.concatenate([c for _, c in PageFilter(src, v).classes()]),
                         np.concatenate([np.frombuffer(ch.ram, dtype=bool) for ch in plan(src, None, 0)]))
            if name == "paging":
                first = src.read(0x1000000, 4096)
            else:
                assert src.read(0x1000000, 4096) == first
    (cp, rp), (cq, rq) = got["paging"], got["plain"]
    n = min(len(cp), len(cq))
    both = rp[:n] & rq[:n]
    assert both.sum() > 0.99 * rq[:n].sum() - 64
    assert np.array_equal(cp[:n][both], cq[:n][both])
