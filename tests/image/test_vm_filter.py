"""The page filter against the guest kernel's own /proc/kpageflags (snapshot taken right before the dump)."""

from __future__ import annotations

import numpy as np
import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.pagefilter import PageClass, PageFilter
from khibernate.image.plan import plan
from khibernate.image.sources import open_source
from tests.image.oracle import confusion, kpageflags_classes
from tests.image.vmcores import RealDump

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("dump", ["workload_1g", "workload_2g_smp2", "kdump_1g"])
def test_filter_agrees_with_kpageflags(dump: str, request: pytest.FixtureRequest) -> None:
    real: RealDump = request.getfixturevalue(dump)
    with open_source(real.vmcore) as src:
        pf = PageFilter(src, vmcoreinfo.from_source(src))
        ours = np.concatenate([c for _, c in pf.classes()])
        ram = np.concatenate([ch.ram for ch in plan(src, None, 0)])  # pfns the dump holds (kdump omits its own)
    oracle = kpageflags_classes(real.flags())
    n = min(len(ours), len(oracle))
    keep = ram[:n]
    matrix, table = confusion(ours[:n][keep], oracle[:n][keep])
    print(f"\nfilter vs /proc/kpageflags ({dump}, pfns):\n" + table)
    for c in PageClass:
        total = matrix[c].sum()
        if total:
            assert matrix[c, c] / total >= 0.999, f"{c.name}: {matrix[c, c]} of {total} agree\n{table}"
    # the workload must exercise the classes that matter
    for c in (PageClass.FREE, PageClass.USER, PageClass.CACHE, PageClass.OTHER):
        assert matrix[c].sum() > 1000, f"workload produced too few {c.name} pages\n{table}"
