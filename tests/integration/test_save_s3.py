"""Saving and retention on a real S3 API server (moto on 127.0.0.1, through s3fs): the commit is a conditional
PUT (``If-None-Match: *``) that the server honours, two saves of one step commit exactly one, and prune
(which un-commits by renaming the manifest) keeps the real newest when a step directory was copied."""

from __future__ import annotations

import threading
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

import resumer
from resumer.checkpoints.retention import RetentionPolicy, prune
from resumer.core.errors import CheckpointError
from resumer.formats.native.manifest import MANIFEST
from resumer.runtime import save as save_mod
from resumer.storage.fs import get_fs
from resumer.storage.store import commit_bytes

S3Root = tuple[str, dict[str, Any]]


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_commit_is_a_conditional_put_the_server_honours(s3_root: S3Root) -> None:
    root, options = s3_root
    fs, path = get_fs(f"{root}/step-0000000001", options)
    target = f"{path}/{MANIFEST}"
    commit_bytes(fs, target, b"first", root)
    commit_bytes(fs, target, b"first", root)  # a retried PUT that finds its own bytes: success
    with pytest.raises(FileExistsError):
        commit_bytes(fs, target, b"second", root)
    assert fs.cat_file(target) == b"first"  # never overwritten
    with pytest.raises(FileExistsError):  # the server itself refuses: s3fs sends If-None-Match, moto honours it
        fs.pipe_file(target, b"third", mode="create")
    assert fs.cat_file(target) == b"first"


def test_two_saves_of_one_step_at_once_commit_exactly_one(s3_root: S3Root, monkeypatch: pytest.MonkeyPatch) -> None:
    root, options = s3_root
    barrier = threading.Barrier(2, timeout=120)
    real = save_mod._check_written

    def both_ready(*args: Any) -> None:
        real(*args)
        barrier.wait()  # both have written their data and passed the 'already committed' check

    monkeypatch.setattr(save_mod, "_check_written", both_ready)
    built = {seed: _model(seed) for seed in (1, 2)}
    won: dict[int, str] = {}
    lost: dict[int, BaseException] = {}

    def writer(seed: int) -> None:
        try:
            won[seed] = resumer.save_checkpoint(root, 4, *built[seed], storage_options=options)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            lost[seed] = exc

    threads = [threading.Thread(target=writer, args=(s,)) for s in built]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 1, (won, lost)
    (winner, uri), error = next(iter(won.items())), next(iter(lost.values()))
    assert isinstance(error, CheckpointError)
    assert str(error).startswith(f"Cannot commit {uri}: another writer committed step 4 first")
    manifest = resumer.read_manifest(uri, options)
    resumer.verify(manifest, options, checksums=True)
    fs = fsspec.filesystem("s3", **options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(uri, detail=False, refresh=True))
    assert names == sorted([MANIFEST, *(f.path for f in manifest.files)])  # the loser's data files are gone
    fresh, fresh_opt = _model(3)
    resumer.resume(uri, fresh, fresh_opt, storage_options=options)
    for (k, v), w in zip(fresh.state_dict().items(), built[winner][0].state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_prune_on_s3_keeps_the_real_newest_when_a_step_dir_was_copied(s3_root: S3Root) -> None:
    root, options = s3_root
    model, opt = _model(0)
    uris = {s: resumer.save_checkpoint(root, s, model, opt, storage_options=options) for s in (10, 20, 50)}
    fs = fsspec.filesystem("s3", **options)
    fs.copy(uris[10].removeprefix("s3://"), f"{root.removeprefix('s3://')}/step-0000000099", recursive=True)
    result = prune(root, RetentionPolicy(keep_last=1), storage_options=options)
    reasons = {d.step: d.reason for d in result.decisions}
    assert result.newest_valid == uris[50] and reasons[50] == "newest valid checkpoint"
    assert reasons[99].startswith("suspicious: its manifest says step 10 but the directory is step-0000000099")
    assert result.deleted == (uris[20], uris[10]) and result.failed == ()
    # the copy is listed nowhere as a checkpoint: its name would make it look like the newest
    assert [i.uri for i in resumer.list_checkpoints(root, storage_options=options)] == [uris[50]]
    resumer.verify(resumer.read_manifest(uris[50], options), options, checksums=True)
