"""Ray Train checkpoint directories, written by a real ``ray.train.torch.TorchTrainer`` run (one CPU worker, a tiny
model, two reported checkpoints each holding one ``torch.save`` dict), then detected, inspected, planned from the
CLI and resumed, from a ``checkpoint_*`` directory and from the run directory as a root.

What is pinned: after ``resume`` the weights, the optimizer state of every parameter (by name: the file keys it by
position), the lr, the scheduler and the step are the saved ones, bitwise; the run directory resumes its newest
checkpoint, and falls back to the older one when the newest is damaged, with nothing marked, deleted or changed in
the folder; a directory with two torch.save files, or none, is refused with the files listed and what to pass; a
checkpoint file that would run code is refused with nothing run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import textwrap
import uuid
from collections.abc import Iterator
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

pytestmark = pytest.mark.slow


REPORTS = 2
FACTORIES = """
import torch
from torch import nn

def model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)

def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
"""


def new_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def new_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on the Ray Train worker: a few steps, a checkpoint (one torch.save dict) reported after each."""
    import tempfile

    import ray.train

    model = new_model(0)
    optimizer, scheduler = new_optimizer(model)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, REPORTS + 1):
        loss = (model(torch.randn(16, 4, generator=gen)) - torch.randn(16, 2, generator=gen)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step}, os.path.join(d, "checkpoint.pt"))
            ray.train.report({"loss": loss.item()}, checkpoint=ray.train.Checkpoint.from_directory(d))


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray with one CPU for the module's runs; the workers get this module's functions by value."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def fit(loop: Any, storage: Path, config: dict[str, Any] | None = None) -> Path:
    """Run ``loop(config)`` on one Ray Train worker under a fresh run name; the run directory."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"resumer-{uuid.uuid4().hex[:10]}"  # a reused name would resume an old run
    result = TorchTrainer(loop, train_loop_config=config or {}, scaling_config=ScalingConfig(num_workers=1),
                          run_config=RunConfig(name=name, storage_path=str(storage))).fit()
    assert result.error is None, result.error
    return storage / name


@pytest.fixture(scope="module")
def run_dir(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a real TorchTrainer run (1 CPU worker) that reported two checkpoints."""
    run = fit(train_loop, tmp_path_factory.mktemp("ray-train"))
    assert len(checkpoints(run)) == REPORTS, os.listdir(run)
    return run


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (Ray names them by time)."""
    return sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def saved(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "checkpoint.pt", weights_only=True)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: what must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_resumed(path: Path | str, expected: dict[str, Any]) -> Any:
    """Resume a differently initialised model, optimizer and scheduler from ``path``: everything is ``expected``."""
    model = new_model(9)
    optimizer, scheduler = new_optimizer(model)
    result = resumer.resume(str(path), model, optimizer, scheduler)
    assert result.step == expected["step"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected["model"][name]), name
    order = [n for n, _ in model.named_parameters()]  # position i of the file is the i-th parameter
    by_name = dict(model.named_parameters())
    assert len(expected["optimizer"]["state"]) == len(order)
    for i, name in enumerate(order):
        live = optimizer.state[by_name[name]]
        assert set(live) == set(expected["optimizer"]["state"][i])
        for key, value in expected["optimizer"]["state"][i].items():
            assert torch.equal(live[key], value), (name, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in expected["optimizer"]["param_groups"]]
    assert scheduler.state_dict() == expected["scheduler"]
    return result


def test_a_checkpoint_directory_is_detected_and_inspected(run_dir: Path) -> None:
    newest = checkpoints(run_dir)[-1]
    assert registry.detect(Store.open(str(newest))) == "ray-train"
    info = inspect_checkpoint(str(newest))
    assert info["format"] == "ray-train" and info["file"] == "checkpoint.pt" and info["read_as"] == "torch-save"
    assert info["step"] == REPORTS and info["tensors"] == 4
    assert info["optimizer"]["class"] == "torch.optim.adam.Adam"
    assert info["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert "a Ray Train checkpoint directory: read checkpoint.pt (as torch-save)" in info["notes"]


def test_resume_from_the_checkpoint_directory_is_exact(run_dir: Path) -> None:
    for directory in checkpoints(run_dir):
        assert_resumed(directory, saved(directory))


def test_the_run_directory_resumes_its_newest_checkpoint(run_dir: Path) -> None:
    older, newest = checkpoints(run_dir)
    model = new_model(9)
    plan = resumer.plan(str(run_dir), model, *new_optimizer(model))
    assert plan.ok and plan.checkpoint == str(newest)
    assert any(n.startswith(f"chosen from the folder {run_dir}: {newest.name} (ray-train)") for n in plan.notes)
    result = assert_resumed(run_dir, saved(newest))
    assert result.plan.checkpoint == str(newest)
    info = inspect_checkpoint(str(run_dir))
    assert info["checkpoint"] == str(newest) and info["format"] == "ray-train" and "checkpoints" not in info


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(run_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    older, newest = checkpoints(run)
    data = (newest / "checkpoint.pt").read_bytes()
    (newest / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = tree(run)
    with caplog.at_level(logging.WARNING, logger="resumer"):
        result = assert_resumed(run, saved(older))
    assert result.plan.checkpoint == str(older)
    note = next(n for n in result.plan.notes if n.startswith("chosen from the folder"))
    assert f"passed over (not marked, not deleted): {newest.name}: " in note and "not a readable torch.save" in note
    assert f"[select] passed over {newest}" in caplog.text
    assert tree(run) == before  # nothing marked, deleted or rewritten: these checkpoints are Ray's


def test_two_torch_save_files_are_refused_and_listed(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / checkpoints(run_dir)[-1].name
    shutil.copytree(checkpoints(run_dir)[-1], target)
    torch.save(new_model(3).state_dict(), target / "ema.pt")
    model = new_model(9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        resumer.resume(str(target), model)
    message = str(info.value)
    assert "holds torch.save files (checkpoint.pt, ema.pt), and which one is the training state cannot be told" \
        in message
    assert f"Pass the path of the one file to resume from (e.g. {target / 'checkpoint.pt'})" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_resumed(target / "checkpoint.pt", saved(checkpoints(run_dir)[-1]))  # what the message says works


def test_no_torch_save_file_is_refused_and_listed(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / checkpoints(run_dir)[-1].name
    shutil.copytree(checkpoints(run_dir)[-1], target)
    (target / "checkpoint.pt").rename(target / "checkpoint.pt.old")
    (target / "notes.pt").write_text("not a torch.save file")
    with pytest.raises(CheckpointError, match=r"holds no torch\.save file .*its files: checkpoint\.pt\.old, "
                                              r"notes\.pt\. Pass the path of the one file"):
        resumer.plan(str(target), new_model(9))


def test_code_in_the_checkpoint_file_is_refused_with_nothing_run(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / checkpoints(run_dir)[-1].name
    shutil.copytree(checkpoints(run_dir)[-1], target)
    marker = tmp_path / "pwned"
    torch.save({**saved(target), "payload": Payload(str(marker))}, target / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling"):
        resumer.resume(str(target), new_model(9))
    assert not marker.exists()


def test_cli_plan_of_the_run_directory_exits_0(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    (tmp_path / "ray_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(cli, ["plan", str(run_dir), "--model", "ray_factories:model", "--optimizer",
                                 "ray_factories:optimizer", "--scheduler", "ray_factories:scheduler", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ok"] and plan["checkpoint"] == str(checkpoints(run_dir)[-1]) and plan["step"] == REPORTS


# --- Ray's Hugging Face callback: the Trainer's checkpoint-N/ copied to checkpoint/ inside each checkpoint_* ---

HF_STEPS = 4


def gpt2(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def hf_loop(config: dict[str, Any]) -> None:
    """Runs on the Ray Train worker: transformers.Trainer with Ray's RayTrainReportCallback, saving every 2 steps."""
    import transformers
    from ray.train.huggingface.transformers import RayTrainReportCallback

    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=config["output_dir"], max_steps=HF_STEPS, save_steps=2,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=rows)
    trainer.add_callback(RayTrainReportCallback())
    trainer.train()


