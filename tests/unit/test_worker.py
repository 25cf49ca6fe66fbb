"""``resumer.jobs.worker`` in one process, without Ray: what a worker tells its job's progress board, what it
builds, how it shards, and what its saves write, with a fake board (a real ``ProgressBoard`` behind the
``handle.method.remote(...)`` calls of an actor handle) and, for sharded state, a fake process group of two ranks.

The same code on real Ray workers is tested in ``tests/integration/test_ray_job.py``,
``test_ray_sharded_job.py`` and ``test_sharded_worker.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumer
import resumer.checkpoints.retention
import resumer.jobs.worker as worker
from resumer import examples as ex
from resumer.core.errors import Preempted
from resumer.jobs import preemption
from resumer.jobs.attempt import ENV, AttemptConfig
from resumer.jobs.board import NAMESPACE, ProgressBoard, board_name
from resumer.jobs.factories import build

MODEL, OPTIMIZER, SCHEDULER = "resumer.examples:mlp_v1", "resumer.examples:adam", "resumer.examples:step_lr"


class _Method:
    def __init__(self, fn: Any) -> None:
        self.remote = fn  # runs at once; a real handle returns an ObjectRef instead


class FakeBoard:
    """A ``ProgressBoard`` behind an actor handle's ``handle.method.remote(...)``."""

    def __init__(self) -> None:
        self.board = ProgressBoard()

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.board, name))


@pytest.fixture
def attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AttemptConfig:
    """This process is a worker of attempt 2 of job ``j`` (checkpoints under tmp_path, every 4 steps)."""
    cfg = AttemptConfig(job="j", attempt=2, root=str(tmp_path), model=MODEL, optimizer=OPTIMIZER, every=4)
    monkeypatch.setenv(ENV, cfg.to_json())
    return cfg


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch) -> ProgressBoard:
    """The job's progress board, already found (a fresh one per test)."""
    fake = FakeBoard()
    monkeypatch.setattr(worker, "_board", fake)
    return fake.board


def _as_rank(monkeypatch: pytest.MonkeyPatch, r: int) -> None:
    monkeypatch.setattr(worker, "rank", lambda: r)


