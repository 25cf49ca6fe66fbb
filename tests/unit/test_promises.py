"""Safety rules of the controller and the failure policy, each pinned so that breaking it fails a test."""

from __future__ import annotations

from typing import Any

import pytest

from resumer.controller import Controller, Observation, RunStatus, State
from resumer.decision import Decision, FailureClass, Outcome
from resumer.failures import Budget, Failure, FailurePolicy, Verdict
from resumer.testing import FakeClock, FakeLauncher, FakePlanner, FakeRecorder

START = Decision(job="j", attempt=1, outcome=Outcome.STARTED)
RESUME = Decision(job="j", attempt=2, outcome=Outcome.RESUMED, checkpoint="mem://r/step-0000000010", step=10)


class OrderCheckingLauncher(FakeLauncher):
    """Notes, at each launch, whether that very decision had already been recorded."""

    def __init__(self, recorder: FakeRecorder, *observations: Observation) -> None:
        super().__init__(*observations)
        self.recorder = recorder
        self.recorded_first: list[bool] = []

    def launch(self, decision: Any) -> None:
        self.recorded_first.append(any(d is decision for d in self.recorder.of("decision")))
        super().launch(decision)


def test_every_attempt_is_recorded_before_it_launches() -> None:
    rec = FakeRecorder()
    crash = Observation(status=RunStatus.FAILED, failure=Failure(cls=FailureClass.CRASHED, step=3, cause="x"))
    launcher = OrderCheckingLauncher(rec, crash, Observation(status=RunStatus.RUNNING, step=4, reported_at=0.0),
                                     Observation(status=RunStatus.SUCCEEDED, step=9))
    ctl = Controller(planner=FakePlanner(START, RESUME), recorder=rec, launcher=launcher, clock=FakeClock(),
                     policy=FailurePolicy(budgets={FailureClass.CRASHED: Budget(max_restarts=3, backoff_s=0.0)}))
    for _ in range(10):
        if ctl.state.terminal:
            break
        ctl.step()
    assert ctl.state is State.SUCCEEDED
    assert launcher.recorded_first == [True, True]


def _decide(policy: FailurePolicy, *failures: tuple[FailureClass, int]) -> list[Verdict]:
    return [policy.make_decision(Failure(cls=c, step=s, cause="c")).verdict for c, s in failures]


def _generous() -> FailurePolicy:
    return FailurePolicy(budgets={c: Budget(max_restarts=50, backoff_s=0.0) for c in FailureClass
                                  if c is not FailureClass.NONE}, loop_after=3)


def test_crash_loop_is_the_same_class_at_the_same_step() -> None:
    crashed = FailureClass.CRASHED
    assert _decide(_generous(), (crashed, 7), (crashed, 7), (crashed, 7)) == [Verdict.RETRY, Verdict.RETRY,
                                                                            Verdict.STOP]
    assert _decide(_generous(), (crashed, 7), (crashed, 8), (crashed, 9)) == [Verdict.RETRY] * 3  # progressing
    assert _decide(_generous(), (crashed, 7), (FailureClass.HUNG, 7), (crashed, 7)) == [Verdict.RETRY] * 3


def test_repeated_preemptions_at_one_step_are_not_a_crash_loop() -> None:
    policy = _generous()
    verdicts = _decide(policy, *[(FailureClass.PREEMPTED, 5)] * 6)
    assert verdicts == [Verdict.RETRY] * 6


def test_crash_loop_message_says_what_to_do() -> None:
    policy = _generous()
    _decide(policy, (FailureClass.HUNG, 2), (FailureClass.HUNG, 2))
    decision = policy.make_decision(Failure(cls=FailureClass.HUNG, step=2, cause="no step for 60s"))
    assert decision.verdict is Verdict.STOP
    assert decision.reason == ("crash loop: hung at step 2 3 times in a row (no step for 60s); fix the cause before "
                               "resubmitting")


@pytest.mark.parametrize("used", [1, 2, 3])
def test_budget_is_per_class(used: int) -> None:
    policy = FailurePolicy(budgets={FailureClass.CRASHED: Budget(max_restarts=used, backoff_s=0.0),
                                    FailureClass.PREEMPTED: Budget(max_restarts=50, backoff_s=0.0)})
    crashes = [(FailureClass.CRASHED, s) for s in range(used + 1)]
    preemptions = [(FailureClass.PREEMPTED, 100 + s) for s in range(5)]
    assert _decide(policy, *preemptions) == [Verdict.RETRY] * 5  # preemptions spend none of the crash budget
    assert _decide(policy, *crashes) == [Verdict.RETRY] * used + [Verdict.STOP]


def test_resume_holds_a_reader_lease_while_it_reads(tmp_path: Any) -> None:
    """Retention must see the checkpoint as in use for the whole read: resume() leases it, then lets go."""
    import torch

    import resumer
    from resumer import examples as ex
    from resumer import lease

    root = str(tmp_path)
    resumer.save_checkpoint(root, 1, ex.mlp_v1())
    seen: list[dict[str, Any]] = []

    def progress(_n: int) -> None:
        seen.append(lease.active_leases(root))

    model = ex.mlp_v1()
    with torch.no_grad():
        resumer.resume(root, model, progress=progress)
    assert seen and all(list(s) == ["step-0000000001"] for s in seen)
    assert lease.active_leases(root) == {}


def test_a_rank_that_plans_differently_from_the_controller_refuses_before_loading(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import torch

    import resumer
    import resumer.train
    from resumer import examples as ex
    from resumer.errors import CheckpointError

    monkeypatch.setattr(resumer.preemption, "install", lambda grace_s=30.0: True)  # no SIGTERM handler in pytest
    uri = resumer.save_checkpoint(str(tmp_path), 4, ex.mlp_v1())
    model = ex.mlp_v1()
    controller_plan = resumer.plan(uri, model, policy="partial")  # the controller planned under another policy
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setenv(resumer.train.ENV, json.dumps({
        "job": "j", "attempt": 2, "root": str(tmp_path), "storage_options": {}, "checkpoint": uri,
        "policy": "strict", "renames": [], "plan_hash": resumer.train.plan_hash(controller_plan), "every": 5}))
    with pytest.raises(CheckpointError, match="rank 0 planned .* differently from the controller"):
        resumer.train.restore(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    same = resumer.plan(uri, model, policy="strict")
    monkeypatch.setenv(resumer.train.ENV, json.dumps({
        "job": "j", "attempt": 2, "root": str(tmp_path), "storage_options": {}, "checkpoint": uri,
        "policy": "strict", "renames": [], "plan_hash": resumer.train.plan_hash(same), "every": 5}))
    assert resumer.train.restore(model) == 4
