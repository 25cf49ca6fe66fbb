"""A failed resume leaves the live model, optimizer, scheduler and RNG exactly as they were.

Each hostile checkpoint is a good one (resumer.save_checkpoint) with one thing edited afterwards; every
check must run before the first live tensor is written, with verification on or off.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import resumer
import resumer.storage.store
import resumer.storage.transfer
from resumer import examples as ex
from resumer.formats.native.manifest import long_form


class Live:
    """A trained model, Adam and StepLR, with a bitwise snapshot of all of them and of the RNGs."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model if model is not None else ex.mlp_v1()
        self.opt = ex.adam(self.model)
        self.sched = ex.step_lr(self.opt)
        for step in range(3):
            ex.train_step(self.model, self.opt, 100 + step, self.sched)
        torch.manual_seed(1234)
        self.params = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.opt_state = copy.deepcopy(self.opt.state_dict())
        self.sched_state = copy.deepcopy(self.sched.state_dict())
        self.rng = (torch.get_rng_state().clone(), np.random.get_state(), random.getstate())

    def assert_unchanged(self) -> None:
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, self.params[k]), f"model {k} changed"
        after = self.opt.state_dict()
        assert after["param_groups"] == self.opt_state["param_groups"]
        assert after["state"].keys() == self.opt_state["state"].keys()
        for i, st in self.opt_state["state"].items():
            assert after["state"][i].keys() == st.keys()
            assert all(torch.equal(after["state"][i][k], v) for k, v in st.items()), f"optimizer state {i} changed"
        assert self.sched.state_dict() == self.sched_state
        assert torch.equal(torch.get_rng_state(), self.rng[0])
        np_now = np.random.get_state()
        assert np_now[0] == self.rng[1][0] and np.array_equal(np_now[1], self.rng[1][1])
        assert np_now[2:] == self.rng[1][2:]
        assert random.getstate() == self.rng[2]


def _saved(tmp_path: Path, model: nn.Module | None = None) -> str:
    model = model if model is not None else ex.mlp_v1()
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    for step in range(2):
        ex.train_step(model, opt, step, sched)
    return resumer.save_checkpoint(str(tmp_path / "ckpt"), 2, model, opt, sched)


