"""The writers' shared pipeline: order, bounded depth, errors raised in order, buffer recycling."""

from __future__ import annotations

import random
import threading
import time

import pytest

from khibernate.image.pipeline import BufferPool, ordered_map


def test_results_come_back_in_input_order_with_bounded_depth() -> None:
    live = 0
    peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(random.random() / 500)
        with lock:
            live -= 1
        return i * i

    got = list(ordered_map(range(200), work, threads=3, depth=5))
    assert got == [(i, i * i) for i in range(200)]
    assert peak <= 3


def test_an_error_in_a_worker_is_raised_at_its_place() -> None:
    def work(i: int) -> int:
        if i == 7:
            raise ValueError("seven")
        return i

    seen = []
    with pytest.raises(ValueError, match="seven"):
        for i, _ in ordered_map(range(20), work, threads=2):
            seen.append(i)
    assert seen == list(range(7))


def test_the_producer_can_recycle_buffers_through_the_pool() -> None:
    pool = BufferPool(lambda: bytearray(8), 2 * 2 + 1)

    def items() -> object:
        for i in range(50):
            buf = pool.get()
            buf[0] = i
            yield buf

    for buf, v in ordered_map(items(), lambda b: b[0], threads=2, depth=4):  # type: ignore[arg-type]
        assert buf[0] == v
        pool.put(buf)
    with pytest.raises(RuntimeError, match="exhausted"):
        BufferPool(bytearray, 0).get()


def test_early_writeback_follows_a_file_and_ignores_a_pipe(tmp_path) -> None:  # noqa: ANN001
    import os

    from khibernate.image.pipeline import EarlyWriteback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"h" * 100)
        wb = EarlyWriteback(f, 100, step=1 << 20)
        for i in range(5):
            f.write(bytes(700_000))
            wb.written(100 + (i + 1) * 700_000)
        assert wb.fd is not None and wb.done == 100 + 4 * 700_000  # flushed at 1.4 MB and 2.8 MB
    r, w = os.pipe()
    with os.fdopen(w, "wb") as p:
        assert EarlyWriteback(p, 0).fd is None
    os.close(r)
