"""The job controller: one ``step()`` = observe -> decide -> record -> act, returning what it did.

The controller owns no IO of its own. It reaches the world through three small protocols — a
``Planner`` (select a checkpoint and plan it against the current code), a ``DecisionRecorder`` (MLflow)
and a ``Launcher`` (Ray Train workers) — so tests drive it one step at a time with fakes
(``resumer.testing``) and production wires in the real ones.

Order of side effects, and why: the decision is RECORDED before anything is launched, so every
attempt that ran has a record; a refused plan stops the job before any accelerator time is spent.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.failures import Failure, FailurePolicy, Verdict

logger = logging.getLogger(__name__)


class Observed(str, enum.Enum):
    """What the launcher sees of the running attempt (not an MLflow run's status: that is
    ``resumer.tracking.base.RunStatus``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What the launcher sees: running (with the last step and when it was reported), done, or failed."""

    status: Observed
    step: int | None = None
    reported_at: float | None = None  # clock() time of the last step report
    failure: Failure | None = None


class Planner(Protocol):
    def decide(self, attempt: int, previous: FailureClass) -> Decision: ...


class DecisionRecorder(Protocol):
    """What the controller records; ``resumer.tracking.recorder.MlflowRecorder`` is one (its job's calls, job=None)."""

    def record_decision(self, decision: Decision) -> None: ...
    def end_attempt(self, attempt: int, status: str) -> None: ...
    def log_attempt_metrics(self, metrics: dict[str, float]) -> None: ...  # to the current attempt


class Launcher(Protocol):
    def launch(self, decision: Decision) -> None: ...
    def poll(self) -> Observation: ...
    def stop(self, reason: str) -> None: ...


class State(str, enum.Enum):
    READY = "ready"  # next: decide, record, launch
    RUNNING = "running"
    BACKOFF = "backoff"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # budget spent or crash loop
    REFUSED = "refused"  # the plan was refused: the record says what to change
    STOPPED = "stopped"  # stopped by the user

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.REFUSED, State.STOPPED)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """What one controller step did: the action taken, the state after it, and a sentence why."""

    action: str
    state: State
    detail: str = ""
    decision: Decision | None = None


@dataclass(slots=True)
class Controller:
    planner: Planner
    recorder: DecisionRecorder
    launcher: Launcher
    hang_timeout_s: float = 300.0
    startup_timeout_s: float = 900.0  # before the first step report: workers start, data loads, restore reads
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    clock: Callable[[], float] = time.monotonic
    state: State = State.READY
    attempt: int = 0
    previous: FailureClass = FailureClass.NONE
    decision: Decision | None = None
    message: str = ""
    _backoff_until: float = 0.0
    _started_at: float = 0.0
    _failed_at: float | None = None
    _recovered: bool = True

    def step(self) -> StepResult:
        if self.state.terminal:
            return StepResult(action="none", state=self.state, detail=self.message)
        if self.state is State.BACKOFF:
            if self.clock() < self._backoff_until:
                return StepResult(action="wait", state=self.state,
                                  detail=f"backoff {self._backoff_until - self.clock():.1f}s more")
            self.state = State.READY
        if self.state is State.READY:
            return self._start_attempt()
        return self._observe()

    def _start_attempt(self) -> StepResult:
        self.attempt += 1
        decision = self.planner.decide(self.attempt, self.previous)
        self.decision = decision
        # Record BEFORE launching: every attempt that runs has a record, a refused one costs nothing.
        self.recorder.record_decision(decision)
        logger.info("%s", decision.summary())
        if decision.outcome is Outcome.REFUSED:
            self.state, self.message = State.REFUSED, decision.message
            self.recorder.end_attempt(self.attempt, "FAILED")
            return StepResult(action="refuse", state=self.state, detail=decision.message, decision=decision)
        self.launcher.launch(decision)
        self.state = State.RUNNING
        self._started_at = self.clock()
        self._recovered = self._failed_at is None
        return StepResult(action="launch", state=self.state, decision=decision,
                          detail=f"attempt {self.attempt}: {decision.outcome.value}"
                                 + (f" from step {decision.step}" if decision.step is not None else ""))

    def _observe(self) -> StepResult:
        obs = self.launcher.poll()
        now = self.clock()
        if obs.status is Observed.RUNNING:
            start_step = self.decision.step if self.decision and self.decision.step is not None else 0
            if not self._recovered and obs.step is not None and obs.step > start_step and self._failed_at is not None:
                self._recovered = True
                self.recorder.log_attempt_metrics({"time_to_recover_s": now - self._failed_at})
                self._failed_at = None
            started = obs.reported_at is None
            last = self._started_at if obs.reported_at is None else obs.reported_at
            limit = self.startup_timeout_s if started else self.hang_timeout_s
            if now - last > limit:
                cause = (f"no first step within {now - last:.0f}s of launch" if started
                         else f"no step reported for {now - last:.0f}s")
                self.launcher.stop(cause)
                return self._failed(Failure(cls=FailureClass.HUNG, step=obs.step, cause=cause), "KILLED")
            return StepResult(action="observe", state=self.state, detail=f"running at step {obs.step}")
        if obs.status is Observed.SUCCEEDED:
            self.state = State.SUCCEEDED
            self.recorder.end_attempt(self.attempt, "FINISHED")
            return StepResult(action="finish", state=self.state, detail=f"finished at step {obs.step}")
        assert obs.failure is not None
        return self._failed(obs.failure, "FAILED")

    def _failed(self, failure: Failure, status: str) -> StepResult:
        self._failed_at = self.clock()
        self.recorder.end_attempt(self.attempt, "KILLED" if failure.cls is FailureClass.PREEMPTED else status)
        verdict = self.policy.make_decision(failure)
        self.previous = failure.cls
        if verdict.verdict is Verdict.STOP:
            self.state, self.message = State.FAILED, verdict.reason
            return StepResult(action="give-up", state=self.state, detail=verdict.reason)
        self.state = State.BACKOFF
        self._backoff_until = self.clock() + verdict.delay_s
        return StepResult(action="backoff", state=self.state,
                          detail=f"{verdict.reason}; retry in {verdict.delay_s:.1f}s")

    def stop(self, reason: str = "stopped by the user") -> None:
        if self.state is State.RUNNING:
            self.launcher.stop(reason)
            self.recorder.end_attempt(self.attempt, "KILLED")
        self.state, self.message = State.STOPPED, reason
