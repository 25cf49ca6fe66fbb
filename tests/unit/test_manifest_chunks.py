"""A sharded checkpoint's tensors are stored in chunks (one or more per rank). Its manifest is refused, with a
CheckpointError and before any tensor byte is read, unless every tensor's chunks tile it exactly: no gap, no overlap,
nothing outside the tensor, the tensor's number of dimensions, each chunk's bytes inside a file the manifest lists.
Both manifest forms are checked: the long form (format v1) and the compact one a save writes (format v2)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

import resumer
import resumer.formats.native.chunks as native_chunks
from resumer.formats.native.entries import Chunk
from resumer.formats.native.manifest import MANIFEST, dumps, long_form, parse, rank_file_name
from resumer.formats.native.safetensors_io import TensorLocation, write_file

URI = "memory://ckpts/step-0000000001"
FILES = [rank_file_name("model", "t0", r) for r in range(3)]
SUM = "0123456789abcdef"

# A chunk: (file index, byte offset, global offsets, sizes[, checksum]); the tensor 'w' is float32[4, 6].
ROWS = [(0, 0, [0, 0], [2, 6], SUM), (1, 0, [2, 0], [1, 6]), (1, 24, [3, 0], [1, 6])]  # cut along dimension 0
BLOCKS = [(0, 0, [0, 0], [2, 6]), (1, 0, [2, 0], [2, 3], SUM), (1, 24, [2, 3], [2, 3])]  # cut along both


def _long(chunks: list[tuple[Any, ...]], shape: tuple[int, ...] = (4, 6), sizes: tuple[int, ...] = (48, 48)
          ) -> dict[str, Any]:
    """A long-form manifest of one tensor 'w' of ``shape`` stored in ``chunks``, its files of ``sizes`` bytes."""
    return {
        "format": "resumer-checkpoint", "version": 2, "step": 1,
        "files": [{"path": FILES[i], "size": n, "checksum": "xxh3_128:0"} for i, n in enumerate(sizes)],
        "signature": {"tensors": [{"name": "w", "shape": list(shape), "dtype": "float32"}]},
        "tensors": {"w": {"dtype": "float32", "shape": list(shape), "chunks": [
            {"file": FILES[c[0]], "offset": c[1], "offsets": c[2], "sizes": c[3]}
            | ({"checksum": c[4]} if len(c) > 4 else {}) for c in chunks]}},
    }


def _compact(chunks: list[tuple[Any, ...]], shape: tuple[int, ...] = (4, 6), sizes: tuple[int, ...] = (48, 48)
             ) -> dict[str, Any]:
    """The same manifest in the compact form, its chunk rows exactly ``chunks`` (file by index)."""
    whole = [(0, 0, [0] * len(shape), list(shape))]
    raw = json.loads(dumps(_long(whole, shape, (4 * math.prod(shape),))))
    assert "dtypes" in raw, "a save's form: compact"
    raw["files"] = _long(whole, shape, sizes)["files"]
    raw["tensors"] = [[list(c) for c in chunks]]
    return raw


def _parse(form: str, chunks: list[tuple[Any, ...]], **kw: Any) -> Any:
    raw = (_long if form == "long" else _compact)(chunks, **kw)
    return parse(json.dumps(raw).encode(), URI)


def _expected(chunks: list[tuple[Any, ...]]) -> tuple[Chunk, ...]:
    return tuple(Chunk(offsets=tuple(c[2]), loc=TensorLocation(file=FILES[c[0]], offset=c[1],
                                                               nbytes=4 * c[3][0] * c[3][1], dtype="float32",
                                                               shape=tuple(c[3]))) for c in chunks)


VALID = {
    "rows": ROWS,
    "blocks": BLOCKS,
    "blocks listed last first": BLOCKS[::-1],
    "blocks and an empty chunk inside one": [*BLOCKS, (2, 0, [1, 2], [0, 3])],
    "rows and an empty chunk inside one": [*ROWS, (2, 0, [1, 0], [0, 3])],  # it covers nothing: no overlap
}


@pytest.mark.parametrize("form", ["long", "compact"])
@pytest.mark.parametrize("layout", list(VALID))
def test_chunks_that_tile_the_tensor_are_read_as_its_pieces(form, layout):
    chunks = VALID[layout]
    m = _parse(form, chunks, sizes=(48, 48, 0))
    assert m.sharded and m.tensors == {}
    assert m.chunks == {"w": _expected(chunks)}
    assert m.pieces("w") == [(f"w#{c[2][0]},{c[2][1]}", e.loc) for c, e in zip(chunks, _expected(chunks),
                                                                                 strict=True)]
    assert m.piece_checksums == {f"w#{c[2][0]},{c[2][1]}": SUM for c in chunks if len(c) > 4}
    assert m.in_file(FILES[1]) == {f"w#{c[2][0]},{c[2][1]}": e.loc
                                   for c, e in zip(chunks, _expected(chunks), strict=True) if c[0] == 1}


def test_the_long_form_of_a_compact_chunked_manifest_is_the_long_form_it_came_from():
    long = _long(ROWS)
    assert long_form(json.loads(dumps(long)))["tensors"] == long["tensors"]


TOP = (0, 0, [0, 0], [2, 6])  # rows 0..1, the whole of file 0
W = "tensor 'w'"
NO_TILE = f"the chunks of {W}"
HOSTILE: dict[str, tuple[list[tuple[Any, ...]], str | tuple[str, str]]] = {
    "no chunks": ([], (f"{NO_TILE} cover 0 of its 24 elements", "not a list of 2 fields")),
    "a gap (rows)": (ROWS[:2], f"{NO_TILE} cover 18 of its 24 elements: they do not tile it"),
    "a gap (blocks)": (BLOCKS[:2], f"{NO_TILE} cover 18 of its 24 elements: they do not tile it"),
    "rows overlapping where a row is missing": (
        [(0, 0, [0, 0], [1, 6]), (1, 0, [1, 0], [2, 6]), (0, 24, [2, 0], [1, 6])], f"{NO_TILE} overlap"),
    "blocks overlapping where a block is missing": (
        [TOP, (1, 0, [1, 0], [2, 3]), (1, 24, [2, 3], [2, 3])], f"{NO_TILE} overlap: they do not tile it"),
    "the same chunk twice": ([TOP, (1, 0, [0, 0], [2, 6])], f"{NO_TILE} overlap: they do not tile it"),
    "rows past the end": ([TOP, (1, 0, [3, 0], [2, 6])],
                          f"{W} chunk 1 at [3, 0] of size [2, 6] does not lie inside float32[4, 6]"),
    "columns past the end": ([TOP, (1, 0, [2, 0], [2, 3]), (1, 24, [2, 4], [2, 3])],
                             f"{W} chunk 2 at [2, 4] of size [2, 3] does not lie inside float32[4, 6]"),
    "offsets of one dimension": ([(0, 0, [0], [2, 6]), (1, 0, [2, 0], [2, 6])],
                                 f"{W} chunk 0 at [0] of size [2, 6] does not lie inside"),
    "sizes of three dimensions": ([(0, 0, [0, 0], [2, 6, 1]), (1, 0, [2, 0], [2, 6])],
                                  f"{W} chunk 0 at [0, 0] of size [2, 6, 1] does not lie inside"),
    "a negative offset": ([TOP, (1, 0, [-2, 0], [2, 6])], f"{W} chunk 1 offsets[0] is -2, outside"),
    "a negative size": ([TOP, (1, 0, [2, 0], [-2, 6])], f"{W} chunk 1 sizes[0] is -2, outside"),
    "a negative byte offset": ([TOP, (1, -48, [2, 0], [2, 6])], f"{W} chunk 1 offset is -48, outside"),
    "a boolean byte offset": ([TOP, (1, True, [2, 0], [2, 6])], f"{W} chunk 1 offset is a boolean, not an integer"),
    "a text byte offset": ([TOP, (1, "0", [2, 0], [2, 6])], f"{W} chunk 1 offset is a string, not an integer"),
    "a chunk past the end of its file": ([TOP, (1, 24, [2, 0], [2, 6])],
                                         f"{W} chunk 1 lies outside {FILES[1]} (48 bytes)"),
    "two chunks on one byte range": ([TOP, (1, 0, [2, 0], [1, 6]), (1, 0, [3, 0], [1, 6])],
                                     f"tensor 'w#2,0' and 'w#3,0' overlap in {FILES[1]}"),
    "a chunk in a file the manifest does not list": (
        [TOP, (2, 0, [2, 0], [2, 6])],
        (f"{W} chunk 1 lies in '{FILES[2]}', which the manifest does not list",
         f"{W} chunk 1 file is 2, outside 0..1")),
    "a checksum that is not 16 hex digits": ([TOP, (1, 0, [2, 0], [2, 6], "nothex")],
                                             f"{W} chunk checksum is 'nothex', not 16 hex digits"),
}


@pytest.mark.parametrize("form", ["long", "compact"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_chunks_that_do_not_tile_the_tensor_are_refused(form, kind):
    chunks, fragment = HOSTILE[kind]
    if isinstance(fragment, tuple):
        fragment = fragment[form == "compact"]
    with pytest.raises(resumer.CheckpointError) as info:
        _parse(form, chunks)
    assert info.value.uri == URI
    assert f"{URI}/{MANIFEST} is malformed" in str(info.value)
    assert fragment in str(info.value)


def _columns(n: int) -> list[tuple[Any, ...]]:
    """float32[1, n] in n chunks of one column each (not cut along dimension 0: checked pair by pair)."""
    return [(0, 4 * j, [0, j], [1, 1]) for j in range(n)]


@pytest.mark.parametrize("form", ["long", "compact"])
def test_chunks_not_cut_along_dimension_0_are_checked_pair_by_pair_up_to_a_limit(form, monkeypatch):
    with pytest.raises(resumer.CheckpointError) as info:
        _parse(form, _columns(1025), shape=(1, 1025), sizes=(4100,))
    assert "tensor 'w' has 1025 chunks not all cut along dimension 0 (at most 1024 are checked)" in str(info.value)
    monkeypatch.setattr(native_chunks, "MAX_PAIRWISE_CHUNKS", 8)  # the limit itself, without a million pairs
    assert len(_parse(form, _columns(8), shape=(1, 8), sizes=(32,)).chunks["w"]) == 8
    with pytest.raises(resumer.CheckpointError, match="has 9 chunks not all cut along dimension 0"):
        _parse(form, _columns(9), shape=(1, 9), sizes=(36,))


@pytest.mark.parametrize("form", ["long", "compact"])
def test_any_number_of_chunks_cut_along_dimension_0_is_read(form):
    rows = [(0, 8 * j, [j, 0], [1, 2]) for j in range(1025)]
    assert len(_parse(form, rows, shape=(1025, 2), sizes=(8200,)).chunks["w"]) == 1025


# --- end to end: a checkpoint whose model tensor two ranks wrote, read by one process ---------------------------


def _chunked_checkpoint(root: str, model: nn.Module, rows_of_rank1: tuple[int, int] = (2, 4)) -> str:
    """A checkpoint of ``model`` (a Linear(6, 4)) as two ranks write one: rank 0 holds rows 0..1 of the weight and
    the bias, rank 1 the weight's rows ``rows_of_rank1`` (as the manifest claims them)."""
    uri = resumer.save_checkpoint(root, 1, model)
    with open(os.path.join(uri, MANIFEST), "rb") as f:
        raw = long_form(json.load(f))
    for entry in raw["files"]:
        os.remove(os.path.join(uri, entry["path"]))
    w, b = model.weight.detach(), model.bias.detach()
    ranks = [[("weight#0,0", w[:2]), ("bias", b)], [("weight#2,0", w[2:])]]
    raw["files"], placed = [], []
    for r, items in enumerate(ranks):
        name = rank_file_name("model", "t1", r)
        with open(os.path.join(uri, name), "wb") as f:
            size, checksum, index = write_file(f, name, items)
        raw["files"].append({"path": name, "size": size, "checksum": checksum})
        placed.append(index)
    a, e = rows_of_rank1
    raw["tensors"] = {
        "bias": placed[0]["bias"].to_dict(),
        "weight": {"dtype": "float32", "shape": [4, 6], "chunks": [
            {"file": rank_file_name("model", "t1", 0), "offset": placed[0]["weight#0,0"].offset, "offsets": [0, 0],
             "sizes": [2, 6]},
            {"file": rank_file_name("model", "t1", 1), "offset": placed[1]["weight#2,0"].offset, "offsets": [a, 0],
             "sizes": [e - a, 6]}]},
    }
    with open(os.path.join(uri, MANIFEST), "wb") as f:
        f.write(dumps(raw))
    return uri


def test_a_chunked_checkpoint_resumes_into_one_plain_model_exactly(tmp_path):
    torch.manual_seed(0)
    saved = nn.Linear(6, 4)
    uri = _chunked_checkpoint(str(tmp_path), saved)
    assert resumer.read_manifest(uri).sharded
    fresh = nn.Linear(6, 4)
    resumer.resume(uri, fresh)
    assert torch.equal(fresh.weight, saved.weight) and torch.equal(fresh.bias, saved.bias)


def test_a_chunked_checkpoint_that_does_not_tile_is_refused_before_any_byte_is_read(tmp_path):
    torch.manual_seed(0)
    uri = _chunked_checkpoint(str(tmp_path), nn.Linear(6, 4), rows_of_rank1=(3, 5))
    for name in os.listdir(uri):
        if name != MANIFEST:
            os.remove(os.path.join(uri, name))  # the refusal cannot come from reading them
    fresh = nn.Linear(6, 4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(resumer.CheckpointError) as info:
        resumer.resume(uri, fresh)
    assert info.value.uri == uri
    assert "is malformed" in str(info.value) and "tensor 'weight' chunk 1 at [3, 0]" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
