"""The controller's step logic, driven one step at a time with fakes of its protocols."""

from __future__ import annotations

from resumer.core.controller import Controller, Observation, Observed, State
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.failures import Budget, Failure, FailurePolicy
from resumer.testing import FakeClock, FakeLauncher, FakePlanner, MemoryRecorder

START = Decision(job="j", attempt=1, outcome=Outcome.STARTED)
RESUME = Decision(job="j", attempt=2, outcome=Outcome.RESUMED, checkpoint="mem://r/step-0000000010", step=10)


def running(step: int, at: float) -> Observation:
    return Observation(status=Observed.RUNNING, step=step, reported_at=at)


def failed(cls: FailureClass, step: int, cause: str = "boom") -> Observation:
    return Observation(status=Observed.FAILED, failure=Failure(cls=cls, step=step, cause=cause))


def make(*obs: Observation, planner: FakePlanner | None = None, **kw: object) -> tuple[Controller, MemoryRecorder,
                                                                                      FakeLauncher, FakeClock]:
    clock, rec, launcher = FakeClock(), MemoryRecorder(), FakeLauncher(*obs)
    ctl = Controller(planner=planner or FakePlanner(START, RESUME), recorder=rec, launcher=launcher, clock=clock,
                     **kw)  # type: ignore[arg-type]
    return ctl, rec, launcher, clock


def test_start_run_finish_records_before_launch() -> None:
    ctl, rec, launcher, _ = make(running(5, 0.0), Observation(status=Observed.SUCCEEDED, step=20))
    r = ctl.step()
    assert (r.action, r.state, r.detail) == ("launch", State.RUNNING, "attempt 1: started")
    assert rec.events[0][0] == "decision" and launcher.launches == [rec.events[0][1]]
    assert ctl.step().detail == "running at step 5"
    r = ctl.step()
    assert (r.action, r.state) == ("finish", State.SUCCEEDED)
    assert rec.of("end") == [(1, "FINISHED")]


def test_crash_then_resume_and_time_to_recover() -> None:
    ctl, rec, launcher, clock = make(failed(FailureClass.CRASHED, 12), running(11, 5.0), running(12, 7.5))
    ctl.step()  # launch
    r = ctl.step()
    assert (r.action, r.state) == ("backoff", State.BACKOFF)
    assert rec.of("end") == [(1, "FAILED")]
    assert ctl.step().action == "wait"
    clock.advance(2.0)
    r = ctl.step()
    assert r.action == "launch" and r.decision is not None and r.decision.previous_failure is FailureClass.CRASHED
    assert r.decision.outcome is Outcome.RESUMED and r.decision.step == 10
    assert r.detail == "attempt 2: resumed from step 10"
    clock.advance(3.0)
    ctl.step()  # step 11 > resume step 10: the first training step after the resume
    assert rec.of("metrics") == [(2, {"time_to_recover_s": 5.0})]
    ctl.step()
    assert len(rec.of("metrics")) == 1  # measured once


def test_crash_loop_stops_before_the_budget_is_spent() -> None:
    policy = FailurePolicy(budgets={FailureClass.CRASHED: Budget(max_restarts=10, backoff_s=0)}, loop_after=3)
    ctl, rec, launcher, _ = make(failed(FailureClass.CRASHED, 7), policy=policy)
    states = [ctl.step().state for _ in range(8)]
    assert states[-1] is State.FAILED
    assert len(launcher.launches) == 3
    assert ctl.message.startswith("crash loop: crashed at step 7 3 times in a row")


def test_budget_spent() -> None:
    policy = FailurePolicy(budgets={FailureClass.CRASHED: Budget(max_restarts=2, backoff_s=0)}, loop_after=99)
    steps = iter(range(100))
    obs = [failed(FailureClass.CRASHED, next(steps)) for _ in range(5)]
    ctl, _, launcher, _ = make(*obs, policy=policy)
    results = []
    while not ctl.state.terminal:
        results.append(ctl.step())
    assert ctl.state is State.FAILED and len(launcher.launches) == 3
    assert (results[-1].action, results[-1].state) == ("give-up", State.FAILED)
    assert results[-1].detail == ctl.message
    assert "restart budget of 2 spent" in ctl.message


def test_hang_is_detected_killed_and_restarted() -> None:
    ctl, rec, launcher, clock = make(running(3, 0.0), hang_timeout_s=60.0)
    ctl.step()
    clock.advance(30)
    assert ctl.step().action == "observe"
    clock.advance(31)
    r = ctl.step()
    assert r.action == "backoff" and "hung" in r.detail
    assert launcher.stops == ["no step reported for 61s"]
    assert rec.of("end") == [(1, "KILLED")]


def test_preemption_is_killed_not_failed_and_retried() -> None:
    ctl, rec, launcher, clock = make(failed(FailureClass.PREEMPTED, 4, "SIGTERM"), running(5, 0))
    ctl.step()
    ctl.step()
    assert rec.of("end") == [(1, "KILLED")]
    clock.advance(10)
    assert ctl.step().decision.previous_failure is FailureClass.PREEMPTED  # type: ignore[union-attr]


def test_refused_plan_stops_without_launching() -> None:
    refused = Decision(job="j", attempt=1, outcome=Outcome.REFUSED, message="To resume: --rename auto")
    ctl, rec, launcher, _ = make(running(1, 0), planner=FakePlanner(refused))
    r = ctl.step()
    assert (r.action, r.state, r.detail) == ("refuse", State.REFUSED, "To resume: --rename auto")
    assert launcher.launches == []
    assert rec.of("decision")[0].outcome is Outcome.REFUSED and rec.of("end") == [(1, "FAILED")]
    assert ctl.step().action == "none"


def test_user_stop() -> None:
    ctl, rec, launcher, _ = make(running(1, 0))
    ctl.step()
    ctl.stop()
    assert ctl.state is State.STOPPED and launcher.stops == ["stopped by the user"]
    assert rec.of("end") == [(1, "KILLED")]


def test_startup_has_its_own_timeout() -> None:
    not_started = Observation(status=Observed.RUNNING, step=None, reported_at=None)
    ctl, _, launcher, clock = make(not_started, hang_timeout_s=10.0, startup_timeout_s=100.0)
    ctl.step()
    clock.advance(50)
    assert ctl.step().action == "observe"  # slow start is not a hang
    clock.advance(51)
    assert ctl.step().action == "backoff"
    assert launcher.stops == ["no first step within 101s of launch"]


def test_time_to_recover_after_a_crash_before_the_first_checkpoint() -> None:
    """The relaunch starts fresh (no step to resume from): its first reported step is the recovery."""
    ctl, rec, _, clock = make(failed(FailureClass.CRASHED, 3), running(1, 4.0), running(2, 5.0),
                              planner=FakePlanner(START))
    ctl.step()
    ctl.step()  # crashed
    clock.advance(2.0)
    r = ctl.step()
    assert r.action == "launch" and r.decision is not None and r.decision.step is None
    assert r.detail == "attempt 2: started"
    clock.advance(2.0)
    assert ctl.step().action == "observe"
    assert rec.of("metrics") == [(2, {"time_to_recover_s": 4.0})]
    ctl.step()
    assert len(rec.of("metrics")) == 1
