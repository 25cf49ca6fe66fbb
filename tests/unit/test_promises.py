"""Safety rules of the controller and the failure policy, each pinned so that breaking it fails a test."""

from __future__ import annotations

from typing import Any

import pytest

from resumer.core.controller import Controller, Observation, Observed, State
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.failures import Budget, Failure, FailurePolicy, Verdict
from resumer.testing import FakeClock, FakeLauncher, FakePlanner, MemoryRecorder

START = Decision(job="j", attempt=1, outcome=Outcome.STARTED)
RESUME = Decision(job="j", attempt=2, outcome=Outcome.RESUMED, checkpoint="mem://r/step-0000000010", step=10)


class OrderCheckingLauncher(FakeLauncher):
    """Notes, at each launch, whether that very decision had already been recorded."""

    def __init__(self, recorder: MemoryRecorder, *observations: Observation) -> None:
        super().__init__(*observations)
        self.recorder = recorder
        self.recorded_first: list[bool] = []

    def launch(self, decision: Any) -> None:
        self.recorded_first.append(any(d is decision for d in self.recorder.of("decision")))
        super().launch(decision)


def test_every_attempt_is_recorded_before_it_launches() -> None:
    rec = MemoryRecorder()
    crash = Observation(status=Observed.FAILED, failure=Failure(cls=FailureClass.CRASHED, step=3, cause="x"))
    launcher = OrderCheckingLauncher(rec, crash, Observation(status=Observed.RUNNING, step=4, reported_at=0.0),
                                     Observation(status=Observed.SUCCEEDED, step=9))
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
    from resumer.checkpoints import lease
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
    import dataclasses
    import os

    import torch

    import resumer
    import resumer.jobs.worker
    from resumer import examples as ex
    from resumer.core.errors import CheckpointError
    from resumer.core.plan import Policy
    from resumer.jobs.attempt import ENV, AttemptConfig

    monkeypatch.setattr(resumer.jobs.preemption, "install", lambda grace_s=30.0: True)  # no SIGTERM handler in pytest
    uri = resumer.save_checkpoint(str(tmp_path), 4, ex.mlp_v1())
    model = ex.mlp_v1()
    controller_plan = resumer.plan(uri, model, policy="partial")  # the controller planned under another policy
    before = [p.detach().clone() for p in model.parameters()]
    attempt = AttemptConfig(job="j", attempt=2, root=str(tmp_path), model="resumer.examples:mlp_v1", every=5,
                            checkpoint=uri, policy=Policy.STRICT, plan_hash=controller_plan.digest())
    monkeypatch.setenv(ENV, attempt.to_json())
    with pytest.raises(CheckpointError, match="rank 0: .*planned .* differently from the controller"):
        resumer.jobs.worker.restore(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert not os.path.exists(os.path.join(uri, "quarantine.json"))  # a plan that differs is no corrupt checkpoint
    same = resumer.plan(uri, model, policy="strict")
    monkeypatch.setenv(ENV, dataclasses.replace(attempt, plan_hash=same.digest()).to_json())
    assert resumer.jobs.worker.restore(model) == 4


def test_resume_with_another_process_plan_digest_refuses_before_reading(tmp_path: Any) -> None:
    import torch

    import resumer
    from resumer import examples as ex
    from resumer.core.errors import CheckpointError

    saved = ex.mlp_v1()
    uri = resumer.save_checkpoint(str(tmp_path), 4, saved)
    model = ex.mlp_v1()
    other = resumer.plan(uri, model, policy="partial")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="differently from the controller"):
        resumer.resume(uri, model, policy="strict", expect_plan=other.digest())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert resumer.resume(uri, model, expect_plan=resumer.plan(uri, model).digest()).step == 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved.parameters(), strict=True))


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    budget = Budget(max_restarts=9, backoff_s=1.5, max_backoff_s=20.0)
    assert [budget.delay(n) for n in range(0, 7)] == [1.5, 1.5, 3.0, 6.0, 12.0, 20.0, 20.0]


def test_zero_budgets_and_backoff_are_allowed() -> None:
    """'>= 0': no restarts, or restarts at once (a backoff capped at 0 s), are budgets a job may ask for."""
    assert [Budget(max_restarts=3, backoff_s=0.0, max_backoff_s=0.0).delay(n) for n in range(3)] == [0.0] * 3
    assert Budget(max_restarts=0).max_restarts == 0


@pytest.mark.parametrize("field", ["max_restarts", "backoff_s", "max_backoff_s"])
def test_negative_budgets_are_refused(field: str) -> None:
    from resumer.core.errors import UsageError

    kw: dict[str, Any] = {"max_restarts": 1, "backoff_s": 1.0, "max_backoff_s": 2.0, field: -1}
    with pytest.raises(UsageError, match="retry budgets and backoff must be >= 0"):
        Budget(**kw)


