"""Reading a job's record back from MLflow: its attempts and their decisions (``resumer history``).

The recorder (``resumer.tracking.recorder``) writes one parent run per job and one child run per attempt; this
module finds the parent by the job's name and lists the children, oldest first.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

from resumer.core.errors import ResumerError, UsageError
from resumer.tracking.base import configure_mlflow_env, default_tracking_uri, sqlite_path, validate_job
from resumer.tracking.mlflow_ops import KIND_TAG, classify
from resumer.tracking.spool import PERMANENT

COUNT_KEYS = ("loaded", "renamed", "fresh", "dropped", "optimizer_carried", "optimizer_fresh")


class TrackingUnavailable(ResumerError):
    """The MLflow tracking server could not be reached (or answered with an error that may pass)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRecord:
    """One attempt as recorded: its decision (tags), plan counts (metrics) and how its run ended."""

    attempt: int
    run_id: str
    start_time: str | None
    end_time: str | None
    status: str
    outcome: str
    previous_failure: str
    policy: str
    checkpoint: str | None
    step: int | None
    committed_step: int | None
    code_changed: bool
    world_size_before: int | None
    world_size_after: int | None
    counts: dict[str, int] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobHistory:
    job: str
    run_id: str
    status: str
    tracking_uri: str
    experiment: str
    params: dict[str, str]
    attempts: tuple[AttemptRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "run_id": self.run_id, "status": self.status, "tracking_uri": self.tracking_uri,
                "experiment": self.experiment, "params": dict(self.params),
                "attempts": [a.to_dict() for a in self.attempts]}


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _attempt(run: Any) -> AttemptRecord:
    tags, metrics = run.data.tags, run.data.metrics
    return AttemptRecord(
        attempt=_int(tags.get("resumer.attempt")) or 0, run_id=run.info.run_id,
        start_time=_iso(run.info.start_time), end_time=_iso(run.info.end_time), status=run.info.status,
        outcome=tags.get("resumer.outcome", "?"), previous_failure=tags.get("resumer.previous_failure", "none"),
        policy=tags.get("resumer.policy", "?"), checkpoint=tags.get("resumer.checkpoint"),
        step=_int(tags.get("resumer.step")), committed_step=_int(tags.get("resumer.committed_step")),
        code_changed=tags.get("resumer.code_changed") == "true",
        world_size_before=_int(tags.get("resumer.world_size_before")),
        world_size_after=_int(tags.get("resumer.world_size_after")),
        counts={k: int(metrics[f"plan_{k}"]) for k in COUNT_KEYS if f"plan_{k}" in metrics},
        message=tags.get("resumer.message", ""))


_REASONS = ("Connection refused", "Read timed out", "timed out", "Name or service not known",
            "Temporary failure in name resolution", "Connection reset", "Connection aborted", "too many 5")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for reason in _REASONS:
        if reason in text:
            return reason.lower().replace("too many 5", "server errors (5xx)")
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _unreachable(uri: str, exc: BaseException) -> TrackingUnavailable:
    detail = _reason(exc)
    return TrackingUnavailable(
        f"Cannot read the history from the MLflow tracking server at {uri}: it did not answer ({detail}). "
        "Check that the server is running and that --tracking-uri (or MLFLOW_TRACKING_URI) points at it, then "
        "retry; records made while it was away are still in the recorder's spool and appear once it is back.")


def read_history(job: str, *, tracking_uri: str | None = None, experiment: str = "resumer") -> JobHistory:
    """The job's parent run and its attempts, oldest first.

    Raises:
        UsageError: no such tracking database, experiment or job (the message lists the jobs there are).
        TrackingUnavailable: the tracking server did not answer.
    """
    validate_job(job)
    configure_mlflow_env()
    uri = tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not os.path.exists(db):  # reading must not create an empty database
        raise UsageError(f"No MLflow tracking database at {db}: nothing has been recorded there. "
                         "Pass --tracking-uri (or set MLFLOW_TRACKING_URI) to where the job recorded.")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise UsageError(f"No MLflow experiment {experiment!r} at {uri}: nothing has been recorded there. "
                             "Check --experiment and --tracking-uri.")
        parents = client.search_runs([exp.experiment_id], max_results=1,
                                     filter_string=f"tags.`{KIND_TAG}` = 'job' and tags.`resumer.jobs.run` = '{job}'")
        if not parents:
            known = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'job'",
                                       max_results=20, order_by=["attributes.start_time DESC"])
            names = ", ".join(sorted(r.data.tags.get("resumer.jobs.run", "?") for r in known)) or "none"
            raise UsageError(f"No job {job!r} recorded in experiment {experiment!r} at {uri}. "
                             f"Jobs recorded there: {names}.")
        parent = parents[0]
        children = client.search_runs([exp.experiment_id], max_results=5000,
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified: unreachable -> TrackingUnavailable, else re-raised
        if classify(exc) == PERMANENT:
            raise
        raise _unreachable(uri, exc) from exc
    ordered = sorted(children, key=lambda r: (r.info.start_time or 0, _int(r.data.tags.get("resumer.attempt")) or 0))
    attempts = [_attempt(r) for r in ordered]
    return JobHistory(job=job, run_id=parent.info.run_id, status=parent.info.status, tracking_uri=uri,
                      experiment=experiment, params=dict(parent.data.params), attempts=tuple(attempts))
