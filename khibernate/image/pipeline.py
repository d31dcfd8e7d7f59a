"""The writers' shared pipeline: a producer fills buffers in order (classify, gather), worker threads transform them
(compress; the GIL is released in zstd and in the native kernel), and results come back in submission order for
one writer to append.  Memory stays bounded: at most ``depth`` buffers are in flight whatever the dump size."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import zstandard

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(items: Iterable[T], work: Callable[[T], R], threads: int, depth: int | None = None
                ) -> Iterator[tuple[T, R]]:
    """(item, work(item)) for every item, in input order; ``work`` runs on ``threads`` threads with at most
    ``depth`` (default 2 x threads) items in flight, so the producer of ``items`` can recycle buffers as results are
    consumed.  An exception in ``work`` is raised here, in order."""
    depth = depth or 2 * threads
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="khibernate-pipe") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                while pending and (len(pending) >= depth or pending[0][1].done()):
                    first, fut = pending.popleft()
                    yield first, fut.result()
            while pending:
                first, fut = pending.popleft()
                yield first, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


class BufferPool(Generic[T]):
    """A fixed set of reusable buffers: get() one to fill, put() it back once its result has been written."""

    def __init__(self, make: Callable[[], T], count: int):
        self._free = [make() for _ in range(count)]

    def get(self) -> T:
        """A free buffer; RuntimeError if the pipeline holds them all (its depth is larger than the pool)."""
        if not self._free:
            raise RuntimeError("buffer pool exhausted: the pipeline's depth exceeds the pool size")
        return self._free.pop()

    def put(self, buf: T) -> None:
        self._free.append(buf)


class ZstdPerThread:
    """One ZstdCompressor per worker thread (a compressor is not thread-safe); frames carry size and checksum."""

    def __init__(self, level: int):
        self.level = level
        self._local = threading.local()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                                         write_content_size=True)
        return c.compress(data)
