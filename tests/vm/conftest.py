"""Fixtures for the VM tests: the cached test kernel and a host check that fails (never skips) with what to do."""

from __future__ import annotations

import pytest

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
