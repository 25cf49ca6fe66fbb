"""Folders of other tools' checkpoints used as a root: a Hugging Face Trainer ``output_dir`` (``checkpoint-N/``,
written by the real ``transformers.Trainer`` with ``save_steps``) and a torchtitan-style ``checkpoint/`` folder
(``step-N/`` directories written by ``torch.distributed.checkpoint.save``).

What is pinned: the newest checkpoint (told by the number in its name, not its text) is resumed bitwise (weights,
optimizer state by name, lr, scheduler, step); when the newest cannot be read (a truncated model file found while
opening it, or a data item found wrong while reading it during ``resume``) the older one is resumed instead, the plan
says which was passed over and why, and nothing in the folder is marked, deleted or changed; a folder where nothing
reads is refused listing each directory and why; a folder mixing two tools' checkpoints, or a torch DCP ``step-N``
newer than resumer's own, is refused with what to pass; ``resumer plan`` on the folder exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from tiny_trainer import Tokens, arguments, gpt2
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import resumer
from resumer.cli.main import cli
from resumer.core.errors import CheckpointError
from resumer.runtime.inspect import inspect_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

HF_STEPS = 10  # checkpoint-10 sorts before checkpoint-5 as text: the newest is told by number
SAVE_EVERY = 5
TITAN_OLD, TITAN_NEW = 5, 10  # the same for step-5 and step-10


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: what must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def chosen_note(plan: Any) -> str:
    return next(n for n in plan.notes if n.startswith("chosen from the folder"))


# --- Hugging Face Trainer output_dir -----------------------------------------------------------------------


def trainer_args(output_dir: str) -> Any:
    return arguments(output_dir, steps=HF_STEPS, save_every=SAVE_EVERY)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output_dir holding checkpoint-5/ and checkpoint-10/, as the real Trainer writes them."""
    out = tmp_path_factory.mktemp("hf-out")
    transformers.Trainer(model=gpt2(), args=trainer_args(str(out)), train_dataset=Tokens()).train()
    assert {f"checkpoint-{SAVE_EVERY}", f"checkpoint-{HF_STEPS}"} <= set(os.listdir(out))
    return out


def assert_hf_resumed(root: Path, checkpoint: Path, tmp_path: Path) -> Any:
    """Resume a fresh GPT-2 with the optimizer and scheduler Trainer builds from ``root``: it is ``checkpoint``."""
    model = gpt2(seed=7)
    trainer = transformers.Trainer(model=model, args=trainer_args(str(tmp_path / "fresh")))
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=HF_STEPS, optimizer=optimizer)
    result = resumer.resume(str(root), model, optimizer, scheduler)
    assert result.plan.checkpoint == str(checkpoint)
    assert result.step == int(checkpoint.name.split("-")[1])
    state = model.state_dict()
    for name, saved in safetensors_torch.load_file(str(checkpoint / "model.safetensors")).items():
        assert torch.equal(state[name], saved), name
    saved_opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(model.named_parameters())
    order = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    for i, name in enumerate(order):
        for key, value in saved_opt["state"][i].items():
            assert torch.equal(optimizer.state[by_name[name]][key], value), (name, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved_opt["param_groups"]]
    assert scheduler.state_dict() == torch.load(checkpoint / "scheduler.pt", weights_only=True)
    return result


def test_an_output_dir_resumes_its_newest_checkpoint(output_dir: Path, tmp_path: Path) -> None:
    newest = output_dir / f"checkpoint-{HF_STEPS}"
    result = assert_hf_resumed(output_dir, newest, tmp_path)
    assert chosen_note(result.plan).startswith(f"chosen from the folder {output_dir}: checkpoint-{HF_STEPS} "
                                               "(hf-trainer), the newest of its 2 checkpoint-N directories")
    info = inspect_checkpoint(str(output_dir))
    assert info["checkpoint"] == str(newest) and info["format"] == "hf-trainer" and info["step"] == HF_STEPS


