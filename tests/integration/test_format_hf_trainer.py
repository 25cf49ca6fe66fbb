"""Hugging Face ``transformers.Trainer`` checkpoints, written by the real ``Trainer`` (a tiny GPT-2 from a config,
three steps on CPU), then detected, inspected, planned from the CLI and resumed from Python.

What is pinned: after ``resume`` the weights are bitwise the saved ones, the optimizer state of every parameter
(by name: the saved file is keyed by position) and each group's lr are the saved ones, and so are the scheduler,
the step and the RNG; the sharded form and ``pytorch_model.bin`` read the same; a pickle that would run code in
any file of the layout, and an index that lies about its shards, are refused with nothing run and nothing changed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_trainer import Tokens, arguments, gpt2

import resumer
from resumer.cli.main import cli
from resumer.core.errors import CheckpointError
from resumer.formats import registry
from resumer.runtime.inspect import inspect_checkpoint
from resumer.storage.store import Store
from resumer.testing.hostile import Payload

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
safe_globals = transformers.trainer_pt_utils.safe_globals

STEPS = 3


def trainer_args(output_dir: str) -> Any:
    return arguments(output_dir, steps=STEPS, save_every=STEPS, weight_decay=0.1)


def built_like_trainer(model: torch.nn.Module, output_dir: str) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (decay / no-decay groups) and scheduler a fresh ``Trainer`` builds for ``model``."""
    trainer = transformers.Trainer(model=model, args=trainer_args(output_dir))
    optimizer = trainer.create_optimizer()
    return optimizer, trainer.create_scheduler(num_training_steps=STEPS, optimizer=optimizer)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """checkpoint-3/ as the real Trainer writes it."""
    out = tmp_path_factory.mktemp("hf")
    transformers.Trainer(model=gpt2(), args=trainer_args(str(out)), train_dataset=Tokens()).train()
    path = out / f"checkpoint-{STEPS}"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "training_args.bin"} <= set(os.listdir(path))
    return str(path)


def copy_of(checkpoint: str, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, target)
    return target


def saved_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(Path(path) / "model.safetensors"))