def _notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process had a SIGTERM (no signal sent: the handler's record of it)."""
    monkeypatch.setattr(preemption, "_noticed_at", time.time())


# ---------------------------------------------------------------------------------------------------------------
# the heartbeat


def test_each_rank_reports_its_step_host_and_pid_and_rank_0_its_metrics(
        attempt: AttemptConfig, board: ProgressBoard, monkeypatch: pytest.MonkeyPatch) -> None:
    before = time.time()
    _as_rank(monkeypatch, 1)
    worker.report(7, {"loss": 0.5})
    _as_rank(monkeypatch, 0)
    worker.report(6, {"loss": 0.25})
    snap = board.snapshot()
    assert board.steps == {1: 7, 0: 6} and snap["step"] == 6  # the job is at its slowest rank's step
    assert snap["pids"] == {0: (socket.gethostname(), os.getpid()), 1: (socket.gethostname(), os.getpid())}
    assert isinstance(snap["at"], float) and before <= snap["at"] <= time.time()
    assert snap["metrics"] == [(6, {"loss": 0.25})]  # rank 0's only


def test_the_board_is_looked_up_in_resumers_namespace(attempt: AttemptConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker runs in its job's Ray namespace; the board lives in resumer's: looked up anywhere else, it is not
    found, and the controller sees no heartbeat from a healthy job."""
    import ray

    fake = FakeBoard()

    def get_actor(name: str, namespace: str | None = None) -> FakeBoard:
        if (name, namespace) != (board_name("j"), NAMESPACE):
            raise ValueError(f"Failed to look up actor {name!r} in namespace {namespace!r}")
        return fake

    class Context:
        def get_node_id(self) -> str:
            return "node-a"

    monkeypatch.setattr(worker, "_board", None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    worker.report(3)
    assert fake.board.steps == {0: 3} and fake.board.nodes == {0: ("node-a", os.getpid())}


def test_without_a_board_a_worker_keeps_training(attempt: AttemptConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def get_actor(name: str, namespace: str | None = None) -> Any:
        raise ValueError("no such actor")

    monkeypatch.setattr(worker, "_board", None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(worker, "_node_id", lambda: "")
    worker.report(3)
    assert worker.save(4, ex.mlp_v1()) == os.path.join(attempt.root, "step-0000000004")


# ---------------------------------------------------------------------------------------------------------------
# build and shard


def test_build_outside_ray_train_makes_the_optimizer_over_the_model_and_the_scheduler_over_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AttemptConfig(job="j", attempt=1, root=str(tmp_path), model=MODEL, optimizer=OPTIMIZER, scheduler=SCHEDULER)
    monkeypatch.setenv(ENV, cfg.to_json())
    model, optimizer, scheduler = worker.build()
    assert isinstance(model, nn.Sequential)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
    assert isinstance(optimizer, torch.optim.Adam)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.optimizer is optimizer


def test_shard_makes_each_child_and_each_container_item_with_parameters_a_unit_then_the_root(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.fsdp

    sharded: list[nn.Module] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a process group, as Ray Train sets up
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", sharded.append)
    embed, blocks, heads = nn.Embedding(8, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), \
        nn.ModuleList([nn.Linear(4, 2)])
    model = nn.Sequential(embed, nn.ReLU(), blocks, heads)
    assert worker.shard(model) is model
    assert [id(m) for m in sharded] == [id(m) for m in (embed, blocks[0], blocks[2], heads[0], model)]


# ---------------------------------------------------------------------------------------------------------------
# save: replicated state


def test_a_commit_is_reported_to_the_board_with_its_step(
        attempt: AttemptConfig, board: ProgressBoard) -> None:
    assert worker.save(3, ex.mlp_v1()) is None
    uri = worker.save(4, ex.mlp_v1())
    assert uri is not None and board.snapshot()["committed"] == (4, uri)


def test_an_emergency_checkpoint_records_its_step_metrics_job_attempt_and_rank(
        attempt: AttemptConfig, board: ProgressBoard, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _notice(monkeypatch)
    _as_rank(monkeypatch, 1)
    _answering(monkeypatch)
    caplog.set_level(logging.WARNING, logger="resumer.jobs.worker")
    with pytest.raises(Preempted) as err:
        worker.save(5, ex.mlp_v1(), metrics={"loss": 0.5})  # off the cadence
    assert err.value.step == 5 and err.value.uri == os.path.join(attempt.root, "step-0000000005")
    assert resumer.read_manifest(err.value.uri).extra == {"metrics": {"loss": 0.5}, "job": "j", "attempt": 2,
                                                          "emergency": True, "rank": 1}
    assert board.claims == {5: 1} and board.snapshot()["committed"] == (5, err.value.uri)
    assert [r.getMessage() for r in caplog.records if r.name == "resumer.jobs.worker"][0].startswith(
        f"[preemption] rank 1: emergency checkpoint {err.value.uri} committed ")


def _answering(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.get`` of a board that answers at once (a claim's answer is the value itself here)."""
    import ray

    def get(ref: Any, *, timeout: float | None = None) -> Any:
        return ref

    monkeypatch.setattr(ray, "get", get)


def test_a_notified_rank_whose_step_another_rank_claimed_writes_nothing(
        attempt: AttemptConfig, board: ProgressBoard, monkeypatch: pytest.MonkeyPatch) -> None:
    _notice(monkeypatch)
    _answering(monkeypatch)
    assert board.claim(5, 1)  # rank 1, notified too, claimed step 5 first
    with pytest.raises(Preempted) as err:
        worker.save(5, ex.mlp_v1())
    assert err.value.uri is None and resumer.list_checkpoints(attempt.root) == []


def test_a_board_that_does_not_answer_the_claim_in_time_lets_the_rank_write(
        attempt: AttemptConfig, board: ProgressBoard, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The claim waits for the board a bounded time, well within the grace period: a board that never answers
    cannot keep the notified rank from writing its emergency checkpoint before it is killed."""
    import ray
    from ray.exceptions import GetTimeoutError

    def hanging(ref: Any, *, timeout: float | None = None) -> Any:
        if timeout is None or timeout >= attempt.grace_s:
            pytest.fail(f"ray.get(timeout={timeout}) on a board that never answers outlasts the "
                        f"{attempt.grace_s}s grace period")
        raise GetTimeoutError("Get timed out: some object(s) not ready.")

    monkeypatch.setattr(ray, "get", hanging)
    _notice(monkeypatch)
    caplog.set_level(logging.WARNING, logger="resumer.jobs.worker")
    with pytest.raises(Preempted) as err:
        worker.save(5, ex.mlp_v1())
    assert err.value.uri == os.path.join(attempt.root, "step-0000000005")
    assert resumer.read_manifest(err.value.uri).extra["emergency"] is True
    assert any("progress board unreachable" in r.getMessage() and "Get timed out" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# save: retention after a commit


def test_retention_prunes_the_jobs_store_with_its_storage_options(
        credentialed_root: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    keyed_root, options = credentialed_root
    cfg = AttemptConfig(job="j", attempt=1, root=keyed_root, model=MODEL, every=4, keep_last=2,
                        storage_options=options)
    monkeypatch.setenv(ENV, cfg.to_json())
    for step in (4, 8, 12):
        assert worker.save(step, ex.mlp_v1()) is not None
    assert [c.step for c in resumer.list_checkpoints(keyed_root, storage_options=options)] == [12, 8]


def test_a_failed_prune_does_not_stop_training_and_says_why(
        attempt: AttemptConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError("the store said no")

    monkeypatch.setenv(ENV, AttemptConfig(job="j", attempt=2, root=attempt.root, model=MODEL, every=4,
                                          keep_last=1).to_json())
    monkeypatch.setattr(resumer.checkpoints.retention, "prune", failing)
    caplog.set_level(logging.WARNING, logger="resumer.jobs.worker")
    assert worker.save(4, ex.mlp_v1()) == os.path.join(attempt.root, "step-0000000004")
    assert [r.getMessage() for r in caplog.records if r.name == "resumer.jobs.worker"] == [
        f"[retention] pruning {attempt.root} failed (the next save tries again): the store said no"]


# ---------------------------------------------------------------------------------------------------------------
# save: sharded state (every rank writes; ranks agree on a notice)


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """This process is one rank of a gloo process group of two whose model is sharded: ``other["noticed"]`` is
    whether the other rank has had a notice (what its side of the all-reduce contributes)."""
    import torch.distributed as dist

    other = {"noticed": 0}

    def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        theirs = torch.full_like(tensor, other["noticed"])
        reduce = {dist.ReduceOp.MAX: torch.maximum, dist.ReduceOp.MIN: torch.minimum, dist.ReduceOp.SUM: torch.add}
        tensor.copy_(reduce[op](tensor, theirs))

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(worker, "sharded", lambda model: True)
    return other


def test_ranks_agree_whether_any_was_notified(two_ranks: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker._any_rank_noticed() is False
    two_ranks["noticed"] = 1
    assert worker._any_rank_noticed() is True
    two_ranks["noticed"] = 0
    _notice(monkeypatch)
    assert worker._any_rank_noticed() is True


def test_every_rank_writes_sharded_state_at_the_cadence_and_rank_0_reports_it(
        attempt: AttemptConfig, board: ProgressBoard, two_ranks: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _ = build(MODEL, OPTIMIZER)
    ex.train_step(model, optimizer, 1)
    _as_rank(monkeypatch, 1)
    assert worker.save(7, model, optimizer) is None
    uri = worker.save(8, model, optimizer)  # rank 1 writes its shards too
    assert uri == os.path.join(attempt.root, "step-0000000008")
    assert resumer.read_manifest(uri).optimizer_tensors  # Adam's state went with the weights
    assert board.snapshot()["committed"] is None  # rank 0 reports the commit, once
    _as_rank(monkeypatch, 0)
    uri = worker.save(11, model, optimizer, force=True)
    assert uri == os.path.join(attempt.root, "step-0000000011") and board.snapshot()["committed"] == (11, uri)


def test_a_notice_to_another_rank_makes_this_one_write_its_shards_of_the_emergency_checkpoint(
        attempt: AttemptConfig, two_ranks: dict[str, int]) -> None:
    two_ranks["noticed"] = 1
    with pytest.raises(Preempted) as err:
        worker.save(6, ex.mlp_v1(), metrics={"loss": 0.25})
    assert err.value.step == 6 and err.value.uri == os.path.join(attempt.root, "step-0000000006")
    assert resumer.read_manifest(err.value.uri).extra == {"metrics": {"loss": 0.25}, "job": "j", "attempt": 2,
                                                          "emergency": True, "rank": 0}


def test_a_sharded_emergency_save_of_a_committed_step_resumes_from_that_checkpoint(
        attempt: AttemptConfig, two_ranks: dict[str, int]) -> None:
    committed = worker.save(8, ex.mlp_v1())  # the cadence save of step 8 committed before the notice
    two_ranks["noticed"] = 1
    with pytest.raises(Preempted) as err:
        worker.save(8, ex.mlp_v1())
    assert err.value.step == 8 and err.value.uri == committed is not None
