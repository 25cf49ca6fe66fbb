"""``torch.distributed.checkpoint`` directories, written by the real ``torch.distributed.checkpoint.save`` (one
process, no process group) from ``get_state_dict``, then detected, inspected, planned from the CLI and resumed.

What is pinned: after ``resume`` the weights are bitwise the saved ones, and so are the optimizer state of every
parameter by name, each group's lr, the scheduler and the step, in both layouts (``{"model", "optim"}`` nested as
``get_state_dict`` returns it, and torchtitan's: model tensors at the top level, the optimizer flattened per
parameter, the step in ``train_state``); a checkpoint two FSDP2 ranks saved (each parameter in two chunks, in two
data files) resumes into one plain model bitwise as the state gathered whole; a ``.metadata`` that would run code
when unpickled, a truncated data file and an index that lies about an item are refused with nothing run and nothing
changed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import resumer
from resumer.cli.main import cli
from resumer.core.errors import CheckpointError
from resumer.formats import registry
from resumer.runtime.inspect import inspect_checkpoint
from resumer.storage.store import Store
from resumer.testing.hostile import Payload

STEPS = 3
LAYOUTS = ("get_state_dict", "torchtitan")
# The CLI's factories: the same model and two-group Adam as model_of / optimizer_of below.
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


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def new_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def make_run(seed: int = 0, model: nn.Module | None = None) -> Run:
    model = new_model(seed) if model is None else model
    # Two groups with their own lr: a checkpoint's per-group hyperparameters must land in the right group.
    optimizer = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2},
                                  {"params": [*model[1].parameters(), *model[3].parameters()], "lr": 3e-3}])
    return Run(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5))


def train(run: Run) -> Run:
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        loss = (run.model(torch.randn(16, 4, generator=gen)) - torch.randn(16, 3, generator=gen)).pow(2).mean()
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
    return run


def write(directory: Path, layout: str) -> Run:
    """A few steps of training, saved with torch.distributed.checkpoint.save in ``layout``."""
    run = train(make_run(seed=0))
    if layout == "get_state_dict":
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "lr_scheduler": run.scheduler.state_dict(), "step": STEPS}
    else:  # torchtitan: model tensors at the top level, the optimizer flattened, the step a tensor in train_state
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer,
                                            options=StateDictOptions(flatten_optimizer_state_dict=True))
        state = {**model_sd, "optimizer": optim_sd, "lr_scheduler": run.scheduler.state_dict(),
                 "train_state": {"step": torch.tensor(STEPS, dtype=torch.int32)}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(state, checkpoint_id=str(directory))
    return run


@pytest.fixture(scope="module", params=LAYOUTS)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Run]:
    directory = tmp_path_factory.mktemp(f"dcp-{request.param}") / f"step-{STEPS}"
    return str(directory), write(directory, request.param)


@pytest.fixture
def copy_of(saved: tuple[str, Run], tmp_path: Path) -> Path:
    """A copy of the saved directory that a test may damage."""
    target = tmp_path / f"step-{STEPS}"
    shutil.copytree(saved[0], target)
    return target


def by_key(uri: str) -> set[str]:
    """The top-level keys of a saved DCP checkpoint (read with torch's own reader: the test wrote it)."""
    return {key.split(".", 1)[0] for key in dcp.FileSystemReader(uri).read_metadata().state_dict_metadata}


def by_name(run: Run) -> dict[str, dict[str, Any]]:
    """The live optimizer state keyed by parameter name."""
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(p)]: st for p, st in run.optimizer.state.items()}


