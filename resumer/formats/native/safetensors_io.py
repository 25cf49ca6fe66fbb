"""The safetensors file format, written and read as a stream (no whole-file buffers, no pickle).

Writing hashes every byte as it goes (xxh3-128), so the manifest can record a checksum without a
second pass. Reading validates the header strictly before any byte is trusted: size limits, known
dtypes, shapes that match byte counts, offsets inside the file with no overlap.
Files are interoperable with the ``safetensors`` library (tested).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import xxhash

from resumer.core import dtypes
from resumer.core.errors import CheckpointError, UsageError
from resumer.core.signature import dtype_size
from resumer.formats.jsonvalue import JSONRefused, strict_loads
from resumer.formats.torch_dtypes import dtype_name

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Memory the header's JSON may take, estimated from its bytes before parsing (resumer.formats.jsonvalue.parse_cost).
PARSE_BUDGET_PER_BYTE = 16
MIN_PARSE_BUDGET = 64 * 1024 * 1024
CHUNK = 16 * 1024 * 1024
CHECKSUM_ALGO = "xxh3_128"
# Header code -> dtype name, from the one table (resumer.core.dtypes).
_FROM_ST = {d.code: d.name for d in dtypes.TABLE if d.code is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLocation:
    """Where one tensor's bytes lie in a file: absolute offset and length, plus its layout."""

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype,
                "shape": list(self.shape)}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def piece_checksum(data: Any) -> str:
    """The checksum of one tensor's bytes (a sharded checkpoint's pieces are checked one by one: a rank reads
    only the pieces it needs)."""
    return xxhash.xxh3_64_hexdigest(data)


def write_file(f: BinaryIO, file_name: str, items: Sequence[tuple[str, torch.Tensor]], *,
               pieces: dict[str, str] | None = None) -> tuple[int, str, dict[str, TensorLocation]]:
    """Write ``items`` as one safetensors file; returns (size, checksum, name -> location). With ``pieces``,
    each item's own checksum (``piece_checksum``) is put there too, by name."""
    header: dict[str, Any] = {}
    pos = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        code, shape = _header_layout(name, t)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    h = xxhash.xxh3_128()
    prefix = struct.pack("<Q", len(raw)) + raw
    h.update(prefix)
    f.write(prefix)
    index = {}
    for name, t in items:
        host = t.detach()
        host = host.cpu() if host.device.type != "cpu" else host
        host = host.contiguous()
        view = tensor_bytes(host)
        if pieces is not None:
            pieces[name] = piece_checksum(view)
        for i in range(0, len(view), CHUNK):
            piece = view[i:i + CHUNK]
            h.update(piece)
            f.write(piece)
        b, e = header[name]["data_offsets"]
        index[name] = TensorLocation(file=file_name, offset=start + b, nbytes=e - b,
                                     dtype=dtype_name(t.dtype), shape=tuple(t.shape))
    return start + pos, f"{CHECKSUM_ALGO}:{h.hexdigest()}", index


