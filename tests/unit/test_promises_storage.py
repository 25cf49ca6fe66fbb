"""Safety rules of storage, retention and leases, each pinned so that breaking it fails a test.

Each test names the rule it pins; removing or inverting that rule in ``resumer/`` makes it fail.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import xxhash
from fsspec.implementations.memory import MemoryFileSystem
from torch import nn

import resumer
from resumer.checkpoints import catalog, lease, retention
from resumer.checkpoints.retention import RetentionPolicy, prune
from resumer.core.errors import CheckpointError
from resumer.formats.native.manifest import MANIFEST, QUARANTINE, long_form
from resumer.storage.store import Store

# ---------------------------------------------------------------------------------------------------------------
# prune: a checkpoint quarantined while the prune runs is not deleted


def test_prune_keeps_a_checkpoint_quarantined_during_the_prune(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the decision and the deletion another process marks the doomed step 1 bad: it stays."""
    root = str(tmp_path / "ckpts")
    model = nn.Linear(4, 4)
    uris = {s: resumer.save_checkpoint(root, s, model) for s in (1, 2)}
    step1 = Path(uris[1])
    files = sorted(os.listdir(step1))
    real = retention._second_look

    def marked_meanwhile(*args: Any) -> list[retention.PruneDecision]:
        decisions = real(*args)
        assert [d.step for d in decisions if d.delete] == [1]  # step 1 was doomed
        catalog.quarantine(uris[1], "marked by another process")
        return decisions

    monkeypatch.setattr(retention, "_second_look", marked_meanwhile)
    result = prune(root, RetentionPolicy(keep_last=1))
    assert result.deleted == () and result.bytes_freed == 0
    assert {d.step: (d.action, d.reason) for d in result.decisions} == {
        2: (retention.PruneAction.KEEP, "newest valid checkpoint"),
        1: (retention.PruneAction.KEEP, "quarantined: kept for inspection (marked during prune)")}
    assert [d["action"] for d in json.loads(json.dumps(result.to_dict()))["decisions"]] == ["keep", "keep"]
    assert sorted(os.listdir(step1)) == sorted([*files, QUARANTINE])  # manifest and data all still there
    resumer.verify(resumer.read_manifest(uris[1]), checksums=True)


# ---------------------------------------------------------------------------------------------------------------
# the safetensors header must agree with the manifest's byte ranges


class TwoSame(nn.Module):
    """Two tensors of one shape and dtype: a file that swaps them still parses and has the right sizes."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4, 4))


def _swap_in_file(uri: str) -> None:
    """Rewrite the model file so that 'a' and 'b' trade places, header AND bytes: the file alone is a valid
    safetensors file holding the right values, but the manifest's byte ranges now point at the other tensor.
    The manifest's checksum is recomputed, so only comparing the header with the manifest can tell."""
    manifest_path = Path(uri) / MANIFEST
    raw = long_form(json.loads(manifest_path.read_text()))
    [entry] = [f for f in raw["files"] if f["path"].startswith("model.")]
    path = Path(uri) / entry["path"]
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), bytearray(data[8 + n:])
    (a0, a1), (b0, b1) = header["a"]["data_offsets"], header["b"]["data_offsets"]
    assert a1 - a0 == b1 - b0 > 0
    body[a0:a1], body[b0:b1] = body[b0:b1], body[a0:a1]
    header["a"]["data_offsets"], header["b"]["data_offsets"] = [b0, b1], [a0, a1]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    new = struct.pack("<Q", n) + text.ljust(n, b" ") + bytes(body)
    assert len(new) == len(data) and new != data
    path.write_bytes(new)
    entry["checksum"] = f"xxh3_128:{xxhash.xxh3_128(new).hexdigest()}"
    manifest_path.write_text(json.dumps(raw))
    assert raw["tensors"]["a"]["offset"] == 8 + n + a0  # the manifest still places 'a' where 'b' now lies


