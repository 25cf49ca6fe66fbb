"""The chunks of a sharded tensor (or optimizer state), checked: each inside the tensor and inside its file, and
together tiling the tensor exactly. Both manifest forms build their ``Chunk``s through ``make_chunks``.
"""

from __future__ import annotations

import math
from typing import Any

from resumer.core.signature import dtype_size
from resumer.formats.native.entries import Chunk, FileEntry
from resumer.formats.native.fields import MAX_COUNT, _Bad, _fast_shape, _int, _w
from resumer.formats.native.safetensors_io import TensorLocation

MAX_PAIRWISE_CHUNKS = 1024  # chunks of one tensor checked pair by pair (when not all cut along dimension 0)


def make_chunks(name: str, shape: tuple[int, ...], dtype: str, items: list[tuple[FileEntry, Any, Any, Any]],
                what: str = "tensor") -> tuple[Chunk, ...]:
    """Checked chunks of tensor ``name`` (global ``shape``, ``dtype``) from (file, byte offset, global offsets,
    sizes): each inside the tensor and inside its file, and together tiling the tensor exactly (no gap, no overlap).
    Raises _Bad (a ValueError) naming what is wrong."""
    where = f"{what} '{name}'"
    out = []
    for i, (entry, offset, offsets, sizes) in enumerate(items):
        offsets = _fast_shape(offsets, _w("{} chunk {} offsets", where, i))
        sizes = _fast_shape(sizes, _w("{} chunk {} sizes", where, i))
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
            raise _Bad(f"{where} chunk {i} at {list(offsets)} of size {list(sizes)} does not lie inside "
                       f"{dtype}{list(shape)}")
        if type(offset) is not int or not 0 <= offset <= MAX_COUNT:
            _int(offset, f"{where} chunk {i} offset")
        nbytes = math.prod(sizes) * dtype_size(dtype)
        if offset + nbytes > entry.size:
            raise _Bad(f"{where} chunk {i} lies outside {entry.path} ({entry.size} bytes)")
        out.append(Chunk(offsets=offsets, loc=TensorLocation(file=entry.path, offset=offset, nbytes=nbytes,
                                                             dtype=dtype, shape=sizes)))
    _check_tiling(where, shape, out)
    return tuple(out)


def _check_tiling(where: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    covered = sum(math.prod(c.sizes) for c in chunks)
    if not chunks or covered != math.prod(shape):
        raise _Bad(f"the chunks of {where} cover {covered} of its {math.prod(shape)} elements: they do not tile it")
    if all(c.offsets[1:] == (0,) * (len(shape) - 1) and c.sizes[1:] == shape[1:] for c in chunks) and shape:
        rows = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in chunks)
        overlap = any(b < e for (_, e), (b, _) in zip(rows, rows[1:], strict=False))
    elif len(chunks) > MAX_PAIRWISE_CHUNKS:
        raise _Bad(f"{where} has {len(chunks)} chunks not all cut along dimension 0 (at most "
                   f"{MAX_PAIRWISE_CHUNKS} are checked)")
    else:
        overlap = any(all(a.offsets[d] < b.offsets[d] + b.sizes[d] and b.offsets[d] < a.offsets[d] + a.sizes[d]
                          for d in range(len(shape))) and math.prod(a.sizes) and math.prod(b.sizes)
                      for i, a in enumerate(chunks) for b in chunks[i + 1:])
    if overlap:
        raise _Bad(f"the chunks of {where} overlap: they do not tile it")