def test_a_class_without_a_budget_is_not_retried_and_decisions_say_why() -> None:
    policy = FailurePolicy(budgets={FailureClass.CRASHED: Budget(max_restarts=2, backoff_s=4.0)})
    hung = policy.make_decision(Failure(cls=FailureClass.HUNG, step=1, cause="x"))
    assert (hung.verdict, hung.reason) == (Verdict.STOP, "hung: not retried")
    first = policy.make_decision(Failure(cls=FailureClass.CRASHED, step=1, cause="boom"))
    assert (first.verdict, first.delay_s, first.reason) == (Verdict.RETRY, 4.0, "crashed (boom): restart 1/2")
    second = policy.make_decision(Failure(cls=FailureClass.CRASHED, step=2, cause="bang"))
    assert (second.verdict, second.delay_s) == (Verdict.RETRY, 8.0)
    third = policy.make_decision(Failure(cls=FailureClass.CRASHED, step=3, cause="again"))
    assert (third.verdict, third.reason) == (Verdict.STOP, "crashed: restart budget of 2 spent (again)")


def _controller(*obs: Observation, **kw: Any) -> tuple[Controller, MemoryRecorder, FakeLauncher, FakeClock]:
    clock, rec, launcher = FakeClock(), MemoryRecorder(), FakeLauncher(*obs)
    ctl = Controller(planner=FakePlanner(START, RESUME), recorder=rec, launcher=launcher, clock=clock, **kw)
    return ctl, rec, launcher, clock


def test_a_hang_is_timed_from_the_last_step_report_not_the_launch() -> None:
    ctl, _, launcher, clock = _controller(Observation(status=Observed.RUNNING, step=3, reported_at=50.0),
                                          hang_timeout_s=60.0)
    ctl.step()  # launch at t=0
    clock.advance(110)  # 110 s after the launch, 60 s after the last report: not hung yet
    r = ctl.step()
    assert (r.action, r.detail) == ("observe", "running at step 3") and launcher.stops == []
    clock.advance(1)
    r = ctl.step()
    assert r.action == "backoff" and launcher.stops == ["no step reported for 61s"]


def test_hangs_at_one_step_are_a_crash_loop() -> None:
    """A hung attempt's failure carries the step it hung at, so three hangs there stop the job."""
    ctl, _, launcher, clock = _controller(Observation(status=Observed.RUNNING, step=3, reported_at=0.0),
                                          hang_timeout_s=10.0,
                                          policy=FailurePolicy(budgets={FailureClass.HUNG: Budget(
                                              max_restarts=9, backoff_s=0.0)}))
    results = []
    for _ in range(12):
        if ctl.state.terminal:
            break
        clock.advance(11)
        results.append(ctl.step())
    assert ctl.state is State.FAILED and len(launcher.launches) == 3
    assert results[-1].action == "give-up"
    assert results[-1].detail.startswith("crash loop: hung at step 3 3 times in a row (no step reported for ")


def test_time_to_recover_is_from_the_failure_to_the_first_new_step() -> None:
    crash = Observation(status=Observed.FAILED, failure=Failure(cls=FailureClass.CRASHED, step=12, cause="x"))
    ctl, rec, _, clock = _controller(Observation(status=Observed.RUNNING, step=12, reported_at=0.0), crash,
                                     Observation(status=Observed.RUNNING, step=10, reported_at=4.0),
                                     Observation(status=Observed.RUNNING, step=11, reported_at=7.5),
                                     policy=FailurePolicy(budgets={FailureClass.CRASHED: Budget(
                                         max_restarts=3, backoff_s=2.0)}))
    ctl.step()  # launch
    ctl.step()  # running at 12
    clock.advance(1)
    assert ctl.step().action == "backoff"  # failed at t=1
    clock.advance(2)
    assert ctl.step().action == "launch"  # resumes from step 10 (RESUME)
    clock.advance(3)
    ctl.step()  # step 10 is the checkpoint's own step: not a new one
    assert [m for _, m in rec.of("metrics")] == []
    clock.advance(3)
    ctl.step()  # step 11 at t=9: the first new step, 8 s after the failure at t=1
    assert [m for _, m in rec.of("metrics")] == [{"time_to_recover_s": 8.0}]


def test_an_emergency_save_on_a_step_another_rank_committed_is_still_a_preemption(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cadence step, rank 0's regular save may commit first: the notified rank resumes from that one,
    and the attempt ends as a preemption, not as a crash."""
    import resumer
    import resumer.jobs.worker
    from resumer import examples as ex
    from resumer.core.errors import Preempted
    from resumer.jobs.attempt import ENV, AttemptConfig

    root = str(tmp_path)
    model = ex.mlp_v1()
    committed = resumer.save_checkpoint(root, 5, model)  # rank 0's cadence save of step 5 landed first
    monkeypatch.setenv(ENV, AttemptConfig(job="j", attempt=1, root=root, model="resumer.examples:mlp_v1",
                                          every=5).to_json())
    monkeypatch.setattr(resumer.jobs.preemption, "noticed", lambda: 1.0)
    with pytest.raises(Preempted) as err:
        resumer.jobs.worker.save(5, model)
    assert err.value.step == 5 and err.value.uri == committed