def test_a_damaged_newest_checkpoint_falls_back_with_nothing_changed(output_dir: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(output_dir, out)
    weights = out / f"checkpoint-{HF_STEPS}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    before = tree(out)
    with caplog.at_level(logging.WARNING, logger="resumer"):
        result = assert_hf_resumed(out, out / f"checkpoint-{SAVE_EVERY}", tmp_path)
    note = chosen_note(result.plan)
    assert f"passed over (not marked, not deleted): checkpoint-{HF_STEPS}: " in note and "model.safetensors" in note
    assert f"[select] passed over {out / f'checkpoint-{HF_STEPS}'}" in caplog.text
    assert tree(out) == before  # not marked, not deleted, not rewritten: these checkpoints are the Trainer's


def test_a_folder_where_nothing_reads_is_refused_listing_each(output_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(output_dir, out)
    for step in (SAVE_EVERY, HF_STEPS):
        weights = out / f"checkpoint-{step}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    before = tree(out)
    model = gpt2(seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        resumer.resume(str(out), model)
    message = str(info.value)
    assert message.startswith(f"Cannot resume from {out}: none of its 2 checkpoint-N directories (Hugging Face "
                              f"Trainer's) could be read (checkpoint-{HF_STEPS}: ")
    assert f"; checkpoint-{SAVE_EVERY}: " in message and "Nothing was loaded, marked or deleted." in message
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert tree(out) == before


def test_cli_plan_of_an_output_dir_exits_0(output_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["plan", str(output_dir), "--model", f"{__name__}:gpt2", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ok"] and plan["checkpoint"] == str(output_dir / f"checkpoint-{HF_STEPS}")


# --- torchtitan's checkpoint/ folder of step-N DCP directories ---------------------------------------------


FACTORIES = """
import torch
from torch import nn

def model():
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

def optimizer(model):
    return torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2},
                             {"params": [*model[1].parameters(), *model[3].parameters()], "lr": 3e-3}])

def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
"""


def new_run(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2},
                                  {"params": [*model[1].parameters(), *model[3].parameters()], "lr": 3e-3}])
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": {names[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                          for p, st in optimizer.state.items()},
            "lr": [g["lr"] for g in optimizer.param_groups], "scheduler": scheduler.state_dict()}


@pytest.fixture(scope="module")
def titan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """checkpoint/step-5 and checkpoint/step-10 saved as torchtitan does (model at the top level, the optimizer
    flattened, the step in train_state), with the state each holds."""
    folder = tmp_path_factory.mktemp("titan") / "checkpoint"
    model, optimizer, scheduler = new_run(0)
    gen = torch.Generator().manual_seed(1)
    states: dict[int, dict[str, Any]] = {}
    for step in range(1, TITAN_NEW + 1):
        loss = (model(torch.randn(16, 4, generator=gen)) - torch.randn(16, 3, generator=gen)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step not in (TITAN_OLD, TITAN_NEW):
            continue
        model_sd, optim_sd = get_state_dict(model, optimizer,
                                            options=StateDictOptions(flatten_optimizer_state_dict=True))
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save({**model_sd, "optimizer": optim_sd, "lr_scheduler": scheduler.state_dict(),
                      "train_state": {"step": torch.tensor(step, dtype=torch.int32)}},
                     checkpoint_id=str(folder / f"step-{step}"))
        states[step] = state_of(model, optimizer, scheduler)
    return folder, states


def assert_titan_resumed(folder: Path, expected: dict[str, Any], step: int) -> Any:
    model, optimizer, scheduler = new_run(9)
    result = resumer.resume(str(folder), model, optimizer, scheduler)
    assert result.step == step and result.plan.checkpoint == str(folder / f"step-{step}")
    got = state_of(model, optimizer, scheduler)
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert set(got["optimizer"]) == set(expected["optimizer"])
    for name, st in expected["optimizer"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(got["optimizer"][name][key]), torch.as_tensor(value)), (name, key)
    assert got["lr"] == expected["lr"] and got["scheduler"] == expected["scheduler"]
    return result


def test_a_torchtitan_folder_resumes_its_newest_step(titan: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    folder, states = titan
    result = assert_titan_resumed(folder, states[TITAN_NEW], TITAN_NEW)
    assert chosen_note(result.plan).startswith(f"chosen from the folder {folder}: step-{TITAN_NEW} (torch-dcp)")


def test_an_item_found_wrong_while_resuming_falls_back_with_nothing_marked(
        titan: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    """The newest step's index swaps two items: it opens (plans) fine and fails only while its tensors are read,
    inside resume; the older step is resumed, and the newest is not quarantined (it is torchtitan's)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(titan[0], folder)
    newest = folder / f"step-{TITAN_NEW}"
    with open(newest / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 - written by this test
    keys = {k.fqn: k for k in md.storage_data}
    weight = next(k for k in keys if k.endswith("0.weight") and "exp_avg" not in k and "state" not in k)
    bias = next(k for k in keys if k.endswith("3.bias") and "exp_avg" not in k and "state" not in k)
    md.storage_data[keys[weight]], md.storage_data[keys[bias]] = (md.storage_data[keys[bias]],
                                                                  md.storage_data[keys[weight]])
    (newest / ".metadata").write_bytes(pickle.dumps(md))
    before = tree(folder)
    model, optimizer, scheduler = new_run(9)
    assert resumer.plan(str(folder), model, optimizer, scheduler).checkpoint == str(newest)
    result = assert_titan_resumed(folder, titan[1][TITAN_OLD], TITAN_OLD)
    assert f"passed over (not marked, not deleted): step-{TITAN_NEW}: " in chosen_note(result.plan)
    assert "the metadata promises" in chosen_note(result.plan)
    assert tree(folder) == before


def test_cli_plan_of_a_torchtitan_folder_exits_0(titan: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "titan_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(cli, ["plan", str(titan[0]), "--model", "titan_factories:model", "--optimizer",
                                 "titan_factories:optimizer", "--scheduler", "titan_factories:scheduler"])
    assert r.exit_code == 0, r.output
    assert f"step-{TITAN_NEW}" in r.output


# --- folders that mix ----------------------------------------------------------------------------------------


def test_a_folder_mixing_two_tools_is_refused(output_dir: Path, titan: tuple[Path, dict[int, dict[str, Any]]],
                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(output_dir, out)
    shutil.copytree(titan[0] / f"step-{TITAN_NEW}", out / f"step-{TITAN_NEW}")
    before = tree(out)
    with pytest.raises(CheckpointError, match=r"it holds checkpoint-N directories \(Hugging Face Trainer's\) and "
                                              r"step-N directories \(resumer's or torchtitan's\), and which is "
                                              r"newer cannot be told .* Pass the one checkpoint directory"):
        resumer.plan(str(out), gpt2())
    assert tree(out) == before


def test_a_dcp_step_newer_than_resumers_own_is_refused(titan: tuple[Path, dict[int, dict[str, Any]]],
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    shutil.copytree(titan[0], folder)
    model, optimizer, scheduler = new_run(0)
    resumer.save_checkpoint(str(folder), 1, model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match=r"holds resumer checkpoints \(the newest readable is step 1\) and a "
                                              rf"newer torch-dcp checkpoint \(step-{TITAN_NEW}\)"):
        resumer.resume(str(folder), *new_run(9))