def _edit_manifest(uri: str, edit: Callable[[dict[str, Any]], None]) -> None:
    path = os.path.join(uri, "manifest.json")
    with open(path) as f:
        raw = long_form(json.load(f))
    edit(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


def _data_file(uri: str, kind: str) -> str:
    return os.path.join(uri, resumer.read_manifest(uri).data_file(kind))


def _reshape_location(raw: dict[str, Any]) -> None:
    loc = raw["tensors"]["2.weight"]
    loc["shape"] = [loc["shape"][0] * loc["shape"][1]]  # same bytes; the signature still says 2-D


def _state_shape(raw: dict[str, Any]) -> None:
    key = "2.weight/exp_avg"
    loc = raw["optimizer"]["tensors"][key]
    flat = [loc["shape"][0] * loc["shape"][1]]
    loc["shape"] = flat
    for st in raw["signature"]["optimizer"]["state"]:
        if st["param"] == "2.weight":
            for e in st["entries"]:
                if e["key"] == "exp_avg":
                    e["shape"] = flat


def _lr(raw: dict[str, Any]) -> None:
    raw["signature"]["optimizer"]["groups"][0]["hyperparams"]["lr"] = "fast"


def _betas(raw: dict[str, Any]) -> None:
    raw["signature"]["optimizer"]["groups"][0]["hyperparams"]["betas"] = {"__resumer__": "tuple", "v": [0.9]}


def _sched_epoch(raw: dict[str, Any]) -> None:
    raw["scheduler"]["state"]["last_epoch"] = "x"


def _sched_attr(raw: dict[str, Any]) -> None:
    raw["scheduler"]["state"]["step"] = 3  # would replace the scheduler's step() method


def _rng_numpy(raw: dict[str, Any]) -> None:
    raw["rng"]["numpy"]["pos"] = 100_000


def _rng_torch(raw: dict[str, Any]) -> None:
    raw["rng"]["torch"] = base64.b64encode(b"\x07" * len(base64.b64decode(raw["rng"]["torch"]))).decode()


def _scalar_state(raw: dict[str, Any]) -> None:
    raw["optimizer"]["scalars"]["2.weight"] = {"step": "soon"}


MANIFEST_EDITS = {
    "signature vs byte range": (_reshape_location, "in the signature"),
    "optimizer state shape": (_state_shape, "'2.weight/exp_avg' has shape [4096], but parameter '2.weight'"),
    "hyperparameter type": (_lr, "optimizer param group 0 'lr' is 'fast' (str)"),
    "hyperparameter tuple": (_betas, "optimizer param group 0 'betas' is (0.9,)"),
    "scheduler value type": (_sched_epoch, "scheduler state 'last_epoch' is 'x'"),
    "scheduler attribute": (_sched_attr, "would replace the scheduler's own attribute"),
    "numpy RNG": (_rng_numpy, "RNG state is malformed"),
    "optimizer scalar": (_scalar_state, "optimizer state '2.weight/step' is 'soon'"),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_hostile_manifest_changes_nothing(tmp_path: Path, case: str, verify: bool) -> None:
    edit, message = MANIFEST_EDITS[case]
    uri = _saved(tmp_path)
    _edit_manifest(uri, edit)
    live = Live()
    with pytest.raises(resumer.CheckpointError) as err:
        resumer.resume(uri, live.model, live.opt, live.sched, verify=verify)
    assert message in str(err.value)
    assert "nothing was loaded" in str(err.value).lower()
    live.assert_unchanged()


def test_hostile_torch_rng_state_changes_nothing(tmp_path: Path) -> None:
    """A torch RNG state of the right length whose content torch refuses is found before anything is set."""
    uri = _saved(tmp_path)
    _edit_manifest(uri, _rng_torch)
    live = Live()
    try:
        torch.Generator().set_state(torch.full((torch.get_rng_state().numel(),), 7, dtype=torch.uint8))
    except RuntimeError:
        with pytest.raises(resumer.CheckpointError, match="RNG state is malformed"):
            resumer.resume(uri, live.model, live.opt, live.sched, verify=False)
        live.assert_unchanged()
    else:
        pytest.skip("this torch accepts any CPU generator state of the right length")


def test_file_size_is_checked_without_verification(tmp_path: Path) -> None:
    uri = _saved(tmp_path)
    with open(_data_file(uri, "optimizer"), "ab") as f:
        f.write(b"\0" * 8)
    live = Live()
    with pytest.raises(resumer.CheckpointError, match=r"has \d+ bytes, the manifest says \d+"):
        resumer.resume(uri, live.model, live.opt, live.sched, verify=False)
    live.assert_unchanged()


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_optimizer_header_is_checked_against_the_manifest(tmp_path: Path, verify: bool) -> None:
    """A header that no longer names a tensor (same length, same file size) is found by parsing it."""
    uri = _saved(tmp_path)
    path = _data_file(uri, "optimizer")
    data = Path(path).read_bytes()
    assert data.count(b'"2.weight/exp_avg"') == 1
    Path(path).write_bytes(data.replace(b'"2.weight/exp_avg"', b'"2.weight/exp_avX"'))
    live = Live()
    with pytest.raises(resumer.CheckpointError,
                       match="'2.weight/exp_avg' is in the manifest but not in the file") as err:
        resumer.resume(uri, live.model, live.opt, live.sched, verify=verify)
    assert err.value.uri == uri  # the checkpoint at fault, for the caller that passes it over or marks it
    live.assert_unchanged()


class Deep(nn.Module):
    """16 tensors (8 Linear layers), so a read can fail in the middle of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(16, 16) for _ in range(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x[:, :16])


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["model", "model+optimizer"])
def test_read_failing_on_the_third_tensor_changes_nothing(tmp_path: Path, with_optimizer: bool) -> None:
    """The model file is cut short (a real truncation of the real file) once two tensors have been read."""
    uri = _saved(tmp_path, Deep())
    path = _data_file(uri, "model")
    calls = [0]

    def cut_after_two(_: int) -> None:
        calls[0] += 1
        if calls[0] == 3:  # header, then two tensors (each progress call follows a completed read)
            os.truncate(path, 0)

    live = Live(Deep())
    with pytest.raises(resumer.CheckpointError, match="ended early"):
        resumer.resume(uri, live.model, live.opt if with_optimizer else None, live.sched if with_optimizer else None,
                       progress=cut_after_two)
    live.assert_unchanged()


def test_each_data_file_is_opened_and_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With verification on, the bytes checksummed are the bytes loaded: one open, one pass per file."""
    uri = _saved(tmp_path)
    opened: list[str] = []
    real = resumer.storage.transfer.open_for_scan

    def counting(fs: Any, path: str, size: int | None = None) -> Any:
        opened.append(os.path.basename(path))
        return real(fs, path, size)

    monkeypatch.setattr(resumer.storage.transfer, "open_for_scan", counting)
    monkeypatch.setattr(resumer.storage.store, "open_for_scan", counting)  # Store.open_read
    seen: list[int] = []
    live = Live()
    res = resumer.resume(uri, live.model, live.opt, live.sched, progress=seen.append)
    manifest = resumer.read_manifest(uri)
    assert sorted(opened) == sorted(f.path for f in manifest.files)
    assert sum(seen) == res.bytes_read == manifest.total_bytes


def test_a_checkpoint_this_code_cannot_take_is_neither_quarantined_nor_passed_over(tmp_path: Path) -> None:
    """The code changed (its param group's 'name' is now a number): the newest checkpoint is sound but does not go
    into this optimizer. The resume stops there and says so; it does not mark it bad for every reader, nor fall
    back to an older checkpoint (which would silently lose the newest progress)."""
    root = str(tmp_path / "ckpt")
    saved = ex.mlp_v1()
    opt = torch.optim.Adam([{"params": list(saved.parameters()), "name": "all"}], lr=1e-3)
    for step in (1, 2):
        ex.train_step(saved, opt, step)
        resumer.save_checkpoint(root, step, saved, opt)
    model = ex.mlp_v1()
    live = torch.optim.Adam([{"params": list(model.parameters()), "name": 0}], lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(resumer.CheckpointMismatch) as err:
        resumer.resume(root, model, live)
    assert err.value.uri is not None and err.value.uri.endswith("step-0000000002")
    assert "optimizer param group 0 'name' is 'all' (str), where this code has 0 (int)" in str(err.value)
    crossed = pickle.loads(pickle.dumps(err.value))  # as it crosses Ray processes: still a mismatch
    assert isinstance(crossed, resumer.CheckpointMismatch) and crossed.quarantine is False
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert live.state_dict()["state"] == {}
    assert [c.step for c in resumer.list_checkpoints(root, include_quarantined=True) if c.quarantine] == []
    assert [c.step for c in resumer.list_checkpoints(root)] == [2, 1]
