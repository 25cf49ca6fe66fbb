"""transfer.StreamReader over a fake s3fs: one GET per sequential run, seeks, retries mid-stream, early ends."""

from __future__ import annotations

import os
from typing import Any

import pytest
import xxhash
from fsspec.asyn import get_loop

from resumer.core.errors import CheckpointError
from resumer.formats.native.safetensors_io import readinto_exact
from resumer.storage import transfer


class FakeBody:
    def __init__(self, data: bytes, fail_at: int | None) -> None:
        self.data, self.pos, self.fail_at, self.closed = data, 0, fail_at, False

    async def read(self, n: int) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        n = min(n, 100_000, (self.fail_at - self.pos) if self.fail_at is not None else n)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


class FakeS3:
    """Just what StreamReader uses of s3fs: loop, split_path, _call_s3("get_object", Range=...)."""

    protocol = ("s3", "s3a")

    def __init__(self, data: bytes, fail_at: list[int] | None = None) -> None:
        self.data, self.fail_at = data, list(fail_at or [])
        self.loop = get_loop()
        self.ranges: list[tuple[int, int]] = []

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, key = path.split("/", 1)
        return bucket, key, None

    async def _call_s3(self, method: str, **kw: Any) -> dict[str, Any]:
        assert method == "get_object"
        start, end = (int(x) for x in kw["Range"].removeprefix("bytes=").split("-"))
        self.ranges.append((start, end))
        fail = self.fail_at.pop(0) - start if self.fail_at else None
        return {"Body": FakeBody(self.data[start:end + 1], fail)}


DATA = os.urandom(3_000_000)


def read(f: Any, n: int) -> bytes:
    buf = bytearray(n)
    readinto_exact(f, memoryview(buf), "s3://b/k")
    return bytes(buf)


def test_a_sequential_pass_is_one_get() -> None:
    fs = FakeS3(DATA)
    with transfer.StreamReader(fs, "b/k", len(DATA)) as f:
        got = b"".join(read(f, n) for n in (8, 1000, 1_500_000, len(DATA) - 1_501_008))
        assert f.read(10) == b""
    assert got == DATA
    assert fs.ranges == [(0, len(DATA) - 1)]


def test_seeks_reuse_the_stream_forward_and_open_a_new_one_backward_or_far(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "SKIP_BYTES", 500_000)
    fs = FakeS3(DATA)
    with transfer.StreamReader(fs, "b/k", len(DATA)) as f:
        f.seek(1000)  # near the start: the GET starts at 0 and reads through the header
        assert read(f, 100) == DATA[1000:1100]
        f.seek(300_000)  # a short gap: read through, same GET
        assert read(f, 100) == DATA[300_000:300_100]
        f.seek(2_000_000)  # far: a new GET there
        assert read(f, 100) == DATA[2_000_000:2_000_100]
        f.seek(10)  # backward: a new GET
        assert read(f, 100) == DATA[10:110]
    assert fs.ranges == [(0, len(DATA) - 1), (2_000_000, len(DATA) - 1), (0, len(DATA) - 1)]


def test_a_reset_mid_stream_is_retried_from_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "SKIP_BYTES", 1000)  # else a retry this near the start reads from byte 0
    fs = FakeS3(DATA, fail_at=[1_234_567, 2_500_000])
    with transfer.StreamReader(fs, "b/k", len(DATA)) as f:
        got = read(f, len(DATA))
    assert xxhash.xxh3_128(got).digest() == xxhash.xxh3_128(DATA).digest()
    assert fs.ranges == [(0, len(DATA) - 1), (1_234_567, len(DATA) - 1), (2_500_000, len(DATA) - 1)]


def test_an_object_shorter_than_the_manifest_says_is_a_clear_error() -> None:
    fs = FakeS3(DATA[:1_000_000])
    with transfer.StreamReader(fs, "b/k", len(DATA)) as f, pytest.raises(CheckpointError, match="ended early"):
        read(f, len(DATA))


def test_open_for_scan_picks_the_stream_for_s3fs_only() -> None:
    import fsspec

    assert isinstance(transfer.open_for_scan(FakeS3(DATA), "b/k", len(DATA)), transfer.StreamReader)
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/x/k", DATA)
    with transfer.open_for_scan(mem, "/x/k", len(DATA)) as f:
        assert isinstance(f, transfer.BlockReader)
        assert read(f, len(DATA)) == DATA


def _read_in_child(path: str, conn: Any) -> None:
    import fsspec

    with transfer.BlockReader(fsspec.filesystem("memory"), path, len(DATA), block_size=4 << 20) as f:  # 1 block
        conn.send(xxhash.xxh3_64_hexdigest(read(f, len(DATA))))


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="fork is POSIX's")
def test_a_forked_child_reads_with_a_pool_of_its_own() -> None:
    # The parent's pool threads are not copied into a forked child, but its pool still counted them as idle: a read
    # handed to it started no thread and never returned.
    import multiprocessing

    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe_file("/fork/k", DATA)
    with transfer.BlockReader(mem, "/fork/k", len(DATA), block_size=1 << 20) as f:  # 3 blocks: pool threads, idle
        assert read(f, len(DATA)) == DATA
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=("/fork/k", child))
    proc.start()
    got = parent.recv() if parent.poll(120) else None  # a bound on a hang, not a speed: a read takes milliseconds
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    assert got == xxhash.xxh3_64_hexdigest(DATA)
    assert proc.exitcode == 0