def fresh(tmp_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """A model initialised differently from the saved one, with the optimizer and scheduler Trainer builds."""
    model = gpt2(seed=7)
    optimizer, scheduler = built_like_trainer(model, str(tmp_path / "fresh"))
    return model, optimizer, scheduler


def names_in_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def assert_resumed(path: str | Path, weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Resume a fresh model, optimizer and scheduler from ``path``; everything must be the saved state."""
    model, optimizer, scheduler = fresh(tmp_path)
    result = resumer.resume(str(path), model, optimizer, scheduler)
    assert result.step == STEPS
    state = model.state_dict()
    for name, saved in weights.items():
        assert torch.equal(state[name], saved), name
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, loaded through wte
    saved_opt = torch.load(Path(path) / "optimizer.pt", weights_only=True)
    order = names_in_order(model, optimizer)  # position i of the saved file is the i-th parameter of this order
    by_name = dict(model.named_parameters())
    assert len(saved_opt["state"]) == len(order)
    for i, name in enumerate(order):
        live = optimizer.state[by_name[name]]
        assert set(live) == set(saved_opt["state"][i])
        for key, value in saved_opt["state"][i].items():
            assert torch.equal(live[key], value), (name, key)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved_opt["param_groups"]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    saved_sched = torch.load(Path(path) / "scheduler.pt", weights_only=True)
    assert scheduler.state_dict() == saved_sched


def test_detected_and_inspected(checkpoint: str) -> None:
    assert registry.detect(Store.open(checkpoint)) == "hf-trainer"
    info = inspect_checkpoint(checkpoint)
    assert info["format"] == "hf-trainer" and info["kind"] == "hf-trainer" and info["step"] == STEPS
    assert info["optimizer"]["class"] == "torch.optim.adamw.AdamW" and info["optimizer"]["groups"] == 2
    assert info["scheduler"] == "torch.optim.lr_scheduler.LambdaLR"
    assert info["rng"] == ["torch", "numpy", "python"]
    assert "model.safetensors" in [f["path"] for f in info["files"]]
    assert info["tensors"] == len(saved_weights(checkpoint))
    assert "training_args.bin is not read: a pickle of TrainingArguments; unpickling it could run code" in info["notes"]


def test_cli_plan_exit_0(checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hf_factories.py").write_text(textwrap.dedent(f"""
        import transformers
        from {__name__} import gpt2, built_like_trainer

        def optimizer(model):
            return built_like_trainer(model, {str(tmp_path / "out")!r})[0]

        def scheduler(optimizer):
            return transformers.get_linear_schedule_with_warmup(optimizer, 1, {STEPS})
    """))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["plan", checkpoint, "--model", f"{__name__}:gpt2", "--optimizer",
                                 "hf_factories:optimizer", "--scheduler", "hf_factories:scheduler", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ok"] and "a Hugging Face Trainer checkpoint directory" in plan["notes"]


def test_resume_is_exact(checkpoint: str, tmp_path: Path) -> None:
    torch.manual_seed(123)
    assert_resumed(checkpoint, saved_weights(checkpoint), tmp_path)
    with safe_globals():  # what Trainer allowlists to read its own RNG file back
        saved_rng = torch.load(Path(checkpoint) / "rng_state.pth", weights_only=True)
    assert torch.equal(torch.get_rng_state(), saved_rng["cpu"])
    assert random.getstate() == saved_rng["python"]
    assert np.array_equal(np.random.get_state()[1], saved_rng["numpy"][1])


def sharded(checkpoint: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the checkpoint whose model is in several safetensors shards and an index, by save_pretrained."""
    target = copy_of(checkpoint, tmp_path)
    weights = saved_weights(target)
    os.remove(target / "model.safetensors")
    model = gpt2()
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(str(target), max_shard_size="30KB")
    return target, json.loads((target / "model.safetensors.index.json").read_text())


def test_sharded_safetensors(checkpoint: str, tmp_path: Path) -> None:
    target, index = sharded(checkpoint, tmp_path)
    assert len(set(index["weight_map"].values())) > 1
    assert_resumed(target, saved_weights(checkpoint), tmp_path)


def test_pytorch_model_bin(checkpoint: str, tmp_path: Path) -> None:
    target = copy_of(checkpoint, tmp_path)
    weights = saved_weights(target)
    os.remove(target / "model.safetensors")
    model = gpt2()
    model.load_state_dict(weights, strict=False)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    assert_resumed(target, weights, tmp_path)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "pytorch_model.bin"])
def test_code_in_a_pickle_is_refused(checkpoint: str, tmp_path: Path, name: str) -> None:
    target = copy_of(checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    if name == "pytorch_model.bin":
        os.remove(target / "model.safetensors")
    torch.save({"state": {}, "param_groups": [], "payload": Payload(str(marker))}, target / name)
    model, optimizer, scheduler = fresh(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling"):
        resumer.resume(str(target), model, optimizer, scheduler)
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state


def _to_missing_shard(target: Path, index: dict[str, Any]) -> None:
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-99999-of-99999.safetensors"


def _to_other_shard(target: Path, index: dict[str, Any]) -> None:
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]


def _outside(target: Path, index: dict[str, Any]) -> None:
    name, file = next(iter(index["weight_map"].items()))
    shutil.copy(target / file, target.parent / file)
    index["weight_map"][name] = f"../{file}"


def _truncated_shard(target: Path, index: dict[str, Any]) -> None:
    shard = target / sorted(set(index["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 16])


@pytest.mark.parametrize(("lie", "message"), [
    (_to_missing_shard, "not a safetensors file of this directory"),
    (_to_other_shard, "does not match shard"),
    (_outside, "not a safetensors file of this directory"),
    (_truncated_shard, "past the end of the file"),
])
def test_lying_index_is_refused(checkpoint: str, tmp_path: Path, lie: Any, message: str) -> None:
    target, index = sharded(checkpoint, tmp_path)
    lie(target, index)
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    model, optimizer, scheduler = fresh(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        resumer.resume(str(target), model, optimizer, scheduler)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state
