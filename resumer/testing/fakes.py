"""Fakes of the controller's protocols (``resumer.core.controller``: planner, recorder, launcher, clock), for
driving it one ``step()`` at a time, and the one recorder fake, ``MemoryRecorder``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resumer.core.decision import Decision
from resumer.tracking.base import RunStatus


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FakePlanner:
    """Returns the decisions it is given, one per attempt (the last one repeats); records what it was asked."""

    def __init__(self, *decisions: Any) -> None:
        self.decisions = list(decisions)
        self.asked: list[tuple[int, Any]] = []

    def decide(self, attempt: int, previous: Any) -> Any:
        import dataclasses

        self.asked.append((attempt, previous))
        d = self.decisions[min(attempt - 1, len(self.decisions) - 1)]
        return dataclasses.replace(d, attempt=attempt, previous_failure=previous)


class FakeLauncher:
    """Plays back scripted observations; ``launches`` and ``stops`` record what the controller did."""

    def __init__(self, *observations: Any) -> None:
        self.script = list(observations)
        self.launches: list[Any] = []
        self.stops: list[str] = []

    def launch(self, decision: Any) -> None:
        self.launches.append(decision)

    def poll(self) -> Any:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def stop(self, reason: str) -> None:
        self.stops.append(reason)


@dataclass
class MemoryRecorder:
    """The one recorder fake: a ``Recorder`` (and the controller's ``DecisionRecorder``) that keeps every call in
    memory: ``calls`` in order, plus views for assertions (``of("decision" | "end" | "metrics")``)."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    training: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)
    ended: dict[int, RunStatus] = field(default_factory=dict)
    job_status: RunStatus | None = None
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (attempt, metrics)
    ends: list[tuple[int, RunStatus]] = field(default_factory=list)  # (attempt, status), in order

    def _note(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def start_job(self, job: str, params: Mapping[str, Any] | None = None) -> None:
        self._note("start_job", job, dict(params or {}))

    def record_decision(self, decision: Decision) -> None:
        self._note("record_decision", decision)
        self.decisions.append(decision)

    def log_attempt_metrics(self, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        self._note("log_attempt_metrics", dict(metrics), job=job)
        self.metrics.append((self.decisions[-1].attempt if self.decisions else 0, dict(metrics)))

    def log_training(self, step: int, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        self.training.append((step, dict(metrics)))

    def checkpoint_committed(self, step: int, *, job: str | None = None) -> None:
        self._note("checkpoint_committed", step, job=job)
        self.commits.append(step)

    def end_attempt(self, attempt: int, status: RunStatus | str, *, job: str | None = None) -> None:
        self._note("end_attempt", attempt, status, job=job)
        self.ended[attempt] = RunStatus.parse(status)
        self.ends.append((attempt, self.ended[attempt]))

    def close_stale_attempts(self, job: str) -> None:
        self._note("close_stale_attempts", job)

    def end_job(self, status: RunStatus | str, *, job: str | None = None) -> None:
        self._note("end_job", status, job=job)
        self.job_status = RunStatus.parse(status)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        self._note("close")

    @property
    def events(self) -> list[tuple[str, Any]]:
        """``("decision", d)``, ``("end", (attempt, status))`` and ``("metrics", (attempt, metrics))``, in order."""
        out: list[tuple[str, Any]] = []
        decisions, ends, metrics = iter(self.decisions), iter(self.ends), iter(self.metrics)
        for name, _, _ in self.calls:
            if name == "record_decision":
                out.append(("decision", next(decisions)))
            elif name == "end_attempt":
                out.append(("end", next(ends)))
            elif name == "log_attempt_metrics":
                out.append(("metrics", next(metrics)))
        return out

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.events if k == kind]
