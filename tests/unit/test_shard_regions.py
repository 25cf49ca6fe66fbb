"""A rank resuming sharded state holds only the region it keeps: the overlap math that cuts it from the saved
chunks, on plain tensors (the multi-process tests run it through real FSDP2 ranks)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import resumer
import resumer.formats.native.consistency as native_consistency
import resumer.formats.native.source as native_source
from resumer import examples as ex
from resumer.core.errors import CheckpointError, ResumerError
from resumer.formats import rng
from resumer.formats.native.entries import chunk_key, state_key
from resumer.formats.native.manifest import MANIFEST, MODEL_KIND, OPTIMIZER_KIND, long_form, rank_file_name, step_dir
from resumer.formats.native.source import NativeSource, _region_of
from resumer.runtime.sharded_save import _commit, _write_pieces
from resumer.runtime.writing import check_written
from resumer.storage.store import Store

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


# --- a sharded checkpoint, read by NativeSource ---------------------------------------------------------------


def _sharded(root: Path, ranks: int = 2) -> tuple[str, nn.Module, torch.optim.Optimizer, list[dict[str, Any]]]:
    """A checkpoint as ``ranks`` ranks holding every tensor of at least ``ranks`` rows in row shards save it: each
    rank's pieces in its own files, committed by the sharded save's own commit (which parses it back). Returns its
    URI, the model and Adam it holds, and each rank's saved RNG state."""
    model = ex.mlp_v1()
    opt = ex.adam(model)
    for step in range(2):
        ex.train_step(model, opt, step)
    plain = resumer.save_checkpoint(str(root / "plain"), 3, model, opt)
    with open(f"{plain}/{MANIFEST}") as f:
        lf = long_form(json.load(f))
    lf["signature"]["world_size"] = ranks
    meta = {"signature": lf["signature"], "scheduler": lf["scheduler"], "rng": lf["rng"],
            "scalars": lf["optimizer"]["scalars"], "code": lf["code"], "extra": lf["extra"]}
    names = {id(p): n for n, p in model.named_parameters()}
    state = {**model.state_dict(),
             **{state_key(names[id(p)], k): v for p, st in opt.state.items() for k, v in st.items()}}
    ckpt = Store.open(str(root / "sharded")).child(step_dir(3))
    ckpt.makedirs()
    gathered = []
    for r in range(ranks):
        outcome: dict[str, Any] = {"rank": r, "error": None, "files": [], "placed": [], "nonfinite": []}
        torch.manual_seed(100 + r)
        outcome["rng"] = rng.capture()
        for kind, model_side in ((MODEL_KIND, True), (OPTIMIZER_KIND, False)):
            pieces = []
            for key, t in state.items():
                if ("/" not in key) != model_side:
                    continue
                if t.dim() == 0 or t.shape[0] < ranks:
                    if r == 0:
                        pieces.append((key, (0,) * t.dim(), t, True))
                    continue
                rows = t.shape[0] // ranks
                lo, hi = r * rows, (t.shape[0] if r == ranks - 1 else (r + 1) * rows)
                pieces.append((key, (lo,) + (0,) * (t.dim() - 1), t[lo:hi], False))
            done = _write_pieces(ckpt, rank_file_name(kind, "tok", r), pieces, [])
            if done is not None:
                outcome["files"].append(done[0])
                outcome["placed"] += done[1]
        gathered.append(outcome)
    verdict = _commit(ckpt, 3, gathered, meta, True, ranks, check_written)
    assert verdict == ("ok", ckpt.uri), verdict
    return ckpt.uri, model, opt, [g["rng"] for g in gathered]


def test_a_sharded_checkpoint_resumes_whole_into_unsharded_state(tmp_path: Path) -> None:
    """Every chunk of every tensor and state entry lands at its global offsets (a resume on fewer ranks)."""
    uri, model, opt, _ = _sharded(tmp_path)
    m = resumer.read_manifest(uri)
    assert m.sharded and {"2.weight", "2.weight/exp_avg"} <= set(m.chunks)
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    res = resumer.resume(uri, fresh, fresh_opt)
    assert res.step == 3
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    saved, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == got.keys()
    for i, st in saved.items():
        assert all(torch.equal(got[i][k], v) for k, v in st.items()), i


REGIONS = {
    "2.weight": ((16, 0), (32, 64)),  # rows 16..47: half from each rank's chunk, copied out of both
    "0.weight": ((32, 0), (32, 16)),  # exactly rank 1's chunk: rank 0's is not read
    "2.weight/exp_avg": ((40, 0), (8, 64)),  # inside rank 1's chunk: rank 0's is not read
}


