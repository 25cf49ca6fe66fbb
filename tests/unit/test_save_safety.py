"""Saving and retention never lose the checkpoint you need: a copied step directory, symlinked data files,
a full disk (a real 2 MiB tmpfs where this process may mount one), two writers racing for one step, and
the durability order of a local save."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.checkpoints.retention import RetentionPolicy, prune
from resumer.core.errors import CheckpointError, ResumerError, StorageFullError
from resumer.formats.native.manifest import MANIFEST
from resumer.runtime import save as save_mod


def _dirs(root: str) -> list[str]:
    return sorted(p for p in os.listdir(root) if p.startswith("step-"))


def _model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8))  # ~10 KiB of weights
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 48)).sum().backward()
    opt.step()
    return model, opt


def _save(root: str, *steps: int) -> dict[int, str]:
    model, opt = _model()
    return {s: resumer.save_checkpoint(root, s, model, opt) for s in steps}


def _file(uri: str, kind: str) -> str:
    return os.path.join(uri, resumer.read_manifest(uri).data_file(kind))


# ---------------------------------------------------------------------------------------------------------------
# 1. a step directory copied to another name


def test_a_copied_step_directory_never_makes_prune_delete_the_real_newest(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    uris = _save(root, 10, 20, 50)
    shutil.copytree(uris[10], os.path.join(root, "step-0000000099"))  # looks newest by name, says step 10
    shutil.copytree(uris[50], os.path.join(root, "step-0000000005"))  # looks oldest by name, says step 50
    dry = prune(root, RetentionPolicy(keep_last=1), dry_run=True)
    result = prune(root, RetentionPolicy(keep_last=1))
    reasons = {d.step: d.reason for d in result.decisions}
    assert {d.step: d.reason for d in dry.decisions} == reasons  # the dry run shows what the prune does
    assert result.newest_valid == uris[50]
    assert reasons[50] == "newest valid checkpoint"
    assert reasons[99] == ("suspicious: its manifest says step 10 but the directory is step-0000000099 (copied or "
                           "renamed?); never deleted by prune and never taken as the newest")
    assert reasons[5].startswith("suspicious: its manifest says step 50 but the directory is step-0000000005")
    assert result.deleted == (uris[20], uris[10])
    assert _dirs(root) == ["step-0000000005", "step-0000000050", "step-0000000099"]
    resumer.verify(resumer.read_manifest(uris[50]), checksums=True)


def test_a_copied_step_directory_is_never_selected_resumed_or_marked(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    uris = _save(root, 10, 20)
    shutil.copytree(uris[10], os.path.join(root, "step-0000000099"))  # looks newest by name, says step 10
    chosen = resumer.latest_checkpoint(root)
    assert chosen is not None and chosen.uri == uris[20]
    assert [i.uri for i in resumer.list_checkpoints(root)] == [uris[20], uris[10]]
    model, opt = _model()
    assert resumer.resume(root, model, opt).step == 20
    assert not os.path.exists(os.path.join(root, "step-0000000099", "quarantine.json"))  # a copy, not corrupt
    rejected = resumer.select(root).rejected
    assert rejected[0].reason.endswith("its manifest says step 10, its directory name says step 99 (copied or "
                                       "renamed?). It is not used and not marked; move it back to its step's "
                                       "directory name to use it.")
    # The audit record (a job's rejected.json) says which step the copy really holds.
    assert rejected[0].to_dict() == {"uri": os.path.join(root, "step-0000000099"), "step": 99,
                                     "reason": rejected[0].reason, "manifest_step": 10}


# ---------------------------------------------------------------------------------------------------------------
# 2. symlinked data files


def test_symlinked_data_files_stay_valid_and_link_targets_are_never_deleted(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    uris = _save(root, 1, 2, 3)  # one model, unchanged: the three checkpoints' data files hold the same bytes
    outside = tmp_path / "shared"
    outside.mkdir()
    # step 3 (kept) dedups its model file into step 2 (doomed by keep-last 1) through a relative link
    model3 = _file(uris[3], "model")
    os.remove(model3)
    os.symlink(os.path.relpath(_file(uris[2], "model"), uris[3]), model3)
    # step 3's optimizer file lives outside the root; step 1's optimizer file links into kept step 3
    opt3 = _file(uris[3], "optimizer")
    shutil.move(opt3, outside / "opt.safetensors")
    os.symlink(outside / "opt.safetensors", opt3)
    opt1 = _file(uris[1], "optimizer")
    os.remove(opt1)
    os.symlink(opt3, opt1)
    # step 1's model file points outside the root: deleting step 1 removes the link, never its target
    model1 = _file(uris[1], "model")
    shutil.move(model1, outside / "model1.safetensors")
    os.symlink(outside / "model1.safetensors", model1)
    target_bytes = (outside / "model1.safetensors").read_bytes()

    result = prune(root, RetentionPolicy(keep_last=1))
    reasons = {d.step: d.reason for d in result.decisions}
    assert reasons[2] == (f"the kept {model3} is a symlink leading to its {os.path.basename(_file(uris[2], 'model'))}"
                          ": deleting it would break that checkpoint")
    assert result.deleted == (uris[1],) and result.failed == ()
    assert _dirs(root) == ["step-0000000002", "step-0000000003"]
    assert (outside / "model1.safetensors").read_bytes() == target_bytes
    assert (outside / "opt.safetensors").is_file()
    resumer.verify(resumer.read_manifest(uris[3]), checksums=True)
    fresh, fresh_opt = _model(seed=1)
    assert resumer.resume(uris[3], fresh, fresh_opt).step == 3


# ---------------------------------------------------------------------------------------------------------------
# 3 and 6. a full disk


class Disk:
    """A small filesystem at ``root`` that ``fill`` fills up (to ``leave`` free bytes) and ``free`` empties.

    Real: a 2 MiB tmpfs mounted for the test. Fallback where this process may not mount (not root):
    ``fill`` makes every write-mode ``open`` under the mount raise OSError(ENOSPC), as a full disk does.
    """

    def __init__(self, mount: Path, real: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mount, self.real, self._mp = mount, real, monkeypatch
        self.root = str(mount / "ckpts")
        self._filler = mount / "filler"

    def fill(self, leave: int = 0) -> None:
        if self.real:
            with open(self._filler, "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
                _write_forever(f)
            if leave:
                os.truncate(self._filler, max(0, self._filler.stat().st_size - leave))
            return
        real_open = builtins.open

        def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(m in mode for m in "wxa+") and str(file).startswith(str(self.mount)):
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return real_open(file, mode, *args, **kwargs)

        self._mp.setattr(builtins, "open", full_open)

    def free(self) -> None:
        if self.real:
            self._filler.unlink(missing_ok=True)
        else:
            self._mp.undo()

    def available(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize


def _write_forever(f: Any) -> None:
    while True:
        f.write(b"\0" * 4096)


def _write_through(path: str, data: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(data)


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    mount = tmp_path / "small"
    mount.mkdir()
    can = os.geteuid() == 0 and shutil.which("mount") is not None
    real = can and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                  capture_output=True).returncode == 0
    try:
        yield Disk(mount, real, monkeypatch)
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_prune_frees_space_on_a_full_disk(small_disk: Disk) -> None:
    """On a real full tmpfs when mountable (else with every write raising ENOSPC): prune writes nothing first."""
    uris = _save(small_disk.root, 1, 2, 3)
    small_disk.fill()
    probe = os.path.join(small_disk.root, "probe")
    with pytest.raises(OSError, match="No space left"):
        _write_through(probe, b"x" * 65536)  # the disk is full indeed
    with contextlib.suppress(FileNotFoundError):
        os.remove(probe)
    before = small_disk.available()
    result = prune(small_disk.root, RetentionPolicy(keep_last=1))
    assert result.failed == () and result.deleted == (uris[2], uris[1])
    assert _dirs(small_disk.root) == ["step-0000000003"]
    if small_disk.real:
        assert small_disk.available() > before
    resumer.verify(resumer.read_manifest(uris[3]), checksums=True)


def test_a_full_disk_during_save_is_a_resumer_error_and_leaves_no_checkpoint(small_disk: Disk) -> None:
    """On a real full tmpfs when mountable (else with every write raising ENOSPC)."""
    uris = _save(small_disk.root, 1)
    small_disk.fill(leave=8192)  # room for part of a data file: the save fails in the middle of writing it
    model, opt = _model()
    with pytest.raises(StorageFullError) as info:
        resumer.save_checkpoint(small_disk.root, 2, model, opt)
    assert isinstance(info.value, ResumerError) and info.value.uri == os.path.join(small_disk.root, "step-0000000002")
    assert str(info.value).startswith(f"Saving step 2 to {info.value.uri} failed: no space left on the storage (")
    assert str(info.value).endswith("Nothing was committed and this save's partial files were removed. Free space "
                                    f"(e.g. `resumer prune {small_disk.root} --keep-last N` deletes old "
                                    "checkpoints) and save again.")
    assert os.listdir(info.value.uri) == []  # no manifest, no partial data file
    assert [i.uri for i in resumer.list_checkpoints(small_disk.root)] == [uris[1]]
    small_disk.free()
    assert resumer.save_checkpoint(small_disk.root, 2, model, opt) == info.value.uri
    resumer.verify(resumer.read_manifest(info.value.uri), checksums=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. two saves of one step at once


def _race(root: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, str], dict[int, BaseException]]:
    """Two writers save step 5 with different weights; both reach the commit before either commits."""
    barrier = threading.Barrier(2, timeout=120)
    real = save_mod._check_written

    def both_ready(*args: Any) -> None:
        real(*args)
        barrier.wait()  # each has its data written and passed the 'already committed' check

    monkeypatch.setattr(save_mod, "_check_written", both_ready)
    won: dict[int, str] = {}
    lost: dict[int, BaseException] = {}

    built = {seed: _model(seed) for seed in (1, 2)}  # here: torch's global RNG is not for two threads at once

    def writer(seed: int) -> None:
        model, opt = built[seed]
        try:
            won[seed] = resumer.save_checkpoint(root, 5, model, opt)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            lost[seed] = exc

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_two_saves_of_one_step_at_once_commit_exactly_one(root: str, fs_of: Callable[..., Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    won, lost = _race(root, monkeypatch)
    assert len(won) == 1 and len(lost) == 1, (won, lost)
    (winner, uri), (_, error) = next(iter(won.items())), next(iter(lost.items()))
    assert isinstance(error, CheckpointError)
    assert str(error) == (f"Cannot commit {uri}: another writer committed step 5 first (two saves of one step ran "
                          "at once). Its checkpoint stands; this save's data files were removed. Save each step from "
                          "one writer, or use another root.")
    manifest = resumer.read_manifest(uri)
    resumer.verify(manifest, checksums=True)
    fs, path = fs_of(uri)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert names == sorted([MANIFEST, *(f.path for f in manifest.files)])  # the loser's files are gone
    fresh, fresh_opt = _model(seed=3)
    resumer.resume(uri, fresh, fresh_opt)
    expected, _ = _model(winner)
    for (k, v), w in zip(fresh.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


# ---------------------------------------------------------------------------------------------------------------
# 5. durability order


def test_a_local_save_fsyncs_data_then_manifest_then_directories(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    root = str(tmp_path / "ckpts")
    model, opt = _model()
    uri = resumer.save_checkpoint(root, 7, model, opt)
    data = {os.path.join(uri, f.path) for f in resumer.read_manifest(uri).files}
    assert len(data) == 2 and set(synced[:2]) == data
    assert os.path.dirname(synced[2]) == uri and os.path.basename(synced[2]).startswith(f"{MANIFEST}.tmp-")
    assert synced[3:] == [uri, root]
