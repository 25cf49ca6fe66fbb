"""Applies recorder ops to MLflow (``MlflowClient``), idempotently, and classifies MLflow failures.

Runs are named by a client-side key (tag ``resumer.run_key``), never by a run id, so a record made while
the server was away can name a run that does not exist yet. Every op is safe to apply twice:

- ``create_run``: looks the key up first; an existing run is reused (and reopened for a resubmitted job).
- ``log``: metrics carry their own timestamp and step (MLflow keeps one copy of an identical point);
  tags are set to the same value again.
- ``parent_points``: training points for the job's parent run, kept only above the parent's high-water step
  (tag ``resumer.parent_step``): the parent never gets two points at one step.

Training points travel pre-encoded (``resumer.tracking.mlflow_fast``): ``[step, json, count]`` per point.
- ``params``: logs only params the run does not have; a changed value becomes a tag
  ``resumer.param_changed.NAME`` (MLflow refuses to change a logged param).
- ``artifact``: uploads a file to a fixed path (a second upload overwrites it with the same bytes).
- ``terminate`` / ``close_stale``: set an end status (again).

Only the shipper thread calls ``MlflowApplier.apply``; mlflow is imported there, lazily.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from resumer.tracking.mlflow_fast import BatchPoster, PointEncoder, rows_of
from resumer.tracking.spool import PERMANENT, TRANSIENT, UNREACHABLE, Op

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "resumer.run_key"
KIND_TAG = "resumer.kind"
PARENT_STEP_TAG = "resumer.parent_step"
PARAM_CHANGED_PREFIX = "resumer.param_changed."
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000
MAX_METRICS_PER_OP = 990  # the server takes 1000 entities (metrics + tags) per batch: room for the tags

_UNREACHABLE_NAMES = {"ConnectionError", "ConnectTimeout", "NewConnectionError", "ConnectTimeoutError",
                      "ProtocolError", "RemoteDisconnected", "ConnectionRefusedError", "ConnectionResetError",
                      "ChunkedEncodingError"}
# The server took the request but did not answer in time: it may be overloaded, or the request too big for the
# timeout; retried a bounded number of times (a server that is down refuses or cannot be connected to).
_READ_TIMEOUT_NAMES = {"ReadTimeout", "ReadTimeoutError"}
_UNREACHABLE_TEXT = ("Connection refused", "Max retries exceeded", "Connection aborted", "Name or service not known",
                     "Temporary failure in name resolution", "RemoteDisconnected", "connect timeout")
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "INTERNAL_ERROR",
                    "ABORTED", "RESOURCE_EXHAUSTED"}
_TRANSIENT_NAMES = {"RetryError", "MaxRetryError", "OperationalError"}  # 5xx/429 after retries; sqlite busy


class UnknownRun(RuntimeError):
    """An op names a run key no create_run made (its creation was rejected): the op can never apply."""


def classify(exc: BaseException) -> str:
    """``UNREACHABLE`` (no answer: wait and retry), ``TRANSIENT`` (an error answer that may pass) or ``PERMANENT``."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, UnknownRun):
            return PERMANENT
        if type(e).__name__ in _READ_TIMEOUT_NAMES:
            return TRANSIENT
        if type(e).__name__ in _UNREACHABLE_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            return UNREACHABLE
        if isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                                                   errno.ENETUNREACH, errno.ETIMEDOUT):
            return UNREACHABLE
    text = " ".join(str(e) for e in chain)
    if "Read timed out" in text:
        return TRANSIENT
    if any(t in text for t in _UNREACHABLE_TEXT) and "RetryError" not in text and "too many" not in text:
        return UNREACHABLE
    for e in chain:
        if type(e).__name__ in _TRANSIENT_NAMES or getattr(e, "error_code", None) in _TRANSIENT_CODES:
            return TRANSIENT
        status = getattr(e, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return TRANSIENT
    return PERMANENT


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(value: str) -> str:
    """A value for an MLflow search filter; job names are validated to hold no quotes."""
    return "'" + value.replace("'", "") + "'"


class MlflowApplier:
    """Turns ops into ``MlflowClient`` calls against one experiment (created on first use)."""

    def __init__(self, tracking_uri: str, experiment: str, *, blob_root: str, artifact_location: str | None = None
                 ) -> None:
        self.tracking_uri = tracking_uri
        self.blob_root = blob_root
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}  # run key -> run id
        self._parent_step: dict[str, int] = {}  # parent run key -> highest step logged on it
        self._batch_poster: BatchPoster | None = None
        self._poster_checked = False

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                self._experiment_id = str(self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location))
            elif exp.lifecycle_stage != "active":
                raise RuntimeError(f"MLflow experiment {self.experiment!r} is deleted: restore it in the MLflow UI "
                                   "or record into another experiment")
            else:
                self._experiment_id = str(exp.experiment_id)
        return self._experiment_id

    def find_run(self, key: str) -> Any | None:
        runs = self.client.search_runs([self.experiment_id()], filter_string=f"tags.`{RUN_KEY_TAG}` = {_quote(key)}",
                                       max_results=1)
        return runs[0] if runs else None

    def run_id(self, key: str) -> str:
        rid = self._run_ids.get(key)
        if rid is None:
            run = self.find_run(key)
            if run is None:
                raise UnknownRun(f"no MLflow run with {RUN_KEY_TAG}={key!r} (its creation was not recorded)")
            rid = self._run_ids[key] = run.info.run_id
        return rid

    # -- ops -----------------------------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        handler = getattr(self, f"_op_{op['op']}", None)
        if handler is None:
            raise ValueError(f"unknown recorder op {op['op']!r}")
        handler(op)

    def _op_create_run(self, op: Op) -> None:
        key = op["key"]
        run = self.find_run(key)
        if run is not None:
            self._run_ids[key] = run.info.run_id
            if op.get("reopen") and run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            if op.get("tags"):
                self._log(run.info.run_id, tags=op["tags"])
            return
        tags = {k: _clip(v, MAX_TAG_LEN) for k, v in op.get("tags", {}).items()}
        tags[RUN_KEY_TAG] = key
        if op.get("parent_key"):
            tags["mlflow.parentRunId"] = self.run_id(op["parent_key"])
        created = self.client.create_run(self.experiment_id(), start_time=op.get("start_ms"), tags=tags,
                                         run_name=op.get("name"))
        self._run_ids[key] = created.info.run_id

    def _op_log(self, op: Op) -> None:
        self._log(self.run_id(op["key"]), metrics=op.get("metrics", ()), points=op.get("points", ()),
                  tags=op.get("tags", {}))

    def _op_parent_points(self, op: Op) -> None:
        key = op["key"]
        rid = self.run_id(key)
        high = self._parent_step.get(key)
        if high is None:
            high = int(self.client.get_run(rid).data.tags.get(PARENT_STEP_TAG, -1))
        points = [p for p in op["points"] if p[0] > high]
        if not points:
            return
        top = max(p[0] for p in points)
        self._log(rid, points=points, tags={PARENT_STEP_TAG: str(top)})
        self._parent_step[key] = top

    def _op_params(self, op: Op) -> None:
        from mlflow.entities import Param

        rid = self.run_id(op["key"])
        existing = self.client.get_run(rid).data
        new = {k: _clip(v, MAX_PARAM_LEN) for k, v in op["params"].items()}
        fresh = [Param(k, v) for k, v in new.items() if k not in existing.params]
        changed = {PARAM_CHANGED_PREFIX + k: _clip(v, MAX_TAG_LEN) for k, v in new.items()
                   if k in existing.params and existing.params[k] != v}
        for k, v in new.items():  # back to the logged value: the change note no longer holds
            if existing.params.get(k) == v and PARAM_CHANGED_PREFIX + k in existing.tags:
                self.client.delete_tag(rid, PARAM_CHANGED_PREFIX + k)
        if changed:
            logger.warning("job params changed on resubmission (kept as tags, params are immutable): %s",
                           ", ".join(sorted(k.removeprefix(PARAM_CHANGED_PREFIX) for k in changed)))
        self._log(rid, params=fresh, tags=changed)

    def _op_artifact(self, op: Op) -> None:
        path = os.path.join(self.blob_root, op["blob_dir"], op["name"])
        self.client.log_artifact(self.run_id(op["key"]), path, op.get("artifact_path"))

    def _op_terminate(self, op: Op) -> None:
        self.client.set_terminated(self.run_id(op["key"]), status=op["status"], end_time=op.get("end_ms"))

    def _op_close_stale(self, op: Op) -> None:
        parent = self.run_id(op["parent_key"])
        keep = set(op.get("keep", ()))
        runs = self.client.search_runs([self.experiment_id()], max_results=1000,
                                       filter_string=f"tags.`mlflow.parentRunId` = {_quote(parent)} "
                                                     "and attributes.status = 'RUNNING'")
        for run in runs:
            if run.data.tags.get(RUN_KEY_TAG) in keep:
                continue
            logger.info("marking stale attempt run %s (%s) %s", run.info.run_id,
                        run.data.tags.get("resumer.attempt", "?"), op["status"])
            self.client.set_terminated(run.info.run_id, status=op["status"], end_time=op.get("end_ms"))

    def _log(self, run_id: str, *, metrics: Any = (), points: Any = (), params: Any = (),
             tags: dict[str, str] | None = None) -> None:
        if not (metrics or points or params or tags):
            return
        poster = None if params else self._poster()
        if poster is not None:
            poster.post(run_id, metrics, points, tags or {})
            return
        from mlflow.entities import Metric, RunTag

        rows = [*metrics, *rows_of(points)]
        self.client.log_batch(run_id, params=list(params),
                              metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows],
                              tags=[RunTag(k, _clip(v, MAX_TAG_LEN)) for k, v in (tags or {}).items()])

    def _poster(self) -> BatchPoster | None:
        """The lean log-batch call, for a plain tracking server (None: everything goes through MlflowClient)."""
        if not self._poster_checked:
            self._batch_poster = BatchPoster.for_client(self.client, PointEncoder())
            self._poster_checked = True
        return self._batch_poster
