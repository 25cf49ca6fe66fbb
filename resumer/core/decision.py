"""Decision: what was decided for one attempt of a training job, and why. Pure values.

The orchestrator makes one per attempt (first start or resume) and records it (MLflow) BEFORE training
relaunches; ``resumer history`` reads them back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from resumer.core.plan import Plan


class Outcome(str, enum.Enum):
    STARTED = "started"  # first attempt, nothing to resume
    RESUMED = "resumed"  # a checkpoint was planned and applied
    REFUSED = "refused"  # the plan was refused: the job stops, the record says what to change
    FRESH_START = "fresh-start"  # no valid checkpoint (all torn/corrupt/unhealthy): training starts over


class FailureClass(str, enum.Enum):
    PREEMPTED = "preempted"  # SIGTERM or node loss
    CRASHED = "crashed"  # an exception or a killed worker
    HUNG = "hung"  # no step reported within the timeout
    CODE_CHANGED = "code-changed"  # resubmitted with different code
    NONE = "none"  # first attempt


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """One attempt's decision. ``metrics`` are numbers (plan time, bytes read, counts...)."""

    job: str
    attempt: int
    outcome: Outcome
    previous_failure: FailureClass = FailureClass.NONE
    policy: str = "strict"
    checkpoint: str | None = None
    step: int | None = None
    code_fingerprint: str | None = None
    code_changed: bool = False
    world_size_before: int | None = None
    world_size_after: int | None = None
    plan: Plan | None = None
    rejected: tuple[dict[str, Any], ...] = ()  # candidates passed over: {"uri", "step", "reason"}
    message: str = ""  # for a refusal: what to change
    metrics: dict[str, float] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        """Per-attempt values as MLflow tags (params never change within a run)."""
        t = {
            "resumer.jobs.run": self.job,
            "resumer.attempt": str(self.attempt),
            "resumer.outcome": self.outcome.value,
            "resumer.previous_failure": self.previous_failure.value,
            "resumer.policy": self.policy,
            "resumer.code_changed": str(self.code_changed).lower(),
        }
        optional = {"resumer.checkpoint": self.checkpoint, "resumer.step": self.step,
                    "resumer.code_fingerprint": self.code_fingerprint,
                    "resumer.world_size_before": self.world_size_before,
                    "resumer.world_size_after": self.world_size_after}
        t.update({k: str(v) for k, v in optional.items() if v is not None})
        return t

    def all_metrics(self) -> dict[str, float]:
        """The decision's metrics plus the plan's counts (loaded, renamed, fresh, dropped, optimizer...)."""
        out = {"attempt": float(self.attempt), **{k: float(v) for k, v in self.metrics.items()}}
        if self.plan is not None:
            out.update({f"plan_{k}": float(v) for k, v in self.plan.counts().items()})
        return out

    def summary(self) -> str:
        """One greppable line, e.g. ``[decision] job=x attempt=3 resumed step=1200 policy=strict (crashed)``."""
        where = f" step={self.step}" if self.step is not None else ""
        return (f"[decision] job={self.job} attempt={self.attempt} {self.outcome.value}{where} "
                f"policy={self.policy} (previous: {self.previous_failure.value})")

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "attempt": self.attempt, "outcome": self.outcome.value,
                "previous_failure": self.previous_failure.value, "policy": self.policy,
                "checkpoint": self.checkpoint, "step": self.step, "code_fingerprint": self.code_fingerprint,
                "code_changed": self.code_changed, "world_size_before": self.world_size_before,
                "world_size_after": self.world_size_after,
                "plan": None if self.plan is None else self.plan.to_dict(), "rejected": list(self.rejected),
                "message": self.message, "metrics": dict(self.metrics)}
