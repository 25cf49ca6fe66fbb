"""What save_checkpoint captures (optimizer scalars, the world, the scheduler slot) and what it refuses before a
byte is written (a bad step, a non-dict or unencodable ``extra``, one rank's shards); sharded state goes to the
collective save with the caller's arguments."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.core.errors import CheckpointError, ResumerError, UsageError
from resumer.formats.native.manifest import MANIFEST
from resumer.runtime import save as save_mod
from resumer.runtime import sharded, sharded_save


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_non_tensor_optimizer_state_is_saved_and_resumed_per_parameter(tmp_path: Path) -> None:
    model, opt = _model()
    opt.state[model[0].weight]["count"] = 3  # a plain value beside the momentum buffer (a tensor)
    opt.state[model[1].bias]["warm"] = True
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    assert resumer.read_manifest(uri).optimizer_scalars == {"0.weight": {"count": 3}, "1.bias": {"warm": True}}
    fresh, fresh_opt = _model()
    resumer.resume(uri, fresh, fresh_opt)
    assert fresh_opt.state[fresh[0].weight]["count"] == 3
    assert fresh_opt.state[fresh[1].bias]["warm"] is True
    assert torch.equal(fresh_opt.state[fresh[0].weight]["momentum_buffer"],
                       opt.state[model[0].weight]["momentum_buffer"])


@pytest.mark.parametrize("value", ["warm", {"phase": 1}, [1, "a"]])
def test_optimizer_state_resume_cannot_load_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                  value: Any) -> None:
    """Resume refuses a string or a dict in optimizer state (no optimizer keeps one beside its tensors); a save
    that held one would commit a checkpoint that never resumes. Refused up front, naming the value's place."""
    model, opt = _model()
    opt.state[model[0].weight]["tag"] = value
    with pytest.raises(UsageError, match=r"Cannot save optimizer state '0\.weight' 'tag'.*pass them in `extra`"):
        resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    with pytest.raises(UsageError, match="'0.weight' 'tag'"), resumer.AsyncSaver(str(tmp_path)) as saver:
        saver.save(2, model, opt)
    assert resumer.list_checkpoints(str(tmp_path)) == []


def test_optimizer_state_of_numbers_flags_tuples_and_small_tensors_is_saved_and_resumed(tmp_path: Path) -> None:
    import numpy as np

    model, opt = _model()
    kept = {"n": np.int64(4), "betas": (0.9, 0.99), "flags": [True, None], "t": torch.tensor(2.5)}
    opt.state[model[0].weight].update(kept)
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    fresh, fresh_opt = _model()
    resumer.resume(uri, fresh, fresh_opt)
    got = fresh_opt.state[fresh[0].weight]
    assert (got["n"], got["betas"], got["flags"]) == (4, (0.9, 0.99), [True, None])
    assert torch.equal(got["t"], torch.tensor(2.5))


def test_a_sharded_save_refuses_optimizer_state_resume_cannot_load(tmp_path: Path, process_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _ = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.state[model[1].bias]["tag"] = "warm"
    # a collective save: every rank hears of one rank's refusal, as a CheckpointError that quotes it
    with pytest.raises(CheckpointError, match=r"UsageError: Cannot save optimizer state '1\.bias' 'tag'"):
        resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    assert resumer.list_checkpoints(str(tmp_path)) == []


@pytest.mark.parametrize("step", [-1, True, 1.0, "3"])
def test_a_bad_step_is_refused_naming_it_and_nothing_is_written(tmp_path: Path, step: Any) -> None:
    model, opt = _model()
    with pytest.raises(UsageError, match=f"step must be a non-negative int, got {step!r}"):
        resumer.save_checkpoint(str(tmp_path / "ckpts"), step, model, opt)
    assert not os.path.exists(tmp_path / "ckpts")


def test_the_manifest_records_the_world_size_and_a_null_scheduler(tmp_path: Path) -> None:
    model, opt = _model()
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    m = resumer.read_manifest(uri)
    assert m.signature.world_size == 1
    with open(os.path.join(uri, MANIFEST)) as f:
        assert json.load(f)["signature"]["world_size"] == 1
    assert m.raw["world"] == {"world_size": 1, "rank": 0}
    assert m.raw["scheduler"] is None  # no scheduler: null, not an empty or made-up entry
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    m2 = resumer.read_manifest(resumer.save_checkpoint(str(tmp_path), 2, model, opt, sched))
    assert m2.raw["scheduler"]["cls"] == "torch.optim.lr_scheduler.StepLR"


@pytest.mark.parametrize("extra", [["loss", 0.5], "loss=0.5", 0.5])
def test_an_extra_that_is_not_a_dict_is_refused_before_anything_is_committed(tmp_path: Path, extra: Any) -> None:
    """A manifest's ``extra`` is an object: a list or a number there would commit a checkpoint that every reader
    rejects as malformed (skipped by list, quarantined by resume)."""
    model, opt = _model()
    with pytest.raises(UsageError, match="extra must be a dict"):
        resumer.save_checkpoint(str(tmp_path), 1, model, opt, extra=extra)
    with pytest.raises(UsageError, match="extra must be a dict"), resumer.AsyncSaver(str(tmp_path)) as saver:
        saver.save(2, model, opt, extra=extra)
    assert resumer.list_checkpoints(str(tmp_path)) == []
    assert not any(os.path.exists(os.path.join(tmp_path, d, MANIFEST)) for d in os.listdir(tmp_path))


def test_an_unencodable_extra_value_is_refused_naming_where_it_is(tmp_path: Path) -> None:
    model, opt = _model()
    with pytest.raises(ResumerError, match=r"Cannot save extra\.data: a object is not a plain value"):
        resumer.save_checkpoint(str(tmp_path), 1, model, opt, extra={"loss": 0.5, "data": object()})
    assert resumer.list_checkpoints(str(tmp_path)) == []


def test_a_snapshot_of_sharded_state_is_refused_naming_the_collective_save(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model()
    monkeypatch.setattr(sharded, "is_sharded", lambda *_: True)
    with pytest.raises(UsageError, match=r"sharded \(DTensor / FSDP2\): save it with save_checkpoint on every rank"):
        save_mod.snapshot(1, model, opt)
    with pytest.raises(UsageError, match="save_checkpoint on every rank"), resumer.AsyncSaver(str(tmp_path)) as s:
        s.save(1, model, opt)  # the async saver snapshots one process's state: not for sharded state
    assert os.listdir(tmp_path) == []


def test_save_checkpoint_hands_sharded_state_to_the_collective_save(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_save(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "memory://ckpts/step-0000000007"

    monkeypatch.setattr(sharded, "is_sharded", lambda m, o: m is model and o is opt)
    monkeypatch.setattr(sharded_save, "save", fake_save)
    opts = {"anon": True}
    uri = resumer.save_checkpoint(str(tmp_path), 7, model, opt, sched, extra={"loss": 0.25}, storage_options=opts)
    assert uri == "memory://ckpts/step-0000000007"
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == (str(tmp_path), 7, model, opt, sched)
    assert args[2] is model and args[3] is opt and args[4] is sched
    assert kwargs == {"extra": {"loss": 0.25}, "storage_options": opts}
    assert os.listdir(tmp_path) == []  # nothing written by the unsharded path