def test_a_dcp_directory_is_detected_by_its_listing_and_inspected(saved: tuple[str, Run]) -> None:
    uri, run = saved
    assert sorted(os.listdir(uri)) == [".metadata", "__0_0.distcp"]
    assert registry.detect(Store.open(uri)) == "torch-dcp"
    info = inspect_checkpoint(uri)
    assert info["format"] == "torch-dcp"
    assert info["kind"] == "torch.distributed.checkpoint"
    assert info["step"] == STEPS
    assert info["tensors"] == len(run.model.state_dict())
    assert info["optimizer"]["class"] == "torch.optim.adam.Adam"
    assert info["optimizer"]["groups"] == 2
    assert info["optimizer"]["params_with_state"] == len(list(run.model.parameters()))
    assert info["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert [f["path"] for f in info["files"]] == ["__0_0.distcp"]


def test_plan_from_the_cli_exits_0(saved: tuple[str, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = saved
    (tmp_path / "dcp_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plan", uri, "--model", "dcp_factories:model", "--optimizer",
                                      "dcp_factories:optimizer", "--scheduler", "dcp_factories:scheduler"])
    assert result.exit_code == 0, result.output
    assert "torch.distributed.checkpoint (DCP) directory" in result.output
    assert "keyed by parameter name" in result.output or "flattened per parameter" in result.output


def test_resume_restores_weights_optimizer_by_name_lr_scheduler_and_step(saved: tuple[str, Run]) -> None:
    uri, trained = saved
    fresh = make_run(seed=9)
    plan = resumer.plan(uri, fresh.model, fresh.optimizer, fresh.scheduler)
    assert plan.ok, plan.refusals
    notes = plan.to_dict()["notes"]
    assert any(n.startswith("a torch.distributed.checkpoint (DCP) directory") for n in notes), notes
    assert any(n.startswith("optimizer state under ") and "carried by name" in n for n in notes), notes
    assert f"the step is the saved {'step' if 'optim' in by_key(uri) else 'train_state.step'!r}" in notes, notes
    res = resumer.resume(uri, fresh.model, fresh.optimizer, fresh.scheduler)
    assert res.step == STEPS
    for name, value in trained.model.state_dict().items():
        got = fresh.model.state_dict()[name]
        assert got.dtype == value.dtype and torch.equal(got, value), name
    want, got_state = by_name(trained), by_name(fresh)
    assert sorted(got_state) == sorted(want) == sorted(n for n, _ in trained.model.named_parameters())
    for name, state in want.items():
        assert sorted(got_state[name]) == sorted(state), name
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got_state[name][key]), torch.as_tensor(value)), (name, key)
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in trained.optimizer.param_groups]
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [5e-3, 1.5e-3]  # halved once by StepLR
    assert fresh.scheduler.state_dict() == trained.scheduler.state_dict()


@pytest.mark.parametrize("where", ["whole", "inside"])
def test_a_metadata_pickle_that_would_run_code_is_refused_with_nothing_run(
        copy_of: Path, tmp_path: Path, where: str, snapshot: Any, assert_unchanged: Any) -> None:
    marker = tmp_path / "MARKER"
    if where == "whole":
        evil = pickle.dumps(Payload(marker))
    else:  # genuine metadata, with a payload where DCP keeps plain data
        with open(copy_of / ".metadata", "rb") as f:
            md = pickle.load(f)  # noqa: S301 - written by this test
        md.planner_data = {**md.planner_data, "hook": Payload(marker)}
        evil = pickle.dumps(md)
    (copy_of / ".metadata").write_bytes(evil)
    assert registry.detect(Store.open(str(copy_of))) == "torch-dcp"  # detection reads no pickle
    fresh = make_run(seed=9)
    before = snapshot(fresh)
    for call in (lambda: resumer.resume(str(copy_of), fresh.model, fresh.optimizer, fresh.scheduler),
                 lambda: resumer.plan(str(copy_of), fresh.model, fresh.optimizer),
                 lambda: inspect_checkpoint(str(copy_of))):
        with pytest.raises(CheckpointError, match=r"only DCP's metadata types allowed and never runs code"):
            call()
    assert not marker.exists(), "unpickling .metadata ran the payload"
    assert_unchanged(fresh, before)


def test_a_metadata_pickle_cannot_change_torchs_classes(copy_of: Path) -> None:
    """Pickle's BUILD sets attributes on whatever it is handed, a class included: here DCP's own Metadata class."""
    tamper = (b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\n"  # the class itself, as a global
              b"N}\x8c\x0bresumer_pwnK\x01s\x86b.")  # BUILD with (None, {"resumer_pwn": 1}): setattr on it
    (copy_of / ".metadata").write_bytes(tamper)
    with pytest.raises(CheckpointError, match=r"it holds a type, not DCP's Metadata"):
        inspect_checkpoint(str(copy_of))
    assert not hasattr(dcp.metadata.Metadata, "resumer_pwn"), "reading .metadata changed torch's Metadata class"


def test_a_truncated_data_file_is_refused_with_nothing_changed(copy_of: Path, snapshot: Any,
                                                               assert_unchanged: Any) -> None:
    data = copy_of / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    fresh = make_run(seed=9)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is \d+ bytes, but the metadata puts .* the file is "
                                              r"truncated or the metadata lies\. Nothing was loaded"):
        resumer.resume(str(copy_of), fresh.model, fresh.optimizer, fresh.scheduler)
    assert_unchanged(fresh, before)


