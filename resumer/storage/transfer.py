"""Fast reads from object stores, served as one sequential, seekable file.

A local file is read directly (the kernel's readahead is already the best client). An S3 object (s3fs)
is read through ``StreamReader``: one streaming GET from the read position to the end of the object,
read incrementally straight into the caller's buffer, so a sequential pass over a file costs one GET and
memory stays bounded (the HTTP client's small buffer); a seek elsewhere opens a new GET there (a short
forward seek reads through instead). Other remote filesystems are read through ``BlockReader``: large
blocks as parallel ranged GETs ahead of the reader, one GET per block, memory bounded by concurrency x
block size.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from fsspec.asyn import sync

from resumer.storage import retry
from resumer.storage.fs import is_local

# BlockReader: memory in flight is bounded by BLOCK_SIZE x CONCURRENCY (256 MiB).
BLOCK_SIZE = 64 * 1024 * 1024
CONCURRENCY = 4
# StreamReader: a forward seek up to this far reads through (and drops) the bytes instead of a new GET.
SKIP_BYTES = 16 * 1024 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="resumer-get")
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads were not copied, so work handed to its pool would wait forever
    (a read that never returns). The child makes a pool of its own when it first needs one."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool)


class _RemoteFile(io.RawIOBase):
    """What both readers share: a read-only, seekable file of known size over ``fs``'s ``path``."""

    def __init__(self, fs: Any, path: str, size: int | None) -> None:
        super().__init__()
        self.fs, self.path = fs, path
        self.size = int(size if size is not None else retry.call(lambda: fs.size(path), what="stat", uri=path))
        self.pos = 0
        self.requests = 0

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

    def read(self, size: int = -1) -> bytes:
        return _read_all(self, self.size, self.pos, size)


class BlockReader(_RemoteFile):
    """A read-only, seekable file over ``fs`` that prefetches fixed blocks with parallel ranged GETs."""

    def __init__(self, fs: Any, path: str, size: int | None = None, *, block_size: int = BLOCK_SIZE,
                 concurrency: int = CONCURRENCY) -> None:
        super().__init__(fs, path, size)
        self.block_size, self.concurrency = block_size, max(1, concurrency)
        self._blocks: dict[int, Future[bytes]] = {}

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
        view[:n] = memoryview(data)[off:off + n]  # a view: slicing the bytes would copy them first
        self.pos += n
        return n

    def close(self) -> None:
        for fut in self._blocks.values():
            fut.cancel()
        self._blocks.clear()
        super().close()


def _read_all(f: io.RawIOBase, size: int, pos: int, n: int | None) -> bytes:
    n = size - pos if n is None or n < 0 else min(n, size - pos)
    buf = bytearray(max(n, 0))
    got = 0
    while got < n:
        k = f.readinto(memoryview(buf)[got:])
        if not k:
            break
        got += k
    return bytes(buf[:got])


async def _fill(body: Any, view: memoryview, done: list[int]) -> None:
    """Read ``body`` into ``view[done[0]:]`` until it is full or the body ends; ``done[0]`` counts as it goes."""
    while done[0] < len(view):
        chunk = await body.read(len(view) - done[0])
        if not chunk:
            return
        view[done[0]:done[0] + len(chunk)] = chunk
        done[0] += len(chunk)


async def _close(body: Any) -> None:
    body.close()


class StreamReader(_RemoteFile):
    """A read-only, seekable file over an s3fs object: one streaming GET per sequential run of reads."""

    def __init__(self, fs: Any, path: str, size: int | None = None) -> None:
        super().__init__(fs, path, size)
        self._body: Any = None
        self._body_pos = 0  # the offset the open body delivers next
        self._scratch: memoryview | None = None

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection is dropped either way
                sync(self.fs.loop, _close, body)

    def _open(self, at: int) -> bool:
        """Leave an open body positioned at ``at``: the current one, read through a short gap, or a new GET
        (from the object's start when ``at`` is near it: a few header bytes read through cost less than a
        range that starts mid-object, which the local S3 server copies first). False: the body ended first."""
        if self._body is None or not self._body_pos <= at <= self._body_pos + SKIP_BYTES:
            self._drop()
            start = 0 if at <= SKIP_BYTES else at
            bucket, key, version = self.fs.split_path(self.path)
            extra = {"VersionId": version} if version else {}
            self.requests += 1
            resp = sync(self.fs.loop, self.fs._call_s3, "get_object", Bucket=bucket, Key=key,
                        Range=f"bytes={start}-{self.size - 1}", **extra)
            self._body, self._body_pos = resp["Body"], start
        if self._body_pos < at and self._scratch is None:
            self._scratch = memoryview(bytearray(1024 * 1024))
        while self._body_pos < at:
            assert self._scratch is not None
            part = self._scratch[:min(len(self._scratch), at - self._body_pos)]
            done = [0]
            try:
                sync(self.fs.loop, _fill, self._body, part, done)
            finally:
                self._body_pos += done[0]
            if done[0] < len(part):
                return False
        return True

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")[:max(0, self.size - self.pos)]
        if not len(view):
            return 0
        done = [0]

        def attempt() -> None:
            try:
                if not self._open(self.pos + done[0]):
                    return  # the object ended before the read position: a short read
                before = done[0]
                try:
                    sync(self.fs.loop, _fill, self._body, view, done)
                finally:
                    self._body_pos += done[0] - before
            except Exception:
                self._drop()  # a failed stream is not resumed in place: the retry opens a new GET
                raise

        retry.call(attempt, what="reading", uri=f"{self.path}[{self.pos + done[0]}:]")
        self.pos += done[0]
        return done[0]

    def close(self) -> None:
        self._drop()
        super().close()


def open_for_scan(fs: Any, path: str, size: int | None = None) -> BinaryIO:
    """A file to read sequentially and fast: the plain file locally, a StreamReader on S3 (s3fs), a
    prefetching BlockReader on other remote filesystems."""
    if is_local(fs):
        return fs.open(path, "rb")  # type: ignore[no-any-return]
    if hasattr(fs, "_call_s3") and hasattr(fs, "split_path"):
        return StreamReader(fs, path, size)  # type: ignore[return-value]
    return BlockReader(fs, path, size)  # type: ignore[return-value]
