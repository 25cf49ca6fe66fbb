"""A job spec can start from any checkpoint (``resume.from``): planned like any other, recorded with where it
came from, and used only while the job's own root holds no usable checkpoint. A location that cannot be read
is a refusal naming the field, never a silent fresh start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import resumer
import resumer.jobs.worker
from resumer.core.decision import FailureClass, Outcome
from resumer.core.errors import UsageError
from resumer.jobs import spec as jobspec
from resumer.jobs.attempt import ENV, AttemptConfig
from resumer.jobs.factories import build
from resumer.jobs.planner import JobPlanner

MODEL, OPTIMIZER = "resumer.examples:mlp_v1", "resumer.examples:adam"


@pytest.fixture(autouse=True)
def _no_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resumer.jobs.preemption, "install", lambda grace_s=30.0: True)


def _spec(root: Path, start_from: str | None, model: str = MODEL, **resume: Any) -> jobspec.JobSpec:
    if start_from is not None:
        resume["from"] = start_from
    return jobspec.parse({"name": "j", "entrypoint": "resumer.examples_train:train_loop", "model": model,
                          "optimizer": OPTIMIZER, "storage": {"root": str(root)}, "resume": resume})


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer, _ = build(MODEL, OPTIMIZER)
    torch.manual_seed(7)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def _torch_save_file(tmp_path: Path, step: int = 30) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    """What a plain training script writes with torch.save: the job starts from it."""
    model, optimizer = _trained()
    path = tmp_path / "before-resumer.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path)
    return path, model, optimizer


def test_the_spec_reads_from_relative_to_the_spec_file_and_names_the_field_when_bad(tmp_path: Path) -> None:
    parsed = jobspec.parse({"name": "j", "entrypoint": "a.b:c", "model": "a.b:m", "storage": {"root": "ckpts"},
                            "resume": {"from": "old/checkpoint-40"}}, base_dir=str(tmp_path))
    assert parsed.start_from == str(tmp_path / "old" / "checkpoint-40")
    assert parsed.to_dict()["start_from"] == parsed.start_from
    assert _spec(tmp_path, None).start_from is None
    with pytest.raises(UsageError, match="Job spec field 'resume.from': must be the path or URI of a checkpoint"):
        _spec(tmp_path, "")
    with pytest.raises(UsageError, match="'resume.from': is the job's own storage.root"):
        _spec(tmp_path / "root", str(tmp_path / "root"))


def test_the_first_attempt_starts_from_a_foreign_checkpoint_planned_and_restored_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, saved_model, saved_optimizer = _torch_save_file(tmp_path)
    spec = _spec(tmp_path / "root", str(path))
    decision = JobPlanner(spec).decide(1, FailureClass.NONE)
    assert decision.outcome is Outcome.RESUMED and decision.plan is not None and decision.plan.ok
    assert decision.checkpoint == str(path) and decision.step == 30
    assert "Started from resume.from (torch-save)" in decision.message
    monkeypatch.setenv(ENV, AttemptConfig.for_decision(spec, decision).to_json())
    model, optimizer, scheduler = build(MODEL, OPTIMIZER)
    assert resumer.jobs.worker.restore(model, optimizer, scheduler) == 30
    for (name, a), b in zip(model.state_dict().items(), saved_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    got, want = optimizer.state_dict()["state"], saved_optimizer.state_dict()["state"]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"]) for i in want)


def test_once_the_job_has_its_own_checkpoint_it_resumes_that_one(tmp_path: Path) -> None:
    path, _, _ = _torch_save_file(tmp_path)
    spec = _spec(tmp_path / "root", str(path))
    model, optimizer = _trained()
    own = resumer.save_checkpoint(spec.root, 40, model, optimizer)
    decision = JobPlanner(spec).decide(2, FailureClass.PREEMPTED)
    assert (decision.outcome, decision.checkpoint, decision.step) == (Outcome.RESUMED, own, 40)


def test_an_unreadable_from_is_refused_naming_it_not_a_fresh_start(tmp_path: Path) -> None:
    missing = _spec(tmp_path / "root", str(tmp_path / "nowhere.pt"))
    decision = JobPlanner(missing).decide(1, FailureClass.NONE)
    assert decision.outcome is Outcome.REFUSED and decision.checkpoint is None
    assert decision.message.startswith(f"resume.from {tmp_path / 'nowhere.pt'}: ")
    assert "does not exist" in decision.message


def test_a_from_that_does_not_fit_the_code_is_refused_with_its_plan(tmp_path: Path) -> None:
    path, _, _ = _torch_save_file(tmp_path)
    spec = _spec(tmp_path / "root", str(path), model="resumer.examples:mlp_v2_wider_head")
    decision = JobPlanner(spec).decide(1, FailureClass.NONE)
    assert decision.outcome is Outcome.REFUSED and decision.plan is not None and not decision.plan.ok
    assert decision.message.startswith(f"resume.from {path}: ")
