"""Retention never deletes what is needed: the pure decide table, leases, prune on a local folder and memory://,
a reader racing a prune, and the prune command."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import resumer
from resumer.checkpoints import lease, retention
from resumer.checkpoints.catalog import Candidate
from resumer.checkpoints.lease import Lease
from resumer.checkpoints.retention import RETIRING, PruneAction, RetentionPolicy, decide, prune
from resumer.cli.prune import prune as prune_command
from resumer.core.errors import CheckpointError, UsageError
from resumer.formats.native.manifest import MANIFEST, QUARANTINE
from resumer.storage.store import Store

LATER = "2099-01-01T00:00:00.000+00:00"

# ---------------------------------------------------------------------------------------------------------------
# decide: pure, table-driven


def _cand(step: int, flags: str = "") -> Candidate:
    """A listed step directory: flags 't' torn (no manifest), 'q' quarantined, 'r' retiring.json present."""
    sizes = {f"model.{step}.safetensors": 100}
    if "t" not in flags:
        sizes[MANIFEST] = 10
    if "q" in flags:
        sizes[QUARANTINE] = 5
    if "r" in flags:
        sizes[RETIRING] = 5
    return Candidate(step=step, uri=f"memory://r/step-{step:010d}", sizes=sizes)


def _lease(step: int, holder: str = "host:1", expires: str = LATER) -> Lease:
    return Lease(step_dir=f"step-{step:010d}", holder=holder, checkpoint=f"memory://r/step-{step:010d}",
                 created="2098-01-01T00:00:00+00:00", expires=expires)


NEWEST = "newest valid checkpoint"
OUT = "outside the policy"
TORN = "not committed (may be a save in progress)"
QUAR = "quarantined: kept for inspection"
NEWER = "newer than the newest valid checkpoint"

CASES = [
    pytest.param("1 2 3 4 5", RetentionPolicy(keep_last=2), 5, (),
                 {5: NEWEST, 4: "within keep-last 2", 3: OUT, 2: OUT, 1: OUT}, id="keep-last"),
    pytest.param("1 2 3 4 5", RetentionPolicy(keep_every=2), 5, (),
                 {5: NEWEST, 4: "step is a multiple of keep-every 2", 3: OUT,
                  2: "step is a multiple of keep-every 2", 1: OUT}, id="keep-every"),
    pytest.param("1 2 3 4 5 6", RetentionPolicy(keep_last=2, keep_every=3), 6, (),
                 {6: NEWEST, 5: "within keep-last 2", 4: OUT, 3: "step is a multiple of keep-every 3", 2: OUT,
                  1: OUT}, id="both"),
    pytest.param("1 2 3 4t 5q", RetentionPolicy(keep_last=1), 3, (),
                 {5: QUAR, 4: TORN, 3: NEWEST, 2: OUT, 1: OUT}, id="newest-valid-is-older"),
    pytest.param("1 2 3 4", RetentionPolicy(keep_last=1), 3, (),
                 {4: NEWER, 3: NEWEST, 2: OUT, 1: OUT}, id="newer-committed-but-not-valid"),
    pytest.param("1 2 3 4", RetentionPolicy(keep_last=1), 4, (2,),
                 {4: NEWEST, 3: OUT, 2: f"leased by host:1 until {LATER}", 1: OUT}, id="leased"),
    pytest.param("1 2t 3q 4", RetentionPolicy(keep_last=2), None, (),
                 {4: "no valid checkpoint under the root: nothing is deleted", 3: QUAR, 2: TORN,
                  1: "no valid checkpoint under the root: nothing is deleted"}, id="no-valid-checkpoint"),
    pytest.param("1 2 3t 4q 5", RetentionPolicy(keep_last=2), 5, (),
                 {5: NEWEST, 4: QUAR, 3: TORN, 2: "within keep-last 2", 1: OUT}, id="keep-last-counts-valid-only"),
    pytest.param("1t 2 3", RetentionPolicy(keep_last=1), 3, (), {3: NEWEST, 2: OUT, 1: TORN}, id="old-torn-kept"),
    pytest.param("1tr 2tr 3 4", RetentionPolicy(keep_last=1), 4, (2,),
                 {4: NEWEST, 3: OUT, 2: TORN, 1: "unfinished deletion (retiring.json, no manifest): finishing it"},
                 id="unfinished-deletion"),
    pytest.param("1 2 3 4 5", RetentionPolicy(keep_last=1, keep_every=2), 3, (1,),
                 {5: NEWER, 4: NEWER, 3: NEWEST, 2: "step is a multiple of keep-every 2",
                  1: f"leased by host:1 until {LATER}"}, id="policy-reason-first-then-lease"),
]


@pytest.mark.parametrize(("listing", "policy", "newest", "leased", "expected"), CASES)
def test_decide(listing: str, policy: RetentionPolicy, newest: int | None, leased: tuple[int, ...],
                expected: dict[int, str]) -> None:
    cands = [_cand(int(x.rstrip("tqr")), "".join(ch for ch in x if ch.isalpha())) for x in listing.split()]
    random.Random(0).shuffle(cands)  # input order must not matter
    leases = {f"step-{s:010d}": [_lease(s)] for s in leased}
    got = decide(cands, policy, newest, leases)
    assert [d.step for d in got] == sorted(expected, reverse=True)
    assert {d.step: d.reason for d in got} == expected
    sizes = {c.step: sum(c.sizes.values()) for c in cands}
    for d in got:
        deletes = d.reason == OUT or d.reason.startswith("unfinished deletion")
        assert d.action is (PruneAction.DELETE if deletes else PruneAction.KEEP), d
        assert d.bytes == sizes[d.step]


def test_decide_names_every_holder_and_the_latest_expiry() -> None:
    leases = {"step-0000000001": [_lease(1, "a:1", "2098-01-01T00:00:00+00:00"), _lease(1, "b:2", LATER)]}
    [_, d] = decide([_cand(1), _cand(2)], RetentionPolicy(keep_last=1), 2, leases)
    assert d.reason == f"leased by b:2 until {LATER} (and 1 more)" and d.action is PruneAction.KEEP


def test_decide_invariants_on_random_listings() -> None:
    rng = random.Random(7)
    for _ in range(300):
        steps = rng.sample(range(0, 40), rng.randint(0, 12))
        cands = [_cand(s, rng.choice(["", "", "", "t", "q", "tr"])) for s in steps]
        valid = [c.step for c in cands if c.committed and not c.quarantined]
        newest = rng.choice([None, *valid]) if valid else None
        leased = {f"step-{s:010d}": [_lease(s)] for s in steps if rng.random() < 0.2}
        policy = RetentionPolicy(keep_last=rng.choice([None, 1, 2, 3]) or 1, keep_every=rng.choice([None, 5, 10]))
        kept_last = sorted((s for s in valid if newest is not None and s <= newest), reverse=True)[:policy.keep_last]
        for d, c in zip(decide(cands, policy, newest, leased), sorted(cands, key=lambda c: -c.step), strict=True):
            if not d.delete:
                continue
            assert newest is not None and c.step < newest and not c.quarantined, (d, c)
            assert f"step-{c.step:010d}" not in leased, d
            if c.committed:  # what the policy keeps stays; a half-deleted directory is finished whatever it is
                assert c.step not in kept_last, d
                assert policy.keep_every is None or c.step % policy.keep_every, d
            else:
                assert RETIRING in c.sizes, d


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep_last": 0}, "RetentionPolicy.keep_last must be a positive int or None, got 0."),
    ({"keep_last": -3}, "RetentionPolicy.keep_last must be a positive int or None, got -3."),
    ({"keep_last": True}, "RetentionPolicy.keep_last must be a positive int or None, got True."),
    ({"keep_every": 2.5}, "RetentionPolicy.keep_every must be a positive int or None, got 2.5."),
    ({"keep_every": "10"}, "RetentionPolicy.keep_every must be a positive int or None, got '10'."),
    ({}, "RetentionPolicy needs keep_last or keep_every (or both); to keep only the newest valid checkpoint, "
         "use keep_last=1."),
])
def test_policy_is_validated_with_the_field_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        RetentionPolicy(**kwargs)
    assert str(exc.value) == message


# ---------------------------------------------------------------------------------------------------------------
# leases


def _dirs(fs_of: Any, root: str) -> list[str]:
    fs, path = fs_of(root)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_hold_writes_renews_and_removes_its_lease(root: str, fs_of: Any) -> None:
    ckpt = f"{root}/step-0000000007"
    with lease.hold(ckpt, ttl_s=0.3) as held:
        fs, path = fs_of(f"{root}/.leases")
        [name] = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        assert name.startswith("step-0000000007.") and name.endswith(".json")
        first = held.lease.expires
        raw = json.loads(fs.cat_file(f"{path}/{name}"))
        assert raw["holder"] == lease.default_holder() and raw["checkpoint"] == ckpt
        assert set(raw) == {"holder", "checkpoint", "expires", "created"}
        [found] = lease.active_leases(root)["step-0000000007"]
        assert found.holder == f"{os.uname().nodename}:{os.getpid()}"
        deadline = time.monotonic() + 5
        while held.renewals < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held.renewals >= 1 and held.lease.expires > first
        assert json.loads(fs.cat_file(f"{path}/{name}"))["expires"] == held.lease.expires
        assert held.error is None
    assert fs.ls(path, detail=False) == []
    assert lease.active_leases(root) == {}


def test_expired_and_malformed_leases_are_not_trusted(root: str, fs_of: Any) -> None:
    with lease.hold(f"{root}/step-0000000001", holder="trainer:9") as held:
        assert [x.holder for x in lease.active_leases(root)["step-0000000001"]] == ["trainer:9"]
        later = held.lease.expires_at + dt.timedelta(seconds=1)
        assert lease.active_leases(root, now=later) == {}  # expired: ignored
        fs, path = fs_of(f"{root}/.leases")
        fs.pipe_file(f"{path}/step-0000000002.{'0' * 32}.json", b"{not json")
        fs.pipe_file(f"{path}/step-0000000003.{'1' * 32}.json", json.dumps({"holder": "x"}).encode())
        fs.pipe_file(f"{path}/step-0000000004.{'2' * 32}.json.tmp-abcd1234", b"{}")
        assert list(lease.active_leases(root)) == ["step-0000000001"]
        stale = Lease(step_dir="step-0000000005", holder="dead:1", checkpoint="x", created="",
                      expires="2000-01-01T00:00:00+00:00")
        fs.pipe_file(f"{path}/step-0000000005.{'3' * 32}.json", json.dumps(stale.to_dict()).encode())
        assert "step-0000000005" not in lease.active_leases(root)
        removed = lease.sweep_expired(root)
        assert [u.rsplit("/", 1)[-1] for u in removed] == [f"step-0000000005.{'3' * 32}.json"]
        assert "step-0000000001" in lease.active_leases(root)  # a live lease is never swept


def test_a_lease_on_a_checkpoints_manifest_leases_its_directory(root: str) -> None:
    ckpt = f"{root}/step-0000000007"
    assert lease.split_checkpoint(f"{ckpt}/{MANIFEST}/") == (root, "step-0000000007")
    with lease.hold(f"{ckpt}/{MANIFEST}", holder="reader:3") as held:
        assert held.lease.step_dir == "step-0000000007" and held.lease.checkpoint == ckpt
        assert [x.holder for x in lease.active_leases(root)["step-0000000007"]] == ["reader:3"]
    assert lease.active_leases(root) == {}


def test_a_lease_written_by_another_tool_is_honoured(root: str, fs_of: Any) -> None:
    """A lease file with a UTC time written as '...Z' and no 'created' is a live reader's all the same: prune keeps
    its checkpoint (on every supported Python, 3.10 included, whose fromisoformat refuses 'Z')."""
    uris = {s: resumer.save_checkpoint(root, s, torch.nn.Linear(2, 2)) for s in (5, 6)}
    fs, path = fs_of(f"{root}/.leases")
    fs.makedirs(path, exist_ok=True)
    record = {"holder": "other-tool:1", "checkpoint": uris[5], "expires": "2099-01-01T00:00:00Z"}
    fs.pipe_file(f"{path}/step-0000000005.{'4' * 32}.json", json.dumps(record).encode())
    [found] = lease.active_leases(root)["step-0000000005"]
    assert found.created == "" and found.holder == "other-tool:1"
    assert found.expires_at == dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert _reasons(result) == {6: NEWEST, 5: "leased by other-tool:1 until 2099-01-01T00:00:00Z"}
    assert result.deleted == () and resumer.read_manifest(uris[5]).step == 5


@pytest.mark.parametrize(("target", "ttl", "message"), [
    ("{root}", 600, "a lease names one checkpoint directory"),
    ("{root}/step-1/model.x.safetensors", 600, "a lease names one checkpoint directory"),
    ("{root}/step-0000000001", 0, "ttl_s must be a positive number of seconds, got 0."),
])
def test_hold_refuses_bad_input(root: str, target: str, ttl: float, message: str) -> None:
    with pytest.raises(UsageError, match=message), lease.hold(target.format(root=root), ttl_s=ttl):
        pass


# ---------------------------------------------------------------------------------------------------------------
# prune on real storage


def _save(root: str, trained: Any, *steps: int) -> dict[int, str]:
    t = trained(seed=0, steps=1)
    return {s: resumer.save_checkpoint(root, s, t.model, t.optimizer, t.scheduler) for s in steps}


def _flip_a_byte(fs_of: Any, uri: str) -> None:
    fs, path = fs_of(uri)
    name = resumer.read_manifest(uri).data_file("model")
    data = bytearray(fs.cat_file(f"{path}/{name}"))
    data[-1] ^= 0xFF
    fs.pipe_file(f"{path}/{name}", bytes(data))


def _reasons(result: retention.PruneResult) -> dict[int, str]:
    return {d.step: d.reason for d in result.decisions}


def test_prune_keeps_the_policy_and_deletes_the_rest(root: str, trained: Any, fs_of: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    uris = _save(root, trained, 1000, 1500, 2000, 2500, 3000)
    fs, _ = fs_of(root)
    size_1500 = sum(fs.du(fs_of(uris[1500])[1], total=False).values())
    with caplog.at_level(logging.INFO, logger="resumer.checkpoints.retention"):
        result = prune(root, RetentionPolicy(keep_last=2, keep_every=1000))
    assert _reasons(result) == {3000: NEWEST, 2500: "within keep-last 2", 2000: "step is a multiple of keep-every 1000",
                                1500: OUT, 1000: "step is a multiple of keep-every 1000"}
    assert result.deleted == (uris[1500],) and result.newest_valid == uris[3000]
    assert result.bytes_freed == size_1500 > 0
    as_json = json.loads(json.dumps(result.to_dict()))  # what `resumer prune --json` prints
    assert as_json["deleted"] == [uris[1500]] and as_json["bytes_freed"] == size_1500
    assert as_json["newest_valid"] == uris[3000] and as_json["failed"] == [] and as_json["dry_run"] is False
    assert _dirs(fs_of, root) == [f"step-{s:010d}" for s in (1000, 2000, 2500, 3000)]
    assert [i.step for i in resumer.list_checkpoints(root)] == [3000, 2500, 2000, 1000]
    assert f"[retention] deleted step=1500 uri={uris[1500]} (outside the policy)" in caplog.messages
    again = prune(root, RetentionPolicy(keep_last=2, keep_every=1000))
    assert again.deleted == () and again.bytes_freed == 0


def test_a_corrupt_newest_is_quarantined_and_the_newest_valid_kept(root: str, trained: Any, fs_of: Any) -> None:
    uris = _save(root, trained, 1, 2, 3)
    _flip_a_byte(fs_of, uris[3])
    result = prune(root, RetentionPolicy(keep_last=1))
    assert _reasons(result) == {3: QUAR, 2: NEWEST, 1: OUT}
    assert result.deleted == (uris[1],) and result.newest_valid == uris[2]
    fs, path = fs_of(uris[3])
    assert "fails its checksum" in json.loads(fs.cat_file(f"{path}/{QUARANTINE}"))["reason"]
    assert _dirs(fs_of, root) == ["step-0000000002", "step-0000000003"]
    assert resumer.latest_checkpoint(root).uri == uris[2]


def test_a_leased_checkpoint_survives_until_released(root: str, trained: Any, fs_of: Any) -> None:
    uris = _save(root, trained, 1, 2, 3)
    with lease.hold(uris[1], holder="reader:42"):
        result = prune(root, RetentionPolicy(keep_last=1))
        assert _reasons(result)[1].startswith("leased by reader:42 until ")
        assert result.deleted == (uris[2],)
        assert _dirs(fs_of, root) == [".leases", "step-0000000001", "step-0000000003"]
        assert resumer.read_manifest(uris[1]).step == 1
    result = prune(root, RetentionPolicy(keep_last=1))
    assert result.deleted == (uris[1],)
    assert [d for d in _dirs(fs_of, root) if d.startswith("step-")] == ["step-0000000003"]


def test_torn_directories_are_never_deleted(root: str, trained: Any, fs_of: Any) -> None:
    uris = _save(root, trained, 1, 2, 3)
    fs, path = fs_of(uris[1])
    fs.rm_file(f"{path}/{MANIFEST}")  # step 1: torn (a writer died before committing)
    saving = f"{fs_of(root)[1]}/step-0000000009"
    fs.makedirs(saving, exist_ok=True)
    fs.pipe_file(f"{saving}/model.abc.safetensors", b"half a save")  # a save in progress
    result = prune(root, RetentionPolicy(keep_last=1))
    assert _reasons(result) == {9: TORN, 3: NEWEST, 2: OUT, 1: TORN}
    assert result.deleted == (uris[2],)
    assert _dirs(fs_of, root) == ["step-0000000001", "step-0000000003", "step-0000000009"]
    assert fs.ls(path, detail=False)  # the torn directory still holds its data


def test_dry_run_deletes_and_marks_nothing(root: str, trained: Any, fs_of: Any) -> None:
    uris = _save(root, trained, 1, 2, 3, 4)
    _flip_a_byte(fs_of, uris[4])
    fs, path = fs_of(root)
    stale = f"{path}/.leases/step-0000000002.{'3' * 32}.json"  # a crashed reader's, long expired
    fs.makedirs(f"{path}/.leases", exist_ok=True)
    fs.pipe_file(stale, json.dumps(_lease(2, "dead:1", expires="2000-01-01T00:00:00+00:00").to_dict()).encode())
    before = sorted(fs.find(path))
    result = prune(root, RetentionPolicy(keep_last=1), dry_run=True)
    assert sorted(fs.find(path)) == before  # not even the expired lease is swept
    assert _reasons(result) == {4: NEWER, 3: NEWEST, 2: OUT, 1: OUT}
    assert result.deleted == () and result.bytes_freed == 0
    assert result.summary().startswith("dry run: would delete 2 of 4 step directories")
    assert prune(root, RetentionPolicy(keep_last=1)).deleted == (uris[2], uris[1])
    assert not fs.exists(stale)  # a real prune sweeps it


def test_nothing_is_deleted_without_a_valid_checkpoint(root: str, trained: Any, fs_of: Any) -> None:
    uris = _save(root, trained, 1, 2)
    for u in uris.values():
        _flip_a_byte(fs_of, u)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert result.deleted == () and result.newest_valid is None
    assert result.note == f"no committed, verified checkpoint under {root}: nothing was deleted"
    assert _reasons(result) == {2: QUAR, 1: QUAR}
    assert _dirs(fs_of, root) == ["step-0000000001", "step-0000000002"]
    assert prune(f"{root}/nothing-here", RetentionPolicy(keep_last=1)).decisions == ()


def test_a_lease_taken_after_the_uncommit_restores_the_manifest(root: str, trained: Any, fs_of: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    uris = _save(root, trained, 1, 2)
    fs, path = fs_of(uris[1])
    manifest = fs.cat_file(f"{path}/{MANIFEST}")
    files = sorted(fs.ls(path, detail=False))
    looks: list[bool] = []
    real = retention._leases_now

    def arrives_between_looks(r: Store, name: str) -> list[Lease]:
        looks.append(fs.exists(f"{path}/{MANIFEST}"))
        return [_lease(1, "late:7")] if len(looks) == 2 else real(r, name)

    monkeypatch.setattr(retention, "_leases_now", arrives_between_looks)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert looks == [True, False]  # the second look comes after the un-commit
    assert _reasons(result)[1] == f"leased by late:7 until {LATER} (taken during prune)"
    assert result.deleted == ()
    assert fs.cat_file(f"{path}/{MANIFEST}") == manifest  # re-committed with the same bytes
    assert sorted(fs.ls(path, detail=False)) == files  # data intact, no tombstone left
    resumer.verify(resumer.read_manifest(uris[1]), checksums=True)


def test_a_doomed_checkpoint_whose_manifest_cannot_be_read_is_kept(root: str, trained: Any, fs_of: Any) -> None:
    """Decided from the listing, re-checked before deleting: a manifest that no longer parses (damaged since, or
    never sound) means prune cannot tell what the directory holds, so it keeps it and says why."""
    uris = _save(root, trained, 1, 2)
    fs, path = fs_of(uris[1])
    fs.pipe_file(f"{path}/{MANIFEST}", b"{not json")
    files = sorted(fs.ls(path, detail=False))
    result = prune(root, RetentionPolicy(keep_last=1))
    [one] = [d for d in result.decisions if d.step == 1]
    assert one.action is PruneAction.KEEP
    assert one.reason.startswith(f"its manifest cannot be read, so it is kept: {uris[1]}/{MANIFEST} is malformed")
    assert result.deleted == () and sorted(fs.ls(path, detail=False)) == files


def test_a_checkpoint_another_prune_uncommits_meanwhile_is_left_to_it(root: str, trained: Any, fs_of: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the decision and the un-commit another pruner renames the manifest away: this prune leaves the
    directory alone (the other one finishes it, or the next prune does), and says so."""
    uris = _save(root, trained, 1, 2)
    fs, path = fs_of(uris[1])
    files = sorted(fs.ls(path, detail=False))
    real = retention._leases_now

    def other_pruner_first(r: Store, name: str) -> list[Lease]:
        if name == "step-0000000001" and fs.exists(f"{path}/{MANIFEST}"):
            fs.mv(f"{path}/{MANIFEST}", f"{path}/{RETIRING}")
        return real(r, name)

    monkeypatch.setattr(retention, "_leases_now", other_pruner_first)
    result = prune(root, RetentionPolicy(keep_last=1))
    [one] = [d for d in result.decisions if d.step == 1]
    assert (one.action, one.reason) == (PruneAction.KEEP, "its manifest vanished during prune: left alone")
    assert result.deleted == () and result.failed == ()
    assert sorted(fs.ls(path, detail=False)) == sorted(f.replace(MANIFEST, RETIRING) for f in files)


