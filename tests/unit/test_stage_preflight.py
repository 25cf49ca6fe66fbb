"""Staging checks a plan against the live objects it goes into (defence in depth): a plan made for one model,
staged with another, or a saved scheduler state that does not load into the live scheduler, is a
CheckpointMismatch that names the checkpoint, raised before anything is read into the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.core.errors import CheckpointError, CheckpointMismatch
from resumer.runtime import sharded
from resumer.runtime.apply import commit, stage


def _named(first: nn.Module, last: nn.Module) -> nn.Module:
    m = nn.Sequential()
    m.add_module("b", first)
    m.add_module("c", last)
    return m


def _saved(tmp_path: Path) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    model = _named(nn.Linear(3, 4), nn.Linear(4, 2))
    root = str(tmp_path / "ckpts")
    resumer.save_checkpoint(root, 1, model)
    return root, model


def test_a_plan_staged_against_another_model_shape_is_a_mismatch(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    # 'b' changed shape (kept fresh under --policy partial, so its entries copy nothing); 'c' loads.
    plan = resumer.plan(root, _named(nn.Linear(3, 5), nn.Linear(4, 2)), policy="partial")
    assert plan.ok and not plan.entry(resumer.Section.MODEL, "b.weight").copies
    other = _named(nn.Linear(3, 5), nn.Linear(4, 3))  # 'c.weight' is [3, 4] here, [2, 4] saved
    source = resumer.open_source(root)
    with pytest.raises(CheckpointMismatch) as info:
        stage(plan, source, model=other)
    assert info.value.uri == source.uri
    assert "'c.weight' has shape [2, 4] in the checkpoint, the model [3, 4]" in str(info.value)


class _Strict:
    """A scheduler whose ``load_state_dict`` refuses a negative count, as real schedulers refuse bad state."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] < 0:
            raise ValueError("a negative count")
        self.n = state["n"]


def _with_scheduler(tmp_path: Path) -> tuple[str, nn.Module, torch.optim.Optimizer, _Strict]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = _Strict(opt)
    root = str(tmp_path / "ckpts")
    resumer.save_checkpoint(root, 1, model, opt, sched)
    return root, model, opt, sched


@pytest.mark.parametrize("saved", [[1, 2], {"n": -1}], ids=["not-a-dict", "does-not-load"])
def test_a_saved_scheduler_state_the_live_scheduler_cannot_take_is_a_mismatch(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                saved: Any) -> None:
    root, model, opt, sched = _with_scheduler(tmp_path)
    plan = resumer.plan(root, model, opt, sched)
    assert plan.ok
    source = resumer.open_source(root)
    monkeypatch.setattr(source, "scheduler_state", lambda: saved)
    with pytest.raises(CheckpointMismatch) as info:
        stage(plan, source, opt, model=model, scheduler=sched)
    assert info.value.uri == source.uri
    assert sched.n == 0
    if isinstance(saved, dict):
        assert "does not load into this _Strict (ValueError: a negative count)" in str(info.value)


def test_commit_logs_the_plan_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, model = _saved(tmp_path)
    live = _named(nn.Linear(3, 4), nn.Linear(4, 2))
    plan = resumer.plan(root, live)
    source = resumer.open_source(root)
    staged = stage(plan, source, model=live)
    with caplog.at_level(logging.INFO, logger="resumer"):
        result = commit(staged, live)
    assert torch.equal(live.c.weight, model.c.weight)
    assert result.checkpoint == source.uri
    assert plan.summary() in [r.getMessage() for r in caplog.records]
    assert plan.summary().endswith(", no optimizer: ok")  # a model-only plan says so


def test_a_ddp_model_stages_through_the_agreement_of_every_rank(tmp_path: Path, process_group: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # One process stands for the group: the gathers run on the real (one-rank) process group.
    monkeypatch.setattr(sharded, "collective", lambda: True)
    root, model = _saved(tmp_path)
    ddp = nn.parallel.DistributedDataParallel(_named(nn.Linear(3, 4), nn.Linear(4, 2)))
    plan = resumer.plan(root, ddp)
    staged = stage(plan, resumer.open_source(root), model=ddp)  # no optimizer: the model alone is distributed
    commit(staged, ddp)
    assert torch.equal(ddp.module.b.weight, model.b.weight)
    # A rank's own refusal is every rank's: the agreed CheckpointError, not this rank's exception as it was.
    with pytest.raises(CheckpointError) as info:
        stage(plan, resumer.open_source(root), model=ddp, refused=ValueError("the plan differs"))
    assert "the plan differs (found by rank 0 of 1; every rank refused" in str(info.value)


def test_an_fsdp2_model_and_its_optimizer_resume_on_a_one_rank_group(tmp_path: Path, process_group: None) -> None:
    """The sharded paths of stage (this rank's regions) and commit (DTensors laid out like the live ones), on
    one CPU rank; the multi-rank cases are tests/integration's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    model = _named(nn.Linear(3, 4), nn.Linear(4, 2))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    root = str(tmp_path / "ckpts")
    resumer.save_checkpoint(root, 1, model, opt)

    live = _named(nn.Linear(3, 4), nn.Linear(4, 2))
    fully_shard(live, mesh=mesh)
    live_opt = torch.optim.Adam(live.parameters(), lr=0.5)
    plan = resumer.plan(root, live, live_opt)
    staged = stage(plan, resumer.open_source(root), live_opt, model=live)
    commit(staged, live, live_opt)
    for name in ("b", "c"):
        saved, got = getattr(model, name).weight, getattr(live, name).weight
        assert torch.equal(got.full_tensor(), saved.full_tensor())
        assert torch.equal(live_opt.state[got]["exp_avg"].full_tensor(), opt.state[saved]["exp_avg"].full_tensor())
    assert live_opt.param_groups[0]["lr"] == 0.01
