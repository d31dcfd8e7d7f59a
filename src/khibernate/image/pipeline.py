"""The writers' shared pipeline: a producer fills buffers in order (classify, gather), worker threads transform them
(compress; the GIL is released in zstd and in the native kernel), and results come back in submission order for
one writer to append.  Memory stays bounded: at most ``depth`` buffers are in flight whatever the dump size."""

from __future__ import annotations

import collections
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Generic, TypeVar

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


class EarlyWriteback:
    """Starts the kernel writing ``out`` back every ``step`` bytes (POSIX_FADV_DONTNEED on what was written: async
    writeback, then the clean pages leave the page cache), so the final fsync waits for little and a large image
    does not pile up as dirty memory.  A no-op for pipes, sockets and file objects without a descriptor."""

    def __init__(self, out: BinaryIO, start: int, step: int = 16 << 20):
        self.out, self.done, self.step = out, start, step
        try:
            self.fd: int | None = out.fileno()
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                self.fd = None
        except (AttributeError, OSError, ValueError):
            self.fd = None

    def written(self, pos: int) -> None:
        """``out`` now holds ``pos`` bytes (offset of the stream's end)."""
        if self.fd is None or pos - self.done < self.step:
            return
        self.out.flush()
        try:
            os.posix_fadvise(self.fd, self.done, pos - self.done, os.POSIX_FADV_DONTNEED)
        except OSError:
            self.fd = None
            return
        self.done = pos
