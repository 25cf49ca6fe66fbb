"""Run a job: the controller wired to the job's planner, its MLflow recorder and the Ray launcher.

The recorder is ``resumer.MlflowRecorder`` on the job spec's ``mlflow`` section (default: the embedded
SQLite store under ``$RESUMER_HOME``). It gets the job (parent run, params), every decision before its
attempt launches (child run: tags, metrics, plan artifacts), the training points and checkpoint commits
the workers report (relayed by the launcher as it observes them, before it reports the attempt's end),
how each attempt ended, and how the job ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resumer.core.controller import Controller, State
from resumer.core.decision import Decision
from resumer.core.failures import FailurePolicy
from resumer.jobs.planner import JobPlanner
from resumer.jobs.spec import JobSpec

logger = logging.getLogger(__name__)

# How a job's parent run ends, by the controller's final state.
JOB_STATUS = {State.SUCCEEDED: "FINISHED", State.FAILED: "FAILED", State.REFUSED: "FAILED",
              State.STOPPED: "KILLED"}


class LogRecorder:
    """A recorder that logs (and keeps) what it is given, for runs without MLflow (tests, ``--no-mlflow``)."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.ends: list[tuple[int, str]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.training: list[tuple[int, dict[str, float]]] = []
        self.commits: list[int] = []

    def record_decision(self, decision: Decision) -> None:
        self.decisions.append(decision)
        logger.info("%s", decision.summary())

    def end_attempt(self, attempt: int, status: str) -> None:
        self.ends.append((attempt, status))

    def log_attempt_metrics(self, metrics: Mapping[str, float]) -> None:
        self.metrics.append((self.decisions[-1].attempt if self.decisions else 0, dict(metrics)))

    def log_training(self, step: int, metrics: Mapping[str, float]) -> None:
        self.training.append((step, dict(metrics)))

    def checkpoint_committed(self, step: int) -> None:
        self.commits.append(step)


@dataclass(slots=True)
class JobResult:
    state: State
    message: str
    attempts: int
    decisions: list[Decision] = field(default_factory=list)
    training_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    tracking_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "message": self.message, "attempts": self.attempts,
                "tracking_uri": self.tracking_uri, "decisions": [d.to_dict() for d in self.decisions]}


def job_params(spec: JobSpec) -> dict[str, Any]:
    """The job's parent-run params (storage options left out: they may hold secrets)."""
    d = spec.to_dict()
    config = d.pop("config") or {}
    return {**d, **{f"config.{k}": v for k, v in config.items()}}


def run_job(spec: JobSpec, *, address: str | None = None, timeout_s: float | None = None, recorder: Any = None,
            launcher: Any = None, num_cpus: int | None = None, poll_s: float = 0.5) -> JobResult:
    """Run ``spec`` to a terminal state on Ray (embedded local Ray unless ``address``).

    ``recorder`` defaults to an ``MlflowRecorder`` on the spec's tracking URI and experiment (closed here);
    pass a ``LogRecorder`` to run without MLflow.
    """
    from resumer.jobs.launcher import RayLauncher

    own = recorder is None
    if own:
        from resumer.tracking.recorder import MlflowRecorder

        recorder = MlflowRecorder(spec.tracking_uri, spec.experiment)
    if hasattr(recorder, "start_job"):
        recorder.start_job(spec.name, params=job_params(spec))
    launcher = launcher or RayLauncher(spec, address=address, num_cpus=num_cpus)
    if hasattr(launcher, "progress") and launcher.progress is None:
        launcher.progress = recorder  # training points and commits, relayed as the launcher observes them
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
        if hasattr(recorder, "end_job"):
            recorder.end_job(JOB_STATUS.get(controller.state, "KILLED"), job=spec.name)
        if own:
            recorder.close()
    return JobResult(state=controller.state, message=controller.message, attempts=controller.attempt,
                     decisions=decisions, training_metrics=list(getattr(launcher, "last_metrics", [])),
                     tracking_uri=getattr(recorder, "tracking_uri", None))
