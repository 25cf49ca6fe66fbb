"""Failure classes, their budgets and backoff, and crash-loop detection. Pure: decides, never acts.

Like Ray Train V2's ``FailurePolicy.make_decision``: the controller reports what happened and gets
back what to do; it performs the action itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from resumer.core.decision import FailureClass
from resumer.core.errors import UsageError


class Verdict(str, enum.Enum):
    RETRY = "retry"  # relaunch after ``delay_s``
    STOP = "stop"  # give up: budget spent, crash loop, or refused


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """How many restarts a failure class may use, and the backoff between them."""

    max_restarts: int
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise UsageError("retry budgets and backoff must be >= 0")

    def delay(self, used: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, used - 1))


DEFAULT_BUDGETS = {
    FailureClass.PREEMPTED: Budget(max_restarts=20, backoff_s=1.0),
    FailureClass.CRASHED: Budget(max_restarts=5, backoff_s=2.0),
    FailureClass.HUNG: Budget(max_restarts=2, backoff_s=2.0),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One attempt's end: its class, the last step it reported, and a one-line cause."""

    cls: FailureClass
    step: int | None
    cause: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureDecision:
    verdict: Verdict
    delay_s: float = 0.0
    reason: str = ""


@dataclass(slots=True)
class FailurePolicy:
    """Per-class budgets plus crash-loop detection (the same failure at the same step, ``loop_after`` times)."""

    budgets: dict[FailureClass, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    loop_after: int = 3
    used: dict[FailureClass, int] = field(default_factory=dict)
    history: list[Failure] = field(default_factory=list)

    def make_decision(self, failure: Failure) -> FailureDecision:
        self.history.append(failure)
        budget = self.budgets.get(failure.cls)
        if budget is None:
            return FailureDecision(verdict=Verdict.STOP, reason=f"{failure.cls.value}: not retried")
        streak = 0  # the same class at the same step, consecutively, ending with this one
        for f in reversed(self.history):
            if f.cls is not failure.cls or f.step != failure.step:
                break
            streak += 1
        if failure.cls is not FailureClass.PREEMPTED and streak >= self.loop_after:
            return FailureDecision(verdict=Verdict.STOP, reason=(
                f"crash loop: {failure.cls.value} at step {failure.step} {streak} times in a row "
                f"({failure.cause}); fix the cause before resubmitting"))
        used = self.used.get(failure.cls, 0) + 1
        if used > budget.max_restarts:
            return FailureDecision(verdict=Verdict.STOP, reason=(
                f"{failure.cls.value}: restart budget of {budget.max_restarts} spent ({failure.cause})"))
        self.used[failure.cls] = used
        return FailureDecision(verdict=Verdict.RETRY, delay_s=budget.delay(used),
                               reason=f"{failure.cls.value} ({failure.cause}): restart {used}/{budget.max_restarts}")