def test_a_restricted_read_holds_each_region_and_reads_only_the_chunks_that_overlap_it(tmp_path: Path) -> None:
    uri, model, opt, _ = _sharded(tmp_path)
    names = {t.name for t in resumer.read_manifest(uri).signature.tensors}
    whole = NativeSource(resumer.read_manifest(uri), checksums=False)  # no hashing: reads only what it loads
    whole.load(names, {"2.weight"})
    src = NativeSource(resumer.read_manifest(uri))
    src.prepare()
    assert src.restrict(REGIONS) is True
    src.load(names, {"2.weight"})
    sd, st = model.state_dict(), opt.state[model[2].weight]
    assert torch.equal(src.tensor("2.weight"), sd["2.weight"][16:48])
    assert torch.equal(src.tensor("0.weight"), sd["0.weight"][32:])
    for name in names - set(REGIONS):  # not restricted: whole, from every chunk
        assert torch.equal(src.tensor(name), sd[name]), name
    got = src.optimizer_state("2.weight")
    assert torch.equal(got["exp_avg"], st["exp_avg"][40:48])
    assert torch.equal(got["exp_avg_sq"], st["exp_avg_sq"]) and torch.equal(got["step"], st["step"])
    assert {k for k in [*names, "2.weight/exp_avg", "2.weight/exp_avg_sq"] if src.is_local(k)} == set(REGIONS)
    skipped = (32 * 16 + 32 * 64) * 4  # rank 0's chunks of 0.weight and of 2.weight's exp_avg
    assert src.bytes_read == whole.bytes_read - skipped
    src.close()
    whole.close()


@pytest.mark.parametrize(("name", "offsets"), [("0.weight", (32, 0)), ("2.weight", (32, 0)), ("4.bias", (2,))],
                         ids=["first-in-its-file", "middle", "last-in-its-file"])
def test_a_restricted_read_checks_each_chunk_it_reads_against_its_own_checksum(tmp_path: Path, name: str,
                                                                               offsets: tuple[int, ...]) -> None:
    uri, model, _, _ = _sharded(tmp_path)
    m = resumer.read_manifest(uri)
    (chunk,) = [c for c in m.chunks[name] if c.offsets == offsets]
    with open(f"{uri}/{chunk.loc.file}", "r+b") as f:
        f.seek(chunk.loc.offset + chunk.loc.nbytes - 1)
        b = f.read(1)
        f.seek(chunk.loc.offset + chunk.loc.nbytes - 1)
        f.write(bytes([b[0] ^ 0x01]))
    src = NativeSource(m)
    src.prepare()
    assert src.restrict(REGIONS)
    key = f"{name}#{','.join(map(str, offsets))}"
    with pytest.raises(CheckpointError, match=f"'{re.escape(key)}' fails its checksum") as err:
        src.load({t.name for t in m.signature.tensors}, set())
    assert err.value.uri == uri


def test_a_restricted_read_needs_a_sharded_checkpoint_with_every_piece_checksum(tmp_path: Path) -> None:
    uri, _, _, _ = _sharded(tmp_path)
    plain = resumer.latest_checkpoint(str(tmp_path / "plain")).uri
    assert NativeSource(resumer.read_manifest(plain)).restrict(REGIONS) is False  # not sharded: read whole
    with open(f"{uri}/{MANIFEST}") as f:
        raw = long_form(json.load(f))
    del raw["tensors"]["2.weight"]["chunks"][1]["checksum"]
    with open(f"{uri}/{MANIFEST}", "w") as f:
        json.dump(raw, f)
    m = resumer.read_manifest(uri)
    assert NativeSource(m).restrict(REGIONS) is False  # a piece it could not check: whole files, hashed
    assert NativeSource(m, checksums=False).restrict(REGIONS) is True  # nothing is checked anyway


def test_a_chunked_tensor_of_a_dtype_this_torch_lacks_is_refused_before_anything_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _, _, _ = _sharded(tmp_path)
    real = native_source.torch_dtype

    def torch_dtype(name: str) -> torch.dtype:  # this torch, less float32 (as an older one lacks newer dtypes)
        if name == "float32":
            raise ValueError(f"dtype {name!r} is not available in torch 0.0")
        return real(name)

    monkeypatch.setattr(native_source, "torch_dtype", torch_dtype)
    monkeypatch.setattr(native_consistency, "torch_dtype", torch_dtype)  # where the manifest is checked against it
    src = NativeSource(resumer.read_manifest(uri))
    with pytest.raises(CheckpointError, match=r"dtype 'float32' is not available in torch 0\.0\. Resume with a "
                                              r"torch that has it\.") as err:
        src.prepare()
    assert err.value.uri == uri and err.value.quarantine is False and src.bytes_read == 0


def test_each_rank_restores_its_own_rng_state_at_the_world_size_that_saved(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In a process group of the saved world size, rank r restores rank r's RNG state; at any other size, the
    saving rank 0's (the manifest's own). A process group of this size is faked: only its size and rank are read."""
    uri, _, _, per_rank = _sharded(tmp_path)
    m = resumer.read_manifest(uri)
    assert not torch.equal(rng.parse(per_rank[1])["torch"], rng.parse(m.rng)["torch"])

    def restored(rank: int, world: int) -> torch.Tensor:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        src = NativeSource(m)
        src.prepare()
        return src.rng_state()["torch"]

    assert torch.equal(restored(1, 2), rng.parse(per_rank[1])["torch"])
    assert torch.equal(restored(0, 2), rng.parse(per_rank[0])["torch"])
    assert torch.equal(restored(1, 3), rng.parse(m.rng)["torch"])