def test_an_interrupted_deletion_is_finished_by_the_next_prune(root: str, trained: Any, fs_of: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    uris = _save(root, trained, 1, 2)
    real = Store.rm

    def failing_on_data(store: Store, *parts: str, **kwargs: Any) -> None:
        if parts[-1].endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", store.path_of(*parts))
        real(store, *parts, **kwargs)

    monkeypatch.setattr(Store, "rm", failing_on_data)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert result.failed == (uris[1],) and result.deleted == ()
    assert _reasons(result)[1].startswith("deletion failed: [Errno 13] Permission denied")
    fs, path = fs_of(uris[1])
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    assert MANIFEST not in names and RETIRING in names  # un-committed, marked as an unfinished deletion
    monkeypatch.setattr(Store, "rm", real)
    again = prune(root, RetentionPolicy(keep_last=1))
    assert _reasons(again)[1] == "unfinished deletion (retiring.json, no manifest): finishing it"
    assert again.deleted == (uris[1],)
    assert _dirs(fs_of, root) == ["step-0000000002"]


def test_a_reader_is_never_pulled_from_under_a_resume(root: str, trained: Any, make_trainee: Any, snapshot: Any,
                                                      assert_same_tree: Any, fs_of: Any) -> None:
    src = trained(seed=0, steps=1)
    saved_model = snapshot(src).model
    uris = {s: resumer.save_checkpoint(root, s, src.model, src.optimizer, src.scheduler) for s in (1, 2, 3, 4)}
    reading, pruned = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def slow(n: int) -> None:  # the reader is mid-read until the prune has run
        reading.set()
        pruned.wait(10)

    def reader() -> None:
        dst = make_trainee(seed=5)
        try:
            with lease.hold(uris[1], ttl_s=30, holder="reader:1"):
                outcome["result"] = resumer.resume(uris[1], dst.model, dst.optimizer, dst.scheduler, progress=slow)
                outcome["model"] = snapshot(dst).model
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert reading.wait(10), "the reader never started reading"
        result = prune(root, RetentionPolicy(keep_last=1))
        mid_read = thread.is_alive()
    finally:
        pruned.set()
        thread.join(20)
    assert mid_read, "the prune must run while the checkpoint is being read"
    assert _reasons(result)[1].startswith("leased by ")  # by reader:1 (and by resume itself, once it leases too)
    assert set(result.deleted) == {uris[2], uris[3]}
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].step == 1 and outcome["result"].checkpoint == uris[1]
    assert_same_tree(saved_model, outcome["model"], "model")
    # The lease went with the reader: the next prune removes the old checkpoint.
    assert prune(root, RetentionPolicy(keep_last=1)).deleted == (uris[1],)
    assert [d for d in _dirs(fs_of, root) if d.startswith("step-")] == ["step-0000000004"]


