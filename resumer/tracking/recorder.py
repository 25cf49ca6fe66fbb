"""The decision recorder: every attempt of a training job, why it started, and its metrics, in MLflow.

Run lineage. One *parent* run per training job (tags ``resumer.jobs.run``, ``resumer.kind=job``), found again
by the job's name when the job is resubmitted. One *child* run per attempt (first start, each resume, a
refusal), with ``mlflow.parentRunId``, ``Decision.tags()`` (outcome, previous failure, policy, checkpoint
and step, code fingerprint, world sizes) and the decision's metrics (time to recover, plan time, bytes
read, load seconds, plan counts, attempt). Params hold only what never changes within a run: job-level
params on the parent, logged once; a value changed on resubmission becomes a tag
``resumer.param_changed.NAME`` (MLflow refuses to change a param). Attempt-level values are tags.

Artifacts of an attempt: ``decision.json``, ``plan.json`` (``Plan.to_dict``), ``plan.md``, ``plan.html``,
``rejected.json`` (candidates passed over, with reasons) and, for a refusal, ``message.txt`` (also the
``resumer.message`` tag): what to change before resubmitting. ``record_decision`` returns once the record
is on the server or safely in the local spool: record before launch.

Training curves: each attempt's run gets its raw curve, the parent one line of committed points; see
``resumer.tracking.lineage`` for the rules.

Robustness. Nothing here waits on the server: MLflow calls run on one background thread (training points
are batched, one log-batch request per run every ``flush_interval_s``, see ``resumer.tracking.mlflow_fast``); while
the server is unreachable, records go to an ordered on-disk spool and are flushed in order when it is back
(see ``resumer.tracking.spool``). No recording call raises because of the tracking server, and ``log_training``
and ``checkpoint_committed`` cost an append to a deque. Runs of killed attempts end KILLED or FAILED:
``end_attempt``, and the next ``record_decision`` closes a previous attempt still RUNNING
(``close_stale_attempts``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.errors import UsageError
from resumer.tracking.attempt_record import attempt_files, attempt_tags
from resumer.tracking.base import (
    RunStatus,
    configure_mlflow_env,
    default_artifact_location,
    default_tracking_uri,
    guarded,
    resumer_home,
    sqlite_path,
    validate_job,
)
from resumer.tracking.lineage import AttemptState, Batched, JobState, chunks, commit_points, parent_ops
from resumer.tracking.mlflow_fast import PointEncoder
from resumer.tracking.mlflow_ops import KIND_TAG, MlflowApplier, classify
from resumer.tracking.spool import Op, Shipper, Spool, SpoolLocked, Ticket, new_op

logger = logging.getLogger(__name__)

def _status_after(failure: FailureClass) -> RunStatus:
    return RunStatus.FAILED if failure is FailureClass.CRASHED else RunStatus.KILLED


class MlflowRecorder:
    """Records jobs, attempts and training curves in MLflow; spools to ``spool_dir`` while it is unreachable.

    Args:
        tracking_uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///path/mlflow.db``); default
            ``default_tracking_uri()``.
        experiment: the MLflow experiment (created on first use).
        spool_dir: where records wait while the server is unreachable; default
            ``$RESUMER_HOME/spool/<hash of uri and experiment>`` (``-<pid>`` appended if another live
            recorder holds it). A spool left by a dead process is flushed first.
        artifact_location: for a new experiment; default: next to an embedded SQLite database.
        flush_interval_s: how often training points are batched and sent.
        max_spool_bytes: past this much spooled, training points are dropped (counted and warned) until the
            server is back; decisions and run lifecycle records are always spooled.
        durable_timeout_s: the longest a recording call waits for its record to be durable.
        backoff: first and longest wait between retries while the server is unreachable.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "resumer", *, spool_dir: str | None = None,
                 artifact_location: str | None = None, flush_interval_s: float = 1.0, durable_timeout_s: float = 10.0,
                 backoff: tuple[float, float] = (0.5, 30.0), max_spool_bytes: int = 2**30) -> None:
        configure_mlflow_env()
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            os.makedirs(os.path.dirname(db), exist_ok=True)
        self.spool = self._open_spool(spool_dir)
        self.spool.max_bytes = max_spool_bytes
        self._applier = MlflowApplier(self.tracking_uri, experiment, blob_root=self.spool.blob_root,
                                      artifact_location=artifact_location or default_artifact_location(
                                          self.tracking_uri))
        self._durable_timeout_s = durable_timeout_s
        self._lock = threading.RLock()
        self._jobs: dict[str, JobState] = {}
        self._active: JobState | None = None
        self._warned: set[str] = set()
        self._encoder = PointEncoder()
        self._shipper = Shipper(self.spool, self._applier.apply, classify=classify, tick=self._drain_points,
                                tick_interval_s=flush_interval_s, backoff=backoff)
        _live.add(self)

    def _open_spool(self, spool_dir: str | None) -> Spool:
        if spool_dir is not None:
            os.makedirs(spool_dir, exist_ok=True)
            try:
                return Spool(spool_dir)
            except SpoolLocked as exc:
                raise UsageError(f"{exc}: give each recorder its own spool_dir.") from None
        digest = hashlib.sha1(f"{self.tracking_uri}\0{self.experiment}".encode()).hexdigest()[:16]
        base = os.path.join(resumer_home(), "spool", digest)
        for path in (base, f"{base}-{os.getpid()}"):
            os.makedirs(path, exist_ok=True)
            with contextlib.suppress(SpoolLocked):
                return Spool(path)
        raise UsageError(f"Spool {base} is in use: pass spool_dir.")

    # -- state -------------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """False while the tracking server is unreachable (records are being spooled)."""
        return self._shipper.online

    def pending(self) -> int:
        """Records not yet on the server (in memory or in the spool)."""
        return self._shipper.pending() + sum(len(a.points) for j in self._jobs.values() for a in j.attempts.values())

    def _job(self, job: str | None) -> JobState | None:
        return self._active if job is None else self._jobs.get(job)

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message, *args)

    # -- the Recorder protocol ----------------------------------------------------------------------

    @guarded
    def start_job(self, job: str, params: Mapping[str, Any] | None = None) -> None:
        validate_job(job)
        self._record(lambda: self._job_ops(job, params))

    @guarded
    def record_decision(self, decision: Decision) -> None:
        validate_job(decision.job)
        logger.info("%s", decision.summary())
        # Record before launch: return only once the record is on the server or in the spool.
        self._record(lambda: self._decision(decision))

    @guarded
    def log_attempt_metrics(self, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        def build() -> list[Op]:
            state = self._job(job)
            att = state.current if state else None
            if att is None:
                self._warn_once("no-attempt-metrics", "log_attempt_metrics before any record_decision: ignored")
                return []
            ts = _now_ms()
            return [new_op("log", key=att.key, metrics=[[k, float(v), ts, att.start_step] for k, v in metrics.items()])]

        self._record(build, wait=False)

    def log_training(self, step: int, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        # The hot path: an append, no lock, no IO. Batches are built on the shipper thread (_drain_points).
        try:
            att = (self._active if job is None else self._jobs[job]).current  # type: ignore[union-attr]
            att.points.append((step, dict(metrics), int(time.time() * 1000)))  # type: ignore[union-attr]
        except (AttributeError, KeyError, TypeError, ValueError):
            self._warn_once("no-attempt", "log_training before record_decision (or for an unknown job): ignored")

    def checkpoint_committed(self, step: int, *, job: str | None = None) -> None:
        # Training-thread path too: noted here, applied on the shipper thread after the points before it.
        try:
            att = (self._active if job is None else self._jobs[job]).current  # type: ignore[union-attr]
            att.commits.append(int(step))  # type: ignore[union-attr]
        except (AttributeError, KeyError, TypeError, ValueError):
            self._warn_once("no-attempt-commit", "checkpoint_committed before record_decision: ignored")

    @guarded
    def end_attempt(self, attempt: int, status: RunStatus | str, *, job: str | None = None) -> None:
        parsed = RunStatus.parse(status)

        def build() -> list[Op]:
            state = self._job(job)
            att = state.attempts.get(attempt) if state else None
            if state is None or att is None:
                self._warn_once(f"end-{job}-{attempt}", "end_attempt(%s): not an attempt this recorder recorded; "
                                "close_stale_attempts ends those", attempt)
                return []
            return self._end_ops(state, att, parsed)

        self._record(build)

    @guarded
    def close_stale_attempts(self, job: str) -> None:
        validate_job(job)

        def build() -> list[Op]:
            ops = [] if job in self._jobs else self._job_ops(job, None)
            state = self._jobs[job]
            live = state.current if state.current and not state.current.ended else None
            for att in state.attempts.values():
                att.ended = att.ended or att is not live
            return [*ops, new_op("close_stale", parent_key=state.key, status=RunStatus.KILLED.value,
                                 keep=[live.key] if live else [], end_ms=_now_ms())]

        self._record(build)

    @guarded
    def end_job(self, status: RunStatus | str, *, job: str | None = None) -> None:
        parsed = RunStatus.parse(status)

        def build() -> list[Op]:
            state = self._job(job)
            if state is None:
                return []
            att = state.current
            ops = self._end_ops(state, att, parsed) if att is not None and not att.ended else []
            return [*ops, new_op("terminate", key=state.key, status=parsed.value, end_ms=_now_ms())]

        self._record(build)

    def flush(self, timeout_s: float = 30.0) -> bool:
        with self._lock:
            self._drain_points()
        return self._shipper.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._drain_points()
        if not self._shipper.close(timeout_s):
            logger.warning("recorder closed with %d records in the spool %s; the next recorder on it flushes them",
                           len(self.spool), self.spool.dir)

    def __enter__(self) -> MlflowRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ops (under self._lock) -------------------------------------------------------------

    def _record(self, build: Callable[[], list[Op]], *, wait: bool = True) -> None:
        """Build and submit ops under the lock (one order for all threads); wait for durability outside it."""
        with self._lock:
            self._drain_points()
            ticket = self._submit(build())
        if wait and ticket is not None and not ticket.durable.wait(self._durable_timeout_s):
            logger.warning("recorder: a record is not durable after %.0fs (server slow?); it stays queued",
                           self._durable_timeout_s)

    def _submit(self, ops: Iterable[Op]) -> Ticket | None:
        ticket = None
        for op in ops:
            ticket = self._shipper.submit(op)
        return ticket

    def _drain_points(self) -> None:
        """Batch what training logged since the last drain: every point to its attempt's run, committed ones
        (up to the newest committed checkpoint) to the parent's. One request per run per drain."""
        if not self._lock.acquire(blocking=False):
            return  # a recording call holds the lock and drains itself; the shipper thread never waits here
        try:
            for state in self._jobs.values():
                for att in state.attempts.values():
                    if att.points or att.commits or att.tags_due:
                        self._submit(self._attempt_ops(state, att))
                self._submit(parent_ops(state))
        finally:
            self._lock.release()

    def _job_ops(self, job: str, params: Mapping[str, Any] | None) -> list[Op]:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = JobState(name=job, key=f"job:{job}", submission="")
        # Each (re)submission numbers its own attempt runs: attempt 1 of a resubmission is a new run.
        state.submission = uuid.uuid4().hex[:8]
        self._active = state
        ops = [new_op("create_run", key=state.key, name=job, reopen=True, start_ms=_now_ms(),
                      tags={"resumer.jobs.run": job, KIND_TAG: "job", "resumer.submission": state.submission})]
        if params:
            ops.append(new_op("params", key=state.key, params={str(k): str(v) for k, v in params.items()}))
        return ops

    def _decision(self, d: Decision) -> list[Op]:
        ops = [] if d.job in self._jobs else self._job_ops(d.job, None)
        state = self._active = self._jobs[d.job]
        resume_step = self._resume_step(d)
        key = f"{state.key}#{state.submission}#{d.attempt}"
        prev, att = state.current, state.attempts.get(d.attempt)
        if att is None or att.ended or att.key != key:
            att = state.attempts[d.attempt] = AttemptState(number=d.attempt, key=key, start_step=resume_step or 0)
        if prev is not None and prev is not att:
            ops += self._settle(state, prev, resume_step)
            if not prev.ended:  # the orchestrator did not end it: its failure class says how it ended
                ops.append(new_op("terminate", key=prev.key, status=_status_after(d.previous_failure).value,
                                  end_ms=_now_ms()))
                prev.ended = True
        state.current = att
        # A run still RUNNING for this job (a controller that died, say) is over: this attempt replaces it.
        ops.append(new_op("close_stale", parent_key=state.key, status=RunStatus.KILLED.value, keep=[att.key],
                          end_ms=_now_ms()))
        ops += self._decision_ops(state, att, d, resume_step)
        if d.outcome is Outcome.REFUSED:  # nothing will train: the attempt ends here
            ops.append(new_op("terminate", key=att.key, status=RunStatus.FAILED.value, end_ms=_now_ms()))
            att.ended = True
        return ops

    def _end_ops(self, state: JobState, att: AttemptState, status: RunStatus) -> list[Op]:
        if status is RunStatus.FINISHED:  # a finished attempt's last points are final; a dead one's wait
            commit_points(state, att, None)  # for the next decision, which knows the resume step
        att.ended = True
        return [*parent_ops(state), new_op("terminate", key=att.key, status=status.value, end_ms=_now_ms())]

    def _attempt_ops(self, state: JobState, att: AttemptState) -> list[Op]:
        commits = [att.commits.popleft() for _ in range(len(att.commits))]  # before the points: those it covers
        batch: list[Batched] = []
        while att.points:
            step, metrics, ts = att.points.popleft()
            frag, n, bad = self._encoder.encode(int(step), metrics, ts)  # encoded once: attempt's run and parent's
            for k in bad:
                self._warn_once(f"bad-{k}", "training metric %r is not a number: not recorded", k)
            batch.append([int(step), frag, n])
        att.uncommitted += batch
        if commits:
            commit_points(state, att, max(commits))
            att.tags_due["resumer.committed_step"] = str(max(commits))
        ops = [new_op("log", key=att.key, points=chunk, bulk=True) for chunk in chunks(batch)]
        ops = ops or [new_op("log", key=att.key)]
        ops[-1]["tags"], att.tags_due = att.tags_due, {}
        return ops

    @staticmethod
    def _resume_step(d: Decision) -> int | None:
        if d.outcome is Outcome.RESUMED:
            return d.step or 0
        return 0 if d.outcome is Outcome.FRESH_START else None

    def _settle(self, state: JobState, prev: AttemptState, resume_step: int | None) -> list[Op]:
        """The dead attempt's buffered points: up to the resume step they stand; after it they are superseded."""
        superseded = sum(1 for p in prev.uncommitted if resume_step is None or p[0] > resume_step)
        if resume_step is not None:
            commit_points(state, prev, resume_step)
        if superseded:
            logger.info("attempt %d: %d training points after step %s superseded (kept on the attempt's run)",
                        prev.number, superseded, resume_step)
        prev.uncommitted = []
        return parent_ops(state)

    def _decision_ops(self, state: JobState, att: AttemptState, d: Decision, resume_step: int | None) -> list[Op]:
        now = _now_ms()
        ops = [new_op("create_run", key=att.key, parent_key=state.key, name=f"{d.job} attempt {d.attempt}",
                      start_ms=now, tags=attempt_tags(d, state.submission)),
               new_op("log", key=att.key, metrics=[[k, v, now, att.start_step] for k, v in d.all_metrics().items()])]
        ops += [self._artifact_op(att.key, name, text) for name, text in attempt_files(d).items()]
        parent_tags = {"resumer.last_attempt": str(d.attempt), "resumer.last_outcome": d.outcome.value}
        marker = [["resume_marker", float(d.attempt), now, resume_step]] if resume_step is not None else []
        ops.append(new_op("log", key=state.key, metrics=marker, tags=parent_tags))
        return ops

    def _artifact_op(self, key: str, name: str, text: str) -> Op:
        op = new_op("artifact", key=key, name=name, blob_dir="")
        op["blob_dir"] = op["id"]
        with open(os.path.join(self.spool.blob_dir(op["id"]), name), "w", encoding="utf-8") as f:
            f.write(text)
        return op


def _now_ms() -> int:
    return int(time.time() * 1000)


_live: weakref.WeakSet[MlflowRecorder] = weakref.WeakSet()


@atexit.register
def _close_live_recorders() -> None:
    """At exit, a recorder nobody closed still flushes briefly, then spools what is left (nothing lost)."""
    for rec in list(_live):
        rec.close(timeout_s=5.0)