@pytest.fixture(scope="module")
def hf_run_dir(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a real TorchTrainer run whose loop is transformers.Trainer with Ray's callback."""
    pytest.importorskip("transformers")
    storage = tmp_path_factory.mktemp("ray-hf")
    run = fit(hf_loop, storage, {"output_dir": str(storage / "hf-out")})
    assert len(checkpoints(run)) == HF_STEPS // 2, os.listdir(run)
    return run


def test_rays_hugging_face_checkpoints_resume_from_the_run_directory(hf_run_dir: Path) -> None:
    import safetensors.torch

    newest = checkpoints(hf_run_dir)[-1]
    assert registry.detect(Store.open(str(newest))) == "ray-train"
    model = gpt2(seed=7)
    result = resumer.resume(str(hf_run_dir), model)
    assert result.step == HF_STEPS and result.plan.checkpoint == str(newest)
    assert "a Ray Train checkpoint directory: read checkpoint/ (as hf-trainer)" in result.plan.notes
    state = model.state_dict()
    for name, saved in safetensors.torch.load_file(str(newest / "checkpoint" / "model.safetensors")).items():
        assert torch.equal(state[name], saved), name
    info = inspect_checkpoint(str(newest))
    assert info["file"] == "checkpoint/" and info["read_as"] == "hf-trainer"
    assert "checkpoint/model.safetensors" in [f["path"] for f in info["files"]]
