"""Lightning ``.ckpt`` files, written by the real ``lightning.Trainer`` (a LightningModule wrapping a tiny
``nn.Sequential``, Adam and StepLR, three steps on CPU, saved by ``ModelCheckpoint``), then detected, inspected,
planned from the CLI and resumed from Python into the plain ``nn.Sequential``.

What is pinned: the LightningModule's attribute prefix is stripped so the plain network resumes under the default
policy; after ``resume`` the weights are bitwise the saved ones, the optimizer state of every parameter (by name:
``optimizer_states[0]`` is keyed by position) and the lr are the saved ones, and so are the scheduler and the step
(``global_step``); the LightningModule itself resumes with ``renames="auto"``; only the first of several
optimizers is resumed, and the plan says so; a ``.ckpt`` that would run code is refused with nothing run and
nothing changed; a truncated one is refused with nothing changed.
"""

from __future__ import annotations

import json
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

L = pytest.importorskip("lightning")

STEPS = 3
LR = 0.01


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def step_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


class Wrapped(L.LightningModule):  # type: ignore[misc]
    """The network under ``self.model``, as a LightningModule usually holds it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = net(seed)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = adam(self)
        return {"optimizer": optimizer, "lr_scheduler": step_lr(optimizer)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The .ckpt ModelCheckpoint writes after three steps of the real Trainer."""
    out = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 2))
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out))])
    trainer.fit(Wrapped(), torch.utils.data.DataLoader(data, batch_size=4))
    (path,) = out.glob("*.ckpt")
    return str(path)


def saved(path: str | Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def fresh() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The plain network, initialised differently from the saved one, with its optimizer and scheduler."""
    model = net(seed=7)
    optimizer = adam(model)
    return model, optimizer, step_lr(optimizer)


def test_detected_and_inspected(checkpoint: str) -> None:
    assert registry.detect(Store.open(checkpoint)) == "lightning"
    info = inspect_checkpoint(checkpoint)
    assert info["format"] == "lightning" and info["step"] == STEPS
    assert info["optimizer"]["class"] == "torch.optim.adam.Adam" and info["optimizer"]["groups"] == 1
    assert info["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert [f["path"] for f in info["files"]] == [Path(checkpoint).name]
    assert info["tensors"] == 4 and info["extra"]["epoch"] == 0
    assert any("stripped the LightningModule's attribute prefix 'model.'" in n for n in info["notes"])


def test_cli_plan_exit_0(checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lt_factories.py").write_text(textwrap.dedent(f"""
        from {__name__} import net, adam, step_lr
    """))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["plan", checkpoint, "--model", "lt_factories:net", "--optimizer",
                                 "lt_factories:adam", "--scheduler", "lt_factories:step_lr", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ok"] and "a Lightning checkpoint (.ckpt written by lightning.Trainer)" in plan["notes"]


def assert_optimizer_is(saved_opt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The live state of every parameter is the saved state at its position in the CURRENT optimizer's order."""
    order = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(saved_opt["state"]) == len(order) == len(list(model.parameters()))
    for i, param in enumerate(order):
        live = optimizer.state[param]
        assert set(live) == set(saved_opt["state"][i])
        for key, value in saved_opt["state"][i].items():
            assert torch.equal(live[key], value), (i, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved_opt["param_groups"]]


def test_resume_is_exact(checkpoint: str) -> None:
    ckpt = saved(checkpoint)
    model, optimizer, scheduler = fresh()
    result = resumer.resume(checkpoint, model, optimizer, scheduler)
    assert result.step == ckpt["global_step"] == STEPS
    state = model.state_dict()
    assert set(state) == {name.removeprefix("model.") for name in ckpt["state_dict"]}
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(state[name.removeprefix("model.")], value), name
    assert_optimizer_is(ckpt["optimizer_states"][0], model, optimizer)
    assert optimizer.param_groups[0]["lr"] == LR * 0.5  # StepLR stepped once: the saved lr, not the fresh one
    assert scheduler.state_dict() == ckpt["lr_schedulers"][0]


def test_the_lightning_module_itself_resumes_with_auto_renames(checkpoint: str) -> None:
    ckpt = saved(checkpoint)
    module = Wrapped(seed=7)
    optimizer = adam(module)
    resumer.resume(checkpoint, module, optimizer, step_lr(optimizer), renames="auto")
    state = module.state_dict()
    assert all(torch.equal(state[name], value) for name, value in ckpt["state_dict"].items())
    assert_optimizer_is(ckpt["optimizer_states"][0], module, optimizer)


def test_only_the_first_of_several_optimizers_is_resumed(checkpoint: str, tmp_path: Path) -> None:
    ckpt = saved(checkpoint)
    second = {"state": {}, "param_groups": [{**ckpt["optimizer_states"][0]["param_groups"][0], "lr": 1.0}]}
    ckpt["optimizer_states"].append(second)
    ckpt["lr_schedulers"].append(dict(ckpt["lr_schedulers"][0], base_lrs=[1.0]))
    torch.save(ckpt, tmp_path / "two.ckpt")
    model, optimizer, scheduler = fresh()
    plan = resumer.plan(str(tmp_path / "two.ckpt"), model, optimizer, scheduler)
    assert "2 optimizers saved: only the first (optimizer_states[0]) is resumed, the other 1 are not" in plan.notes
    resumer.resume(str(tmp_path / "two.ckpt"), model, optimizer, scheduler)
    assert_optimizer_is(ckpt["optimizer_states"][0], model, optimizer)
    assert scheduler.state_dict() == ckpt["lr_schedulers"][0]


def test_only_a_ckpt_name_is_tried_and_one_without_lightning_keys_is_a_torch_save_file(checkpoint: str,
                                                                                      tmp_path: Path) -> None:
    (tmp_path / "renamed.pt").write_bytes(Path(checkpoint).read_bytes())
    assert registry.detect(Store.open(str(tmp_path / "renamed.pt"))) == "torch-save"
    torch.save({"model_state_dict": net().state_dict()}, tmp_path / "plain.ckpt")
    source = registry.open(Store.open(str(tmp_path / "plain.ckpt")))
    assert source.format == "torch-save"
    source.close()


@pytest.mark.parametrize("where", ["hyper_parameters", "whole file"])
def test_code_in_a_ckpt_is_refused(checkpoint: str, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "epoch=0-step=3.ckpt"
    if where == "whole file":
        torch.save(Payload(str(marker)), evil)
    else:
        ckpt = saved(checkpoint)
        torch.save({**ckpt, "hyper_parameters": {"seed": Payload(str(marker))}}, evil)
    assert registry.detect(Store.open(str(evil))) == "lightning"
    model, optimizer, scheduler = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling.*save_hyperparameters"):
        resumer.resume(str(evil), model, optimizer, scheduler)
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state


def test_a_truncated_ckpt_is_refused(checkpoint: str, tmp_path: Path) -> None:
    data = Path(checkpoint).read_bytes()
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    model, optimizer, scheduler = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a readable torch.save file"):
        resumer.resume(str(cut), model, optimizer, scheduler)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state