def test_reading_leases_a_checkpoint_already_opened_from_a_root(root: str, trained: Any) -> None:
    uris = _save(root, trained, 1)
    source = resumer.open_source(root)  # selects step 1 and reads its manifest, before any lease
    try:
        _save(root, trained, 2)  # training goes on and commits a newer one
        with lease.reading(source.uri, ttl_s=30) as held:
            assert held is not None and held.lease.step_dir == "step-0000000001"
            result = prune(root, RetentionPolicy(keep_last=1))
            assert _reasons(result)[1].startswith("leased by ")
            assert resumer.read_manifest(uris[1]).step == 1
    finally:
        source.close()
    assert prune(root, RetentionPolicy(keep_last=1)).deleted == (uris[1],)


def test_reading_refuses_a_checkpoint_pruned_before_its_lease(root: str, trained: Any) -> None:
    uris = _save(root, trained, 1, 2)
    source = resumer.open_source(uris[1])
    assert prune(root, RetentionPolicy(keep_last=1)).deleted == (uris[1],)
    with pytest.raises(CheckpointError, match="was removed by retention while it was being opened"), \
            lease.reading(source.uri):
        pass
    assert lease.active_leases(root) == {}  # the lease went with the failed read


def test_reading_is_best_effort(root: str, trained: Any, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    uris = _save(root, trained, 1)
    with lease.reading(f"{root}/best") as held:  # not a step directory: retention does not manage it
        assert held is None
    monkeypatch.setattr(Store, "write_atomic", _read_only)
    with caplog.at_level(logging.WARNING, logger="resumer.checkpoints.lease"), lease.reading(uris[1]) as held:
        assert held is None
    assert f"[lease] reading {uris[1]} without a lease" in caplog.text and "Permission denied" in caplog.text


def _read_only(*args: Any, **kwargs: Any) -> None:
    raise PermissionError(13, "Permission denied")


# ---------------------------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def cli_root(tmp_path: Any, trained: Any) -> str:
    path = str(tmp_path / "ckpts")
    _save(path, trained, 1, 2, 3)
    return path


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(prune_command, list(args))


@pytest.mark.parametrize(("args", "message"), [
    ((), "error: Say what to keep: --keep-last N"),
    (("--keep-last", "0"), "Invalid value for '--keep-last': 0 is not in the range x>=1."),
    (("--keep-every", "x"), "Invalid value for '--keep-every': 'x' is not a valid integer"),
])
def test_cli_usage_errors_exit_2(cli_root: str, args: tuple[str, ...], message: str) -> None:
    r = _invoke(cli_root, *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert len(os.listdir(cli_root)) == 3


def test_cli_dry_run_then_prune_with_json(cli_root: str) -> None:
    r = _invoke(cli_root, "--keep-last", "1", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["dry_run"] is True and d["deleted"] == [] and d["policy"] == {"keep_last": 1, "keep_every": None}
    assert [(x["step"], x["action"], x["reason"]) for x in d["decisions"]] == [
        (3, "keep", NEWEST), (2, "delete", OUT), (1, "delete", OUT)]
    assert len(os.listdir(cli_root)) == 3
    r = _invoke(cli_root, "--keep-last", "1", "--keep-every", "2")
    assert r.exit_code == 0, r.output
    assert "deleted           1" in r.stdout and "(outside the policy)" in r.stdout
    assert "deleted 1 of 3 step directories" in r.stdout
    assert sorted(os.listdir(cli_root)) == ["step-0000000002", "step-0000000003"]


def test_cli_through_the_real_entry_point(cli_root: str) -> None:
    r = subprocess.run([sys.executable, "-m", "resumer", "-v", "prune", cli_root, "--keep-last", "1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["deleted"] == [f"{cli_root}/step-0000000002", f"{cli_root}/step-0000000001"]  # newest first
    assert d["newest_valid"] == f"{cli_root}/step-0000000003" and d["bytes_freed"] > 0
    assert "[retention] deleted step=1 uri=" in r.stderr


def test_prune_rereads_a_manifest_with_the_size_limit(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-check before deleting reads no more than the manifest limit (a manifest grown huge since the
    listing costs one byte over the limit, then is refused), like every other manifest read."""
    from resumer.formats.native.manifest import MANIFEST, MAX_MANIFEST_BYTES
    from resumer.storage.store import Store

    root = str(tmp_path / "r")
    for step in (1, 2, 3):
        resumer.save_checkpoint(root, step, torch.nn.Linear(2, 2))
    limits: list[int | None] = []
    real = Store.read

    def spy(self: Store, *parts: str, limit: int | None = None) -> bytes:
        if parts and parts[-1] == MANIFEST:
            limits.append(limit)
        return real(self, *parts, limit=limit)

    monkeypatch.setattr(Store, "read", spy)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert [d.step for d in result.decisions if d.delete] == [2, 1]
    assert None not in limits, limits  # every manifest read is bounded
    assert limits.count(MAX_MANIFEST_BYTES + 1) == 2, limits  # the re-check of each of the two to delete