@pytest.fixture
def swapped(tmp_path: Path) -> str:
    uri = resumer.save_checkpoint(str(tmp_path / "ckpts"), 3, TwoSame(seed=1))
    _swap_in_file(uri)
    return uri


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_resume_refuses_header_offsets_swapped_against_the_manifest(swapped: str, verify: bool) -> None:
    model = TwoSame(seed=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor 'a' .*The checkpoint is corrupt; nothing was loaded\.") as err:
        resumer.resume(swapped, model, verify=verify)
    assert "in the file's header" in str(err.value) and "in the manifest" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model changed"


def test_verify_refuses_header_offsets_swapped_against_the_manifest(swapped: str) -> None:
    """The full verification (selection, ``resumer verify``) compares the header too, not just the checksum."""
    manifest = resumer.read_manifest(swapped)
    with pytest.raises(CheckpointError, match=r"tensor 'a' in the file does not match the manifest\. The "
                                              r"checkpoint is corrupt; nothing was loaded\."):
        resumer.verify(manifest, checksums=True)


# ---------------------------------------------------------------------------------------------------------------
# a reader that cannot write still falls back past a corrupt checkpoint


def test_a_reader_that_cannot_mark_a_corrupt_checkpoint_falls_back_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Read-only credentials: the quarantine mark cannot be written. Selection goes on to the older checkpoint;
    the failure to mark is logged with the checkpoint and the reason, never raised."""
    root = str(tmp_path / "ckpts")
    uris = {s: resumer.save_checkpoint(root, s, nn.Linear(4, 4)) for s in (1, 2)}
    with open(os.path.join(uris[2], MANIFEST), "wb") as f:
        f.write(b"{not json")

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Store, "write_atomic", read_only)
    with caplog.at_level("WARNING", logger="resumer.checkpoints.catalog"):
        chosen = resumer.latest_checkpoint(root)
    assert chosen is not None and chosen.uri == uris[1]
    assert not os.path.exists(os.path.join(uris[2], QUARANTINE))
    [warning] = [r.getMessage() for r in caplog.records if "[quarantine]" in r.getMessage()]
    assert warning.startswith(f"[quarantine] could not mark {uris[2]} ([Errno 13] Permission denied): {uris[2]}/")
    assert "is malformed" in warning


# ---------------------------------------------------------------------------------------------------------------
# save lists what it wrote before it commits


class LosingMemoryFS(MemoryFileSystem):
    """memory:// whose store silently loses every data file written: the write succeeds, the object is gone
    (an eventually-inconsistent or misbehaving object store). Its own store, not memory://'s shared one."""

    protocol = "losing-memory"
    store: dict[str, Any] = {}  # fsspec's MemoryFileSystem keeps its store on the class: give this one its own
    pseudo_dirs = [""]

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        if "w" in mode and path.endswith(".safetensors"):
            self.store.pop(self._strip_protocol(path), None)  # written into, never seen again
        return f


@pytest.fixture
def losing_root() -> Iterator[str]:
    fsspec.register_implementation(LosingMemoryFS.protocol, LosingMemoryFS, clobber=True)
    yield f"{LosingMemoryFS.protocol}://r{uuid.uuid4().hex}"
    LosingMemoryFS.store.clear()
    LosingMemoryFS.pseudo_dirs[:] = [""]


def test_save_does_not_commit_when_the_store_lost_a_data_file(losing_root: str) -> None:
    fs, path = fsspec.core.url_to_fs(f"{losing_root}/step-0000000005")
    with pytest.raises(CheckpointError, match=r"model\.[0-9a-f]+\.safetensors is missing or has the wrong size just "
                                              r"before commit \(None bytes, wrote \d+\): the store lost it\. Nothing "
                                              r"was committed; save again\."):
        resumer.save_checkpoint(losing_root, 5, nn.Linear(4, 4))
    assert not fs.exists(f"{path}/{MANIFEST}")
    assert resumer.list_checkpoints(losing_root) == []


# ---------------------------------------------------------------------------------------------------------------
# leases


def test_reading_renews_its_lease_while_a_long_read_runs(tmp_path: Path) -> None:
    """A read that outlasts ``ttl_s`` still holds an active lease: judged at the moment the first lease would
    have expired, it is active, because it was renewed (no timing threshold: the check uses ``now=``)."""
    root = str(tmp_path / "ckpts")
    uri = resumer.save_checkpoint(root, 1, nn.Linear(4, 4))
    with lease.reading(uri, ttl_s=0.6) as held:
        assert held is not None
        first = held.lease.expires_at
        give_up = time.monotonic() + 30  # a bound on a broken renewal, not a timing threshold
        while held.renewals < 2 and time.monotonic() < give_up:  # the long read, until renewed twice
            lease.active_leases(root)  # real work meanwhile: list and read the lease files
        assert held.renewals >= 2, "the lease was never renewed during the read"
        [seen] = lease.active_leases(root, now=first)["step-0000000001"]
        assert seen.expires_at > first and seen.expires == held.lease.expires
        result = prune(root, RetentionPolicy(keep_last=1))  # nothing newer: kept anyway, and still leased
        assert result.deleted == ()
    assert lease.active_leases(root) == {}


def test_leases_are_read_with_the_storage_options_given(credentialed_root: tuple[str, dict[str, Any]]) -> None:
    """``active_leases(root, storage_options)`` reads the leases with those options; a root it cannot list is an
    error, never "no leases" (which would let a prune delete a leased checkpoint)."""
    root, options = credentialed_root
    with lease.hold(f"{root}/step-0000000003", options, holder="reader:5"):
        assert [x.holder for x in lease.active_leases(root, options)["step-0000000003"]] == ["reader:5"]
        with pytest.raises(PermissionError, match="no credentials"):
            lease.active_leases(root)
    assert lease.active_leases(root, options) == {}


_HOLDER = textwrap.dedent("""
    import sys
    from resumer.checkpoints import lease
    with lease.hold(sys.argv[1], ttl_s=600) as held:
        print(held.lease.holder, flush=True)
        sys.stdin.readline()  # hold until the test says so
""")


def test_prune_honours_a_lease_held_by_another_process(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    model = nn.Linear(4, 4)
    uris = {s: resumer.save_checkpoint(root, s, model) for s in (1, 2)}
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, uris[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        holder = child.stdout.readline().strip()
        assert holder.endswith(f":{child.pid}"), holder
        result = prune(root, RetentionPolicy(keep_last=1))
        [one] = [d for d in result.decisions if d.step == 1]
        assert one.reason.startswith(f"leased by {holder} until ") and not one.delete
        assert result.deleted == () and os.path.exists(os.path.join(uris[1], MANIFEST))
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert prune(root, RetentionPolicy(keep_last=1)).deleted == (uris[1],)  # released: now it goes
