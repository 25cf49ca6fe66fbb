"""Run a job: the controller wired to the job's planner, recorder and Ray launcher."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from resumer.controller import Controller, State
from resumer.decision import Decision
from resumer.failures import FailurePolicy
from resumer.jobspec import JobSpec
from resumer.planner import JobPlanner

logger = logging.getLogger(__name__)


class LogRecorder:
    """A DecisionRecorder that logs (and keeps) decisions; the MLflow recorder replaces it when configured."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.ends: list[tuple[int, str]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def record_decision(self, decision: Decision) -> None:
        self.decisions.append(decision)
        logger.info("%s", decision.summary())

    def end_attempt(self, attempt: int, status: str) -> None:
        self.ends.append((attempt, status))

    def log_metrics(self, attempt: int, metrics: dict[str, float]) -> None:
        self.metrics.append((attempt, metrics))


@dataclass(slots=True)
class JobResult:
    state: State
    message: str
    attempts: int
    decisions: list[Decision] = field(default_factory=list)
    training_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "message": self.message, "attempts": self.attempts,
                "decisions": [d.to_dict() for d in self.decisions]}


def run_job(spec: JobSpec, *, address: str | None = None, timeout_s: float | None = None, recorder: Any = None,
            launcher: Any = None, num_cpus: int | None = None, poll_s: float = 0.5) -> JobResult:
    """Run ``spec`` to a terminal state on Ray (embedded local Ray unless ``address``)."""
    from resumer.ray_launcher import RayLauncher

    recorder = recorder or LogRecorder()
    launcher = launcher or RayLauncher(spec, address=address, num_cpus=num_cpus)
    controller = Controller(planner=JobPlanner(spec), recorder=recorder, launcher=launcher,
                            hang_timeout_s=spec.hang_timeout_s, policy=FailurePolicy(budgets=dict(spec.budgets)))
    decisions: list[Decision] = []
    started = controller.clock()
    try:
        while not controller.state.terminal:
            result = controller.step()
            if result.decision is not None:
                decisions.append(result.decision)
            if result.action in ("observe", "wait"):
                time.sleep(poll_s)
            elif result.action != "none":
                logger.info("[controller] %s: %s", result.action, result.detail)
            if timeout_s is not None and controller.clock() - started > timeout_s:
                controller.stop(f"timed out after {timeout_s}s")
    finally:
        if hasattr(launcher, "shutdown"):
            launcher.shutdown()
    return JobResult(state=controller.state, message=controller.message, attempts=controller.attempt,
                     decisions=decisions, training_metrics=list(getattr(launcher, "last_metrics", [])))
