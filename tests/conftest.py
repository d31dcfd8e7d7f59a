"""The test tiers for the whole suite: a test marked ``vm`` runs only where QEMU, root and the test kernels are.

See tests/tiers.py: elsewhere it skips with one line saying what is missing, or fails under
KHIBERNATE_RUN_VM_TESTS=1 (what scripts/test.sh and .ci/run set), so CI never skips a VM test.
"""

from __future__ import annotations

import pytest

from tests.tiers import unavailable, vm_host_problem

_problem: list[str | None] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip or fail a ``vm`` test before its fixtures start anything, if this host cannot run it."""
    if item.get_closest_marker("vm") is None:
        return
    if not _problem:
        _problem.append(vm_host_problem())
    if _problem[0]:
        unavailable(_problem[0])
