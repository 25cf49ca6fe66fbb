"""Accelerate ``save_state`` directories, written by the real ``Accelerator`` (a tiny model, three steps on CPU),
then detected, inspected, planned from the CLI and resumed from Python.

What is pinned: after ``resume`` the weights are bitwise the saved ones, the optimizer state of every parameter
(by name: the saved file is keyed by position), each group's lr, the scheduler, the step and the RNG are the saved
ones; a pickle that would run code in any file of the layout is refused with nothing run and nothing changed.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import resumer
from resumer.cli.main import cli
from resumer.core.errors import CheckpointError
from resumer.formats import registry
from resumer.runtime.inspect import inspect_checkpoint
from resumer.storage.store import Store
from resumer.testing.hostile import Payload

accelerate = pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS = 3


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Decay / no-decay groups, as most training scripts build them."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2)


def step_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The directory Accelerator.save_state writes after three steps."""
    out = tmp_path_factory.mktemp("accelerate") / "state"
    accelerator = accelerate.Accelerator(cpu=True)
    model = net()
    optimizer = adamw(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, step_lr(optimizer))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(STEPS):
        with accelerator.accumulate(model):
            accelerator.backward(model(x).pow(2).mean())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    accelerator.save_state(str(out))
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(os.listdir(out))
    return str(out)


def fresh() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = adamw(model)
    return model, optimizer, step_lr(optimizer)


def test_detected_and_inspected(checkpoint: str) -> None:
    assert registry.detect(Store.open(checkpoint)) == "accelerate"
    info = inspect_checkpoint(checkpoint)
    assert info["format"] == "accelerate" and info["kind"] == "accelerate" and info["step"] == STEPS
    assert info["optimizer"]["class"] == "torch.optim.adamw.AdamW" and info["optimizer"]["groups"] == 2
    assert info["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert info["rng"] == ["torch", "numpy", "python"]
    assert "model.safetensors" in [f["path"] for f in info["files"]]


def test_cli_plan_exit_0(checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acc_factories.py").write_text(textwrap.dedent(f"""
        from {__name__} import net, adamw, step_lr
    """))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["plan", checkpoint, "--model", "acc_factories:net", "--optimizer",
                                 "acc_factories:adamw", "--scheduler", "acc_factories:step_lr", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ok"] and "an Accelerate save_state directory" in plan["notes"]


def test_resume_is_exact(checkpoint: str) -> None:
    model, optimizer, scheduler = fresh()
    torch.manual_seed(123)
    result = resumer.resume(checkpoint, model, optimizer, scheduler)
    assert result.step == STEPS
    weights = safetensors_torch.load_file(str(Path(checkpoint) / "model.safetensors"))
    state = model.state_dict()
    assert set(weights) == set(state)
    for name, saved in weights.items():
        assert torch.equal(state[name], saved), name
    saved_opt = torch.load(Path(checkpoint) / "optimizer.bin", weights_only=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = dict(model.named_parameters())
    for i, name in enumerate(order):  # position i of the saved file is the i-th parameter of this order
        live = optimizer.state[by_name[name]]
        assert set(live) == set(saved_opt["state"][i])
        for key, value in saved_opt["state"][i].items():
            assert torch.equal(live[key], value), (name, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved_opt["param_groups"]] == [5e-3] * 2
    assert scheduler.state_dict() == torch.load(Path(checkpoint) / "scheduler.bin", weights_only=True)
    states = torch.load(Path(checkpoint) / "random_states_0.pkl", weights_only=False)  # written by this test
    assert torch.equal(torch.get_rng_state(), states["torch_manual_seed"])


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_code_in_a_pickle_is_refused(checkpoint: str, tmp_path: Path, name: str) -> None:
    target = tmp_path / "state"
    shutil.copytree(checkpoint, target)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "state": {}, "param_groups": [], "payload": Payload(str(marker))}, target / name)
    model, optimizer, scheduler = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling"):
        resumer.resume(str(target), model, optimizer, scheduler)
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state
