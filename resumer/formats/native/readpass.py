"""One pass over a data file: its header (parsed and checked against the manifest), then the wanted tensors
straight into fresh memory, hashing every byte on the way when asked. The bytes checksummed are the bytes
loaded: nothing is read twice, so nothing can change between verification and load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import xxhash

from resumer.core.dtypes import stored_as
from resumer.core.errors import CheckpointError
from resumer.formats.native.safetensors_io import CHECKSUM_ALGO, CHUNK, TensorLocation, read_header, readinto_exact


class _Tee:
    """Reads through ``f``, hashing (when ``h``) and counting every byte it hands out."""

    def __init__(self, f: BinaryIO, h: Any) -> None:
        self.f, self.h, self.count = f, h, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.h is not None:
            self.h.update(data)
        self.count += len(data)
        return data


def check_header(want: Mapping[str, TensorLocation], header: Mapping[str, TensorLocation], furi: str,
                 uri: str) -> None:
    """Every tensor the manifest places in this file is in its header at the same bytes, dtype and shape
    (a dtype safetensors has no code for is stored as raw bytes: see resumer.core.dtypes)."""
    for name, loc in want.items():
        got = header.get(name)
        if got is None:
            raise CheckpointError(f"{furi}: tensor {name!r} is in the manifest but not in the file's header. The "
                                  "checkpoint is corrupt; nothing was loaded.", uri=uri)
        if (got.offset, got.nbytes, got.dtype, got.shape) != (loc.offset, loc.nbytes, *stored_as(loc.dtype,
                                                                                                   loc.shape)):
            raise CheckpointError(
                f"{furi}: tensor {name!r} is {got.dtype}{list(got.shape)} at bytes {got.offset}-"
                f"{got.offset + got.nbytes} in the file's header, {loc.dtype}{list(loc.shape)} at {loc.offset}-"
                f"{loc.offset + loc.nbytes} in the manifest. The checkpoint is corrupt; nothing was loaded.", uri=uri)


class _Pass:
    """The position, byte count and hash of one pass over a file."""

    def __init__(self, f: BinaryIO, size: int, furi: str, h: Any, on_bytes: Callable[[int], None] | None) -> None:
        self.f, self.furi, self.h, self.on_bytes = f, furi, h, on_bytes
        self.pos = self.read = 0
        self.scratch = memoryview(bytearray(min(CHUNK, max(size, 1)))) if h is not None else None

    def count(self, n: int) -> None:
        self.pos += n
        self.read += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def skip_to(self, end: int) -> None:
        """Hashing: read (and hash) up to ``end``; else seek there."""
        if self.scratch is None:
            if end != self.pos:
                self.f.seek(end)
            self.pos = end
            return
        while self.pos < end:
            part = self.scratch[:min(len(self.scratch), end - self.pos)]
            readinto_exact(self.f, part, self.furi)
            self.h.update(part)
            self.count(len(part))

    def fill(self, view: memoryview) -> None:
        for j in range(0, len(view), CHUNK):
            piece = view[j:j + CHUNK]
            readinto_exact(self.f, piece, self.furi)
            if self.h is not None:
                self.h.update(piece)
        self.count(len(view))


def read_file(f: BinaryIO, size: int, furi: str, uri: str, *, want: Mapping[str, TensorLocation],
              regions: Sequence[tuple[int, int]], into: Callable[[int], memoryview], hashing: bool,
              on_bytes: Callable[[int], None] | None = None) -> tuple[str | None, int]:
    """Read ``f`` once from its start: the header, checked against ``want``; region ``i`` (offset, nbytes;
    sorted, not overlapping) into ``into(i)``, asked for just before it is read. With ``hashing`` every byte
    of the file is read and hashed; without, gaps are skipped. Returns (checksum or None, bytes read)."""
    h = xxhash.xxh3_128() if hashing else None
    f.seek(0)
    tee = _Tee(f, h)
    check_header(want, read_header(tee, size, furi), furi, uri)  # type: ignore[arg-type]
    p = _Pass(f, size, furi, h, on_bytes)
    p.count(tee.count)
    for i, (offset, nbytes) in enumerate(regions):
        if offset < p.pos:
            raise ValueError(f"read_file: region {i} at {offset} overlaps or is out of order")
        p.skip_to(offset)
        view = into(i)
        if len(view) != nbytes:
            raise ValueError(f"read_file: region {i} wants {nbytes} bytes, its buffer holds {len(view)}")
        p.fill(view)
    if h is None:
        return None, p.read
    p.skip_to(size)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}", p.read
