"""FSDP2 state saved by every rank (real processes, gloo on CPU): one checkpoint with the global signature, each rank's
shards in its own files, replicated tensors once; a commit only when every rank's files make a whole checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sharded_workers import build, run

import resumer
from resumer.runtime.capture import signature

pytestmark = pytest.mark.slow


def _saved(tmp_path: Path) -> tuple[str, list[dict], dict]:
    root = str(tmp_path / "ckpts")
    reports = run(2, root, "save", str(tmp_path / "out"))
    return root, reports, torch.load(tmp_path / "out" / "state.pt")


def test_two_fsdp2_ranks_save_one_checkpoint_with_global_shapes_and_resume_into_a_plain_model(tmp_path):
    root, reports, saved = _saved(tmp_path)
    assert "error" not in reports[0] and reports[0]["uri"] == reports[1]["uri"]  # the same URI on every rank
    uri = reports[0]["uri"]
    m = resumer.read_manifest(uri)
    plain = build()
    opt = torch.optim.AdamW(plain.parameters(), lr=0.05)
    assert [(t.name, t.shape, t.dtype) for t in m.signature.tensors] == [
        (t.name, t.shape, t.dtype) for t in signature(plain).tensors]  # global, as a plain model has them
    assert m.signature.world_size == 2
    files = sorted(f.path.split(".", 2)[2] for f in m.files)
    assert files == ["rank0.safetensors", "rank0.safetensors", "rank1.safetensors", "rank1.safetensors"]
    chunks = m.chunks["0.weight"]  # 7 rows on 2 ranks: 4 + 3, each rank's rows in its own file
    assert [(c.offsets, c.sizes) for c in chunks] == [((0, 0), (4, 5)), ((4, 0), (3, 5))]
    assert [c.loc.file.rsplit(".", 2)[1] for c in chunks] == ["rank0", "rank1"]
    assert "scale" in m.tensors and "scale" not in m.chunks  # a replicated buffer: stored once, whole
    assert "0.weight/step" in m.optimizer_tensors  # AdamW's step count: plain on every rank, stored once

    # A single process with no process group plans (a meta-device model: metadata only) and resumes bitwise.
    with torch.device("meta"):
        meta = build()
    plan = resumer.plan(uri, meta)
    assert plan.ok and any("world size 2 saved, 1 now: each of the 2 ranks' RNG state" in n for n in plan.notes)
    resumer.resume(uri, plain, opt)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    for p, (name, _) in zip(plain.parameters(), plain.named_parameters(), strict=True):
        for key, value in saved["optimizer"][name].items():
            assert torch.equal(opt.state[p][key], value), (name, key)


def _no_checkpoint(root: str, reports: list[dict], *fragments: str) -> None:
    errors = {r.get("error") for r in reports}
    assert len(errors) == 1 and None not in errors, errors  # every rank raised, the same text
    (error,) = errors
    for fragment in ["Nothing was committed", *fragments]:
        assert fragment in error, error
    step = Path(root, "step-0000000001")
    assert not (step / "manifest.json").exists()
    assert not list(step.iterdir()) if step.exists() else True  # every rank's files were removed
    assert resumer.list_checkpoints(root) == []


def test_a_rank_whose_write_fails_leaves_no_checkpoint_on_any_rank(tmp_path):
    root = str(tmp_path / "ckpts")
    reports = run(2, root, "save-write-fails", str(tmp_path / "out"))
    _no_checkpoint(root, reports, "failed on rank 1", "Input/output error (injected)")


def test_shards_that_do_not_tile_a_tensor_are_never_committed(tmp_path):
    root = str(tmp_path / "ckpts")
    reports = run(2, root, "save-drops-a-shard", str(tmp_path / "out"))
    _no_checkpoint(root, reports, "'0.weight'", "do not tile")
    assert os.path.isdir(root)
