"""A rank resuming sharded state holds only the region it keeps: the overlap math that cuts it from the saved
chunks, on plain tensors (the multi-process tests run it through real FSDP2 ranks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from resumer.core.errors import ResumerError
from resumer.formats.native.manifest import chunk_key
from resumer.formats.native.source import _region_of

FULL = torch.arange(7 * 5, dtype=torch.float32).view(7, 5)


def _chunks(*rows: tuple[int, int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(offsets=(a, 0), sizes=(b - a, 5), loc=SimpleNamespace(dtype="float32")) for a, b in rows]


def _pieces(chunks: list[SimpleNamespace]) -> dict[str, torch.Tensor]:
    return {chunk_key("w", c.offsets): FULL[c.offsets[0]:c.offsets[0] + c.sizes[0]].clone().view(-1) for c in chunks}


@pytest.mark.parametrize(("saved", "region"), [
    (((0, 4), (4, 7)), ((2, 0), (3, 5))),    # 2 ranks saved, 3 resume: rows 2..4 span both chunks
    (((0, 3), (3, 5), (5, 7)), ((0, 0), (7, 5))),  # 3 saved, 1 resumes: the whole tensor from three chunks
    (((0, 4), (4, 7)), ((4, 0), (0, 5))),    # a rank that keeps no rows
])
def test_the_region_is_cut_exactly_from_the_chunks_that_overlap_it(saved, region) -> None:
    chunks = _chunks(*saved)
    (r0, _), (rn, _) = region
    pieces = {k: v for k, v in _pieces(chunks).items()
              if any(c.offsets[0] < r0 + rn and r0 < c.offsets[0] + c.sizes[0] and chunk_key("w", c.offsets) == k
                     for c in chunks)}
    got = _region_of("w", chunks, pieces, region)
    assert got.shape == (rn, 5) and torch.equal(got, FULL[r0:r0 + rn])
    assert not pieces  # every piece read was used


def test_the_chunk_that_is_the_region_is_used_as_it_is_without_a_copy() -> None:
    chunks = _chunks((0, 4), (4, 7))
    pieces = _pieces(chunks)
    mine = pieces[chunk_key("w", (4, 0))]
    got = _region_of("w", chunks, {chunk_key("w", (4, 0)): mine}, ((4, 0), (3, 5)))
    assert got.data_ptr() == mine.data_ptr() and torch.equal(got, FULL[4:])


def test_a_region_the_pieces_read_do_not_cover_is_refused_never_left_unwritten() -> None:
    chunks = _chunks((0, 4), (4, 7))
    pieces = _pieces(chunks)
    del pieces[chunk_key("w", (4, 0))]  # rows 4.. were not read
    with pytest.raises(ResumerError, match="cover 10 of the 25 elements"):
        _region_of("w", chunks, pieces, ((2, 0), (5, 5)))
