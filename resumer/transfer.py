"""Fast reads from object stores: large ranged GETs, several in flight, served as one sequential file.

A local file is read directly (the kernel's readahead is already the best client). A remote object is
read through ``BlockReader``: it splits the object into large blocks (64 MiB by default) and keeps up to
``concurrency`` of them in flight as parallel ranged GETs ahead of the reader, so one pass over a
checkpoint costs one GET per block, and memory stays bounded (concurrency x block size).
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from resumer import retry

# Measured against the local S3 server (bench/s3_read.py): per-request cost dominates below ~64 MiB there;
# memory in flight is bounded by BLOCK_SIZE x CONCURRENCY (256 MiB).
BLOCK_SIZE = 64 * 1024 * 1024
CONCURRENCY = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="resumer-get")
        return _pool


class BlockReader(io.RawIOBase):
    """A read-only, seekable file over ``fs`` that prefetches fixed blocks with parallel ranged GETs."""

    def __init__(self, fs: Any, path: str, size: int | None = None, *, block_size: int = BLOCK_SIZE,
                 concurrency: int = CONCURRENCY) -> None:
        super().__init__()
        self.fs, self.path = fs, path
        self.size = int(size if size is not None else retry.call(lambda: fs.size(path), what="stat", uri=path))
        self.block_size, self.concurrency = block_size, max(1, concurrency)
        self.pos = 0
        self.requests = 0
        self._blocks: dict[int, Future[bytes]] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _fetch(self, k: int) -> bytes:
        start = k * self.block_size
        end = min(self.size, start + self.block_size)
        self.requests += 1
        return retry.call(lambda: self.fs.cat_file(self.path, start=start, end=end), what="reading",
                          uri=f"{self.path}[{start}:{end}]")

    def _schedule(self, first: int) -> None:
        last_block = (self.size - 1) // self.block_size
        for k in list(self._blocks):
            if k < first or k >= first + self.concurrency:
                self._blocks.pop(k).cancel()  # out of the window: a seek moved away
        for k in range(first, min(first + self.concurrency, last_block + 1)):
            if k not in self._blocks:
                self._blocks[k] = _executor().submit(self._fetch, k)

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        k = self.pos // self.block_size
        self._schedule(k)
        data = self._blocks[k].result()
        off = self.pos - k * self.block_size
        n = min(len(view), len(data) - off)
        view[:n] = data[off:off + n]
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        size = self.size - self.pos if size is None or size < 0 else min(size, self.size - self.pos)
        buf = bytearray(max(size, 0))
        got = 0
        while got < size:
            n = self.readinto(memoryview(buf)[got:])
            if not n:
                break
            got += n
        return bytes(buf[:got])

    def close(self) -> None:
        for fut in self._blocks.values():
            fut.cancel()
        self._blocks.clear()
        super().close()


def open_for_scan(fs: Any, path: str, size: int | None = None) -> BinaryIO:
    """A file to read sequentially and fast: the plain file locally, a prefetching BlockReader remotely."""
    from resumer.store import is_local

    if is_local(fs):
        return fs.open(path, "rb")  # type: ignore[no-any-return]
    return BlockReader(fs, path, size)  # type: ignore[return-value]