def _header_layout(name: str, t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """The header's dtype code and shape for ``t`` (raw bytes for a dtype safetensors has no code for)."""
    try:
        return dtypes.header_layout(dtype_name(t.dtype), tuple(t.shape))
    except ValueError:
        raise UsageError(f"Cannot save tensor {name!r}: its dtype {t.dtype} is not one resumer can store "
                         f"({', '.join(dtypes.BY_NAME)}).") from None


def _bad(uri: str, why: str) -> CheckpointError:
    return CheckpointError(f"{uri} is not a valid safetensors file: {why}. The checkpoint is corrupt; "
                           "nothing was loaded from it.", uri=uri)


def _ints(value: Any) -> tuple[int, ...] | None:
    """A JSON list of integers (booleans and floats are not), or None."""
    if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        return None
    return tuple(value)


def _entry(name: str, meta: Any, start: int, size: int, uri: str) -> TensorLocation:
    meta = meta if isinstance(meta, dict) else {}
    tag = meta.get("dtype")
    dtype = _FROM_ST.get(tag) if isinstance(tag, str) else None
    shape, offsets = _ints(meta.get("shape")), _ints(meta.get("data_offsets"))
    if dtype is None or shape is None or offsets is None or len(offsets) != 2 or len(shape) > 64:
        raise _bad(uri, f"entry {name!r} has a bad dtype, shape or data_offsets")
    if any(d < 0 for d in shape):
        raise _bad(uri, f"entry {name!r} has a negative dimension")
    b, e = offsets
    numel = math.prod(shape)
    if not 0 <= b <= e or e - b != numel * dtype_size(dtype):
        raise _bad(uri, f"entry {name!r}: {e - b} bytes do not hold {dtype}{list(shape)}")
    if start + e > size:
        raise _bad(uri, f"entry {name!r} ends at byte {start + e}, past the end of the file ({size} bytes)")
    return TensorLocation(file=uri.rsplit("/", 1)[-1], offset=start + b, nbytes=e - b, dtype=dtype, shape=shape)


def read_header(f: BinaryIO, size: int, uri: str) -> dict[str, TensorLocation]:
    """Parse and validate a safetensors header; never trusts a length or offset it has not checked."""
    if size < 8:
        raise _bad(uri, f"only {size} bytes")
    head = _read_exact(f, 8, uri)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n + 8 > size:  # checked against the real size before a byte of it is read
        raise _bad(uri, f"header length {n} does not fit the file of {size} bytes")
    try:
        header = strict_loads(_read_exact(f, n, uri), max_cost=max(MIN_PARSE_BUDGET, PARSE_BUDGET_PER_BYTE * n))
    except JSONRefused as exc:
        raise _bad(uri, f"header refused: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(uri, "header is not a JSON object")
    out = {name: _entry(name, meta, 8 + n, size, uri) for name, meta in header.items() if name != "__metadata__"}
    spans = sorted((loc.offset, loc.offset + loc.nbytes, name) for name, loc in out.items())
    for (_b1, e1, n1), (b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise _bad(uri, f"entries {n1!r} and {n2!r} overlap")
    return out


def _read_exact(f: BinaryIO, n: int, uri: str) -> bytes:
    """``n`` bytes, or a CheckpointError: a file cut short is a bad checkpoint (reads may come back short)."""
    parts = []
    got = 0
    while got < n:
        part = f.read(n - got)
        if not part:
            raise CheckpointError(f"{uri} ended early: read {got} of {n} header bytes. The file is truncated.",
                                  uri=uri)
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def readinto_exact(f: BinaryIO, view: memoryview, uri: str) -> None:
    """Fill ``view`` completely from ``f`` (large reads may come back short)."""
    got = 0
    total = len(view)
    while got < total:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise CheckpointError(f"{uri} ended early: read {got} of {total} bytes. The file is truncated.",
                                  uri=uri)
        got += n


def _hash_stream(h: Any, f: BinaryIO, size: int, uri: str, on_bytes: Any) -> None:
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    left = size
    while left > 0:
        part = view[:min(left, len(buf))]
        readinto_exact(f, part, uri)
        h.update(part)
        left -= len(part)
        if on_bytes is not None:
            on_bytes(len(part))


def checksum_stream(f: BinaryIO, size: int, uri: str, on_bytes: Any = None) -> str:
    """xxh3-128 of the next ``size`` bytes of ``f``, read in large blocks into one reused buffer."""
    h = xxhash.xxh3_128()
    _hash_stream(h, f, size, uri, on_bytes)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


class _Hashing:
    """Reads through ``f``, hashing and counting every byte it hands out."""

    def __init__(self, f: BinaryIO, h: Any) -> None:
        self.f, self.h, self.count = f, h, 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.count += len(data)
        return data


def header_and_checksum(f: BinaryIO, size: int, uri: str,
                        on_bytes: Any = None) -> tuple[dict[str, TensorLocation], str]:
    """One sequential pass over a whole file from its start: its validated header, then the checksum of all
    ``size`` bytes (the header's bytes are hashed as they are parsed: nothing is read twice, no seek back)."""
    h = xxhash.xxh3_128()
    tee = _Hashing(f, h)
    header = read_header(tee, size, uri)  # type: ignore[arg-type]
    if on_bytes is not None:
        on_bytes(tee.count)
    _hash_stream(h, f, size - tee.count, uri, on_bytes)
    return header, f"{CHECKSUM_ALGO}:{h.hexdigest()}"


def read_hashing(f: BinaryIO, size: int, regions: Sequence[tuple[int, int]], into: Callable[[int], memoryview],
                 uri: str, on_bytes: Any = None) -> str:
    """Read a whole file once, in order, hashing every byte: region ``i`` (offset, nbytes; sorted by offset,
    not overlapping) straight into ``into(i)``, asked for just before it is read; the rest into a scratch
    buffer. Returns the checksum."""
    h = xxhash.xxh3_128()
    scratch = memoryview(bytearray(min(CHUNK, max(size, 1))))
    pos = 0

    def skip_to(end: int) -> None:
        nonlocal pos
        while pos < end:
            part = scratch[:min(len(scratch), end - pos)]
            readinto_exact(f, part, uri)
            h.update(part)
            pos += len(part)
            if on_bytes is not None:
                on_bytes(len(part))

    f.seek(0)
    for i, (offset, nbytes) in enumerate(regions):
        if offset < pos:
            raise ValueError(f"read_hashing: region {i} at {offset} overlaps or is out of order")
        skip_to(offset)
        view = into(i)
        if len(view) != nbytes:
            raise ValueError(f"read_hashing: region {i} wants {nbytes} bytes, its buffer holds {len(view)}")
        for j in range(0, nbytes, CHUNK):
            piece = view[j:j + CHUNK]
            readinto_exact(f, piece, uri)
            h.update(piece)
        pos += nbytes
        if on_bytes is not None:
            on_bytes(nbytes)
    skip_to(size)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"
