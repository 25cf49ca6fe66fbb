"""Where and how a job's records go: the ``Recorder`` protocol, run statuses, the embedded tracking store.

``resumer.tracking.recorder.MlflowRecorder`` implements ``Recorder``; ``resumer.testing.mlflow.MemoryRecorder`` is its
in-memory fake. The embedded default is a SQLite store under ``$RESUMER_HOME`` (``~/.resumer``), no server.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from resumer.core.decision import Decision
from resumer.core.errors import UsageError

# The recorder must never hold training up: one quick try per request, then the spool takes over.
# Set only when the user has not set them (they apply to every MLflow client in this process).
logger = logging.getLogger(__name__)

MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                     "MLFLOW_DISABLE_TELEMETRY": "true",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # else each run end prints and GETs the run
_JOB_NAME = re.compile(r"[^'\"`\n\r\t]{1,200}")


class RunStatus(str, enum.Enum):
    """How an attempt (or a job) ended, as MLflow run statuses."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"

    @classmethod
    def parse(cls, value: RunStatus | str) -> RunStatus:
        try:
            return value if isinstance(value, RunStatus) else cls(str(value).strip().upper())
        except ValueError:
            raise UsageError(f"Unknown run status {value!r}. Choose one of: FINISHED, FAILED, KILLED.") from None


@runtime_checkable
class Recorder(Protocol):
    """Everything the orchestrator records. No method raises because the tracking server is away."""

    def start_job(self, job: str, params: Mapping[str, Any] | None = None) -> None:
        """Open (or reopen, on resubmission) the job's parent run; log job-level params it does not have."""

    def record_decision(self, decision: Decision) -> None:
        """Record an attempt's decision BEFORE training relaunches (returns once it is durable)."""

    def log_attempt_metrics(self, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        """Metrics known only after the relaunch (e.g. ``time_to_recover_s``) on the current attempt."""

    def log_training(self, step: int, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        """A training point of the current attempt; costs an append, never blocks."""

    def checkpoint_committed(self, step: int, *, job: str | None = None) -> None:
        """A checkpoint at ``step`` is committed: points up to it join the parent's curve."""

    def end_attempt(self, attempt: int, status: RunStatus | str, *, job: str | None = None) -> None:
        """End an attempt's run FINISHED, FAILED or KILLED."""

    def close_stale_attempts(self, job: str) -> None:
        """Mark the job's attempt runs still RUNNING (other than the live one) KILLED."""

    def end_job(self, status: RunStatus | str, *, job: str | None = None) -> None:
        """End the job's parent run (and its live attempt)."""

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Push everything recorded so far to the server; True when all of it is there."""

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to ``timeout_s``; what is left stays in the spool for the next recorder."""


def resumer_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("RESUMER_HOME", "~/.resumer")))


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded store ``sqlite:///$RESUMER_HOME/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(resumer_home(), 'mlflow.db')}"


def sqlite_path(uri: str) -> str | None:
    return os.path.abspath(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_location(uri: str) -> str | None:
    """Embedded SQLite keeps artifacts next to the database (not in ./mlruns); a server decides its own."""
    db = sqlite_path(uri)
    return None if db is None else os.path.join(os.path.dirname(db), "mlartifacts")


def configure_mlflow_env() -> None:
    for key, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def validate_job(job: str) -> str:
    if not isinstance(job, str) or not _JOB_NAME.fullmatch(job):
        raise UsageError(f"Bad job name {job!r}: use 1-200 characters without quotes, backticks or line breaks.")
    return job


F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """A recording call never breaks training: anything unexpected is logged, not raised (bad input is)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError:
            raise
        except Exception:  # noqa: BLE001 - logged with its traceback; recording is never worth a crash
            logger.exception("recorder: %s failed; training goes on", fn.__name__)
            return None

    return wrapper  # type: ignore[return-value]
