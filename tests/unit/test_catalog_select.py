"""Choosing the checkpoint to resume under a root: ``scan`` lists every step directory from one listing, ``select``
takes the newest valid one and says of each newer one it passed over which step it was and why. The storage
options a caller gives reach every store opened for them (a lease's root, a verification's checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.checkpoints import lease
from resumer.checkpoints.catalog import quarantine, scan, select
from resumer.formats.native.manifest import MANIFEST, step_dir
from resumer.formats.native.verify import verify
from resumer.storage.store import Store


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_select_says_which_step_each_passed_over_checkpoint_was_and_why(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    model = _model()
    good = resumer.save_checkpoint(root, 1, model)
    marked = resumer.save_checkpoint(root, 2, model)
    quarantine(marked, "bad bytes")
    torn = os.path.join(root, step_dir(3))
    os.makedirs(torn)
    with open(os.path.join(torn, "model.safetensors"), "wb") as f:
        f.write(b"half")
    excluded = resumer.save_checkpoint(root, 4, model)

    sel = select(root, exclude={excluded: "failed to load a moment ago"}, mark=False)
    assert sel.chosen is not None and sel.chosen.uri == good and sel.chosen.step == 1
    assert [(r.uri, r.step, r.reason) for r in sel.rejected] == [
        (excluded, 4, "failed to load a moment ago"),
        (Store.open(root).uri_of(step_dir(3)), 3, "torn: no manifest.json (never committed)"),
        (marked, 2, "quarantined earlier"),
    ]


def test_scan_finds_the_checkpoints_under_a_root_whose_name_ends_in_a_space(tmp_path: Path) -> None:
    root = str(tmp_path / "run 1 ")
    uri = resumer.save_checkpoint(root, 5, _model())
    assert [(c.step, c.uri) for c in scan(root)] == [(5, uri)]


def test_scan_counts_files_not_the_directories_a_listing_may_hold(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "ckpts")
    resumer.save_checkpoint(root, 5, _model())
    files = set(scan(root)[0].sizes)
    assert MANIFEST in files
    listing = Store.find

    def with_markers(self: Store) -> dict[str, dict[str, Any]]:
        # Object stores may list a "directory" (a marker object or a common prefix) beside the files.
        found = listing(self)
        found[self.path.rstrip("/") + "/" + step_dir(5) + "/logs"] = {"type": "directory", "size": 0}
        return found

    monkeypatch.setattr(Store, "find", with_markers)
    assert set(scan(root)[0].sizes) == files


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    real = Store.open.__func__  # type: ignore[attr-defined]

    def open_(cls: type[Store], uri: str, storage_options: dict[str, Any] | None = None) -> Store:
        calls.append((str(uri), storage_options))
        return real(cls, uri, storage_options)

    monkeypatch.setattr(Store, "open", classmethod(open_))
    return calls


OPTIONS = {"auto_mkdir": True}


def test_a_lease_opens_its_root_with_the_storage_options_given(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "ckpts")
    uri = resumer.save_checkpoint(root, 1, _model())
    calls = _recording(monkeypatch)
    with lease.hold(uri, OPTIONS, ttl_s=60):
        pass
    assert calls and all(options == OPTIONS for _, options in calls)


def test_verify_opens_the_checkpoint_with_the_storage_options_given(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uri = resumer.save_checkpoint(str(tmp_path / "ckpts"), 1, _model())
    manifest = resumer.read_manifest(uri)
    calls = _recording(monkeypatch)
    verify(manifest, OPTIONS)
    assert calls == [(manifest.uri, OPTIONS)]


def test_verify_checksums_only_the_files_it_is_asked_to(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    uri = resumer.save_checkpoint(str(tmp_path / "ckpts"), 1, model, opt)
    manifest = resumer.read_manifest(uri)
    paths = [f.path for f in manifest.files]
    assert len(paths) >= 2
    damaged, other = paths[0], paths[1]
    with open(os.path.join(uri, damaged), "r+b") as f:  # same size, last byte flipped
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    verify(manifest, checksum_files={other})  # the caller checksums the damaged file itself while reading it
    verify(manifest, checksums=False)
    with pytest.raises(resumer.CheckpointError) as info:
        verify(manifest, checksum_files={damaged})
    assert info.value.uri == manifest.uri and "fails its checksum" in str(info.value)
