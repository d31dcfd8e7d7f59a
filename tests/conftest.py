"""The test tiers for the whole suite: a test marked ``vm`` runs only where QEMU, root and the test kernels are.

See tests/tiers.py: elsewhere it skips with one line saying what is missing, or fails under
KHIBERNATE_RUN_VM_TESTS=1 (what scripts/test.sh and .ci/run set), so CI never skips a VM test.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiers import RUN_VM_TESTS, unavailable, vm_host_problem

problem = functools.cache(vm_host_problem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fast tier: mark every ``vm`` test skipped, with the reason, when this host cannot run it."""
    if RUN_VM_TESTS or not any(item.get_closest_marker("vm") for item in items):
        return
    reason = problem()
    if reason:
        skip = pytest.mark.skip(reason=f"{reason}; set KHIBERNATE_RUN_VM_TESTS=1 to make this a failure")
        for item in items:
            if item.get_closest_marker("vm"):
                item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """CI tier: a ``vm`` test that cannot run here fails before its fixtures start anything."""
    if RUN_VM_TESTS and item.get_closest_marker("vm"):
        reason = problem()
        if reason:
            unavailable(reason)


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the files one test module shares (saved images, exports, pristine disks), deleted when the
    module's last test is done: VM tests make GiB-sized files and the disk is shared (pytest deletes a passed test's
    own tmp_path, see pyproject.toml).  KHIBERNATE_KEEP_TMP=1 keeps it for inspection."""
    d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield d
    if not os.environ.get("KHIBERNATE_KEEP_TMP"):
        shutil.rmtree(d, ignore_errors=True)
