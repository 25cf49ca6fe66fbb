"""An attempt's config is one typed value: built by the launcher from the spec and the recorded decision,
validated once when a worker parses it (errors name the field), and read by the worker as that type. Each
rank plans once; a checkpoint a rank finds corrupt is quarantined, so the next attempt falls back."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import resumer
import resumer.jobs.worker
import resumer.runtime.api
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.errors import CheckpointError, UsageError
from resumer.core.plan import Policy
from resumer.jobs import spec as jobspec
from resumer.jobs.attempt import ENV, AttemptConfig
from resumer.jobs.factories import build
from resumer.jobs.planner import JobPlanner

MODEL, OPTIMIZER = "resumer.examples:mlp_v1", "resumer.examples:adam"


def _spec(root: Path, **resume: Any) -> jobspec.JobSpec:
    return jobspec.parse({"name": "j", "entrypoint": "resumer.examples_train:train_loop", "model": MODEL,
                          "optimizer": OPTIMIZER, "storage": {"root": str(root)}, "resume": resume,
                          "checkpoint": {"every": 4, "keep_last": 3, "grace_s": 5}})


@pytest.fixture(autouse=True)
def _no_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resumer.jobs.preemption, "install", lambda grace_s=30.0: True)


def _save(root: Path, step: int) -> str:
    model, optimizer, _ = build(MODEL, OPTIMIZER)
    torch.manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return resumer.save_checkpoint(str(root), step, model, optimizer)


def test_the_launcher_builds_it_from_the_spec_and_the_decision_and_it_round_trips(tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(tmp_path, policy="partial", renames=["auto"]), sharding="fsdp")
    uri = _save(tmp_path, 4)
    decision = JobPlanner(spec).decide(2, FailureClass.CRASHED)
    cfg = AttemptConfig.for_decision(spec, decision)
    assert decision.plan is not None
    assert (cfg.checkpoint, cfg.plan_hash, cfg.policy, cfg.renames) == (uri, decision.plan.digest(), Policy.PARTIAL,
                                                                        ("auto",))
    assert (cfg.job, cfg.attempt, cfg.root, cfg.every, cfg.keep_last, cfg.grace_s) == ("j", 2, spec.root, 4, 3, 5.0)
    assert (cfg.model, cfg.optimizer, cfg.scheduler, cfg.sharding) == (MODEL, OPTIMIZER, None, "fsdp")
    assert AttemptConfig.from_json(cfg.to_json()) == cfg
    fresh = AttemptConfig.for_decision(spec, Decision(job="j", attempt=1, outcome=Outcome.STARTED))
    assert fresh.checkpoint is None and fresh.plan_hash is None


def test_a_checkpoint_without_its_plan_digest_is_refused() -> None:
    with pytest.raises(UsageError, match="Attempt config field 'plan_hash': is set exactly when 'checkpoint' is"):
        AttemptConfig(job="j", attempt=2, root="/r", model=MODEL, checkpoint="/r/step-0000000004")
    spec = _spec(Path("/r"))
    unplanned = Decision(job="j", attempt=2, outcome=Outcome.RESUMED, checkpoint="/r/step-0000000004", step=4)
    with pytest.raises(UsageError, match="'plan_hash'"):
        AttemptConfig.for_decision(spec, unplanned)


GOOD = {"job": "j", "attempt": 2, "root": "/r", "model": MODEL}


@pytest.mark.parametrize(("patch", "message"), [
    ({"every": "10"}, "Attempt config field 'every': must be an integer >= 1, got '10'"),
    ({"every": 0}, "Attempt config field 'every': must be an integer >= 1, got 0"),
    ({"attempt": True}, "Attempt config field 'attempt': must be an integer >= 1"),
    ({"policy": "lenient"}, "Attempt config field 'policy': Unknown policy 'lenient'"),
    ({"renames": "auto"}, "Attempt config field 'renames': must be a list of strings"),
    ({"renames": ["("]}, "Attempt config field 'renames'"),
    ({"grace_s": -1}, "Attempt config field 'grace_s': must be a number of seconds >= 0"),
    ({"storage_options": ["anon"]}, "Attempt config field 'storage_options': must be a mapping"),
    ({"keep_last": 0}, "Attempt config field 'keep_last': must be an integer >= 1 or null"),
    ({"root": ""}, "Attempt config field 'root': must be a non-empty string"),
    ({"checkpoint": "/r/step-0000000004"}, "Attempt config field 'plan_hash'"),
    ({"polcy": "strict"}, "Attempt config field 'polcy': unknown field"),
    ({"sharding": "zero3"}, "Attempt config field 'sharding': must be one of none, fsdp"),
])
def test_a_bad_field_is_named_when_the_worker_parses_it(patch: dict[str, Any], message: str) -> None:
    import json

    with pytest.raises(UsageError) as err:
        AttemptConfig.from_json(json.dumps({**GOOD, **patch}))
    assert message in str(err.value)


@pytest.mark.parametrize("missing", ["job", "attempt", "root", "model"])
def test_a_missing_field_is_named(missing: str) -> None:
    with pytest.raises(UsageError, match=f"Attempt config field '{missing}': is required"):
        AttemptConfig.from_dict({k: v for k, v in GOOD.items() if k != missing})


def test_the_worker_reads_the_typed_value_and_a_bad_one_stops_it_naming_the_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AttemptConfig(job="j", attempt=3, root=str(tmp_path), model=MODEL, every=7)
    monkeypatch.setenv(ENV, cfg.to_json())
    assert resumer.jobs.worker.attempt_config() == cfg
    assert resumer.jobs.worker.save(6, build(MODEL)[0]) is None and resumer.jobs.worker.save(7, build(MODEL)[0])
    monkeypatch.setenv(ENV, cfg.to_json().replace('"every": 7', '"every": "7"'))
    with pytest.raises(UsageError, match="Attempt config field 'every'"):
        resumer.jobs.worker.restore(build(MODEL)[0])


def test_each_rank_plans_once_against_the_controllers_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resumer.jobs.worker")
    spec = _spec(tmp_path)
    _save(tmp_path, 4)
    decision = JobPlanner(spec).decide(2, FailureClass.PREEMPTED)
    monkeypatch.setenv(ENV, AttemptConfig.for_decision(spec, decision).to_json())
    calls: list[str] = []
    real = resumer.runtime.api.reconcile

    def counting(saved: Any, current: Any, *args: Any, **kw: Any) -> Any:
        calls.append(str(kw.get("checkpoint")))
        return real(saved, current, *args, **kw)

    monkeypatch.setattr(resumer.runtime.api, "reconcile", counting)
    for rank in (0, 1):  # two ranks, each its own objects
        monkeypatch.setattr(resumer.jobs.worker, "rank", lambda rank=rank: rank)
        model, optimizer, scheduler = build(MODEL, OPTIMIZER)
        assert resumer.jobs.worker.restore(model, optimizer, scheduler) == 4
    assert calls == [decision.checkpoint] * 2
    logged = [r.getMessage() for r in caplog.records if r.name == "resumer.jobs.worker"]
    assert [m.split(": ", 1)[0] for m in logged] == ["[restore] rank 0", "[restore] rank 1"]  # each rank's plan


def _corrupt(uri: str) -> None:
    """Flip bytes at the end of the model's data file: sizes unchanged, checksums broken."""
    name = next(f for f in sorted(os.listdir(uri)) if f.startswith("model") and f.endswith(".safetensors"))
    with open(os.path.join(uri, name), "r+b") as f:
        f.seek(-16, os.SEEK_END)
        data = f.read(16)
        f.seek(-16, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_checkpoint_a_rank_finds_corrupt_is_passed_over_by_the_next_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller selects by sizes (no full read); the rank's one read checks the checksums, refuses before
    touching anything, and quarantines the checkpoint: the next attempt resumes the previous one, no crash loop."""
    spec = _spec(tmp_path)
    _save(tmp_path, 4)
    bad = _save(tmp_path, 8)
    _corrupt(bad)
    planner = JobPlanner(spec)
    first = planner.decide(2, FailureClass.PREEMPTED)
    assert first.checkpoint == bad and first.step == 8  # sizes only: the controller does not read the data
    monkeypatch.setenv(ENV, AttemptConfig.for_decision(spec, first).to_json())
    model, optimizer, scheduler = build(MODEL, OPTIMIZER)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="rank 0: .*checksum") as err:
        resumer.jobs.worker.restore(model, optimizer, scheduler)
    assert err.value.uri == bad
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert os.path.exists(os.path.join(bad, "quarantine.json"))
    second = planner.decide(3, FailureClass.CRASHED)
    assert second.step == 4 and [r["uri"] for r in second.rejected] == [bad]
    monkeypatch.setenv(ENV, AttemptConfig.for_decision(spec, second).to_json())
    assert resumer.jobs.worker.restore(model, optimizer, scheduler) == 4


def test_a_vanished_checkpoint_is_not_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint gone before the rank read it gets no quarantine mark: on an object store (memory:// here, as
    on S3) writing the mark would bring its prefix back as a stray step directory."""
    import fsspec

    root = f"memory://attempt-config/{tmp_path.name}"
    spec = _spec(tmp_path)
    spec = dataclasses.replace(spec, root=root)
    model, optimizer, _ = build(MODEL, OPTIMIZER)
    gone = resumer.save_checkpoint(root, 4, model, optimizer)
    decision = JobPlanner(spec).decide(2, FailureClass.PREEMPTED)
    fs = fsspec.filesystem("memory")
    fs.rm(gone.split("://", 1)[1], recursive=True)
    monkeypatch.setenv(ENV, AttemptConfig.for_decision(spec, decision).to_json())
    with pytest.raises(CheckpointError, match="rank 0: "):
        resumer.jobs.worker.restore(model, optimizer)
    assert not fs.find(root.split("://", 1)[1])


def test_sharding_outside_a_process_group_is_refused_saying_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AttemptConfig(job="j", attempt=1, root=str(tmp_path), model=MODEL, optimizer=OPTIMIZER, sharding="fsdp")
    monkeypatch.setenv(ENV, cfg.to_json())
    with pytest.raises(resumer.core.errors.ResumerError, match="sharding: fsdp needs the process group") as err:
        resumer.jobs.worker.build()
    assert str(err.value).endswith("this process has none (run the job with 'resumer submit', or leave sharding "
                                   "out for a local run).")