def test_a_hyperparameter_no_checkpoint_holds_refuses_that_checkpoint_and_a_root_falls_back(
        saved: tuple[str, Run], tmp_path: Path, snapshot: Any, assert_unchanged: Any) -> None:
    # A tensor of 5,000 elements in a param group (a hyperparameter holds at most 4,096), saved by dcp.save
    # itself: the checkpoint is bad (a CheckpointError naming it), not the caller's input, so a folder of
    # checkpoints passes over it to the older one.
    root = tmp_path / "checkpoint"
    shutil.copytree(saved[0], root / f"step-{STEPS}")
    run = make_run(seed=0)
    run.optimizer.param_groups[0]["mask"] = torch.zeros(5000)
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd, "lr_scheduler": run.scheduler.state_dict(), "step": STEPS + 2},
                 checkpoint_id=str(root / "step-5"))
    fresh = make_run(seed=9)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="optimizer hyperparameter") as caught:
        resumer.resume(str(root / "step-5"), fresh.model, fresh.optimizer, fresh.scheduler)
    assert caught.value.uri.endswith("step-5")
    assert_unchanged(fresh, before)
    result = resumer.resume(str(root), fresh.model, fresh.optimizer, fresh.scheduler)
    assert result.step == STEPS and result.checkpoint.endswith(f"step-{STEPS}")


def test_an_index_that_lies_about_an_item_is_refused_with_nothing_changed(copy_of: Path, snapshot: Any,
                                                                          assert_unchanged: Any) -> None:
    """Two items of different shapes swap places in the storage index: each range is a valid torch.save blob
    inside the file, but not the tensor the metadata promises."""
    with open(copy_of / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 - written by this test
    keys = {k.fqn: k for k in md.storage_data}
    weight = next(k for k in keys if k.endswith("0.weight") and "exp_avg" not in k and "state" not in k)
    bias = next(k for k in keys if k.endswith("3.bias") and "exp_avg" not in k and "state" not in k)
    md.storage_data[keys[weight]], md.storage_data[keys[bias]] = (md.storage_data[keys[bias]],
                                                                  md.storage_data[keys[weight]])
    (copy_of / ".metadata").write_bytes(pickle.dumps(md))
    fresh = make_run(seed=9)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"is not the float32 tensor of shape \[\d+(, \d+)?\] the metadata "
                                              "promises"):
        resumer.resume(str(copy_of), fresh.model, fresh.optimizer, fresh.scheduler)
    assert_unchanged(fresh, before)


def _write_two_ranks(rank: int, directory: str, port: int) -> None:
    """One rank of a two-process FSDP2 run (gloo, CPU) that saves with dcp.save, as torchtitan does."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = new_model(seed=0)
        fully_shard(model)  # the optimizer is made after: it holds the sharded parameters
        run = train(make_run(model=model))
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "lr_scheduler": run.scheduler.state_dict(), "step": STEPS},
                 checkpoint_id=directory)
        full = get_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True))
        if rank == 0:  # the reference: the same state gathered whole
            torch.save(full, os.path.join(os.path.dirname(directory), "reference.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    from sharded_workers import finish

    finish()


def test_a_checkpoint_saved_by_two_ranks_resumes_into_one_plain_model(tmp_path: Path) -> None:
    """FSDP2 shards each parameter across the ranks: its chunks, in two data files, are put back together."""
    import socket

    from sharded_workers import start_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path / f"step-{STEPS}"
    start_ranks(_write_two_ranks, (str(directory), port), 2)
    assert sorted(os.listdir(directory)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    chunks = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata["model.0.weight"].chunks
    assert [list(c.offsets) for c in chunks] == [[0, 0], [4, 0]]  # one half per rank
    model_sd, optim_sd = torch.load(tmp_path / "reference.pt", weights_only=True)
    fresh = make_run(seed=9)
    res = resumer.resume(str(directory), fresh.model, fresh.optimizer, fresh.scheduler)
    assert res.step == STEPS
    for name, value in model_sd.items():
        assert torch.equal(fresh.model.state_dict()[name], value), name
    got = by_name(fresh)
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got[name][key]), torch.as_tensor(value)), (name, key)
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in optim_sd["param_groups"]]
