"""Run lineage bookkeeping for the recorder: which training points each attempt holds, and which are final.

Training curves. ``log_training(step, metrics)`` sends every point to the *attempt's* run: the raw curve
of each attempt, steps a later attempt redoes included. The *parent's* curve is one line: a point goes to
the parent only once a checkpoint at or after its step is committed (``checkpoint_committed(step=C)``).
When attempt N resumes from step S, the dead attempt's points after S are superseded (the resumed run
recomputes those steps) and never reach the parent; a ``resume_marker`` metric (value N) at step S marks
the resume on the parent's chart. The parent never gets two points at one step: if an attempt restarts
below the parent's last point (a fallback to an older checkpoint, or a fresh start), the parent keeps its
earlier values up to that last point and continues with the new attempt after it; the attempt's own run
has the whole raw curve.

Pure state, no MLflow: ``resumer.tracking.recorder`` turns it into ops."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resumer.tracking.mlflow_ops import MAX_METRICS_PER_OP
from resumer.tracking.spool import Op, new_op

Point = tuple[int, Mapping[str, Any], int]  # step, metrics, timestamp (ms)
Batched = list[Any]  # [step, JSON of its metrics, metric count] (resumer.tracking.mlflow_fast.Encoded)


@dataclass(eq=False)
class AttemptState:
    number: int
    key: str
    start_step: int
    points: deque[Point] = field(default_factory=deque)  # logged, not yet batched (training thread appends)
    commits: deque[int] = field(default_factory=deque)  # committed checkpoint steps, not yet applied
    uncommitted: list[Batched] = field(default_factory=list)  # batched, not yet on the parent
    tags_due: dict[str, str] = field(default_factory=dict)  # sent with the attempt's next batch
    ended: bool = False


@dataclass(eq=False)
class JobState:
    name: str
    key: str
    submission: str
    attempts: dict[int, AttemptState] = field(default_factory=dict)
    current: AttemptState | None = None
    parent_points: list[Batched] = field(default_factory=list)  # committed, for the parent's curve


def commit_points(state: JobState, att: AttemptState, step: int | None) -> None:
    """Points up to ``step`` (all when None) are final: they join the parent's pending points."""
    state.parent_points += [p for p in att.uncommitted if step is None or p[0] <= step]
    att.uncommitted = [p for p in att.uncommitted if step is not None and p[0] > step]


def parent_ops(state: JobState) -> list[Op]:
    """The parent's pending points as bulk ops (and none left pending)."""
    points, state.parent_points = state.parent_points, []
    return [new_op("parent_points", key=state.key, points=chunk, bulk=True) for chunk in chunks(points)]


def chunks(points: list[Batched]) -> list[list[Batched]]:
    """Points in chunks of at most MAX_METRICS_PER_OP metrics (a point with more is a chunk of its own)."""
    out: list[list[Batched]] = []
    size = MAX_METRICS_PER_OP
    for p in points:
        if size + p[2] > MAX_METRICS_PER_OP:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p[2]
    return out
