"""The job's progress board (a small named Ray actor) and the Ray Train callback that reports failures to it.

The board is where the controller and the workers meet without blocking each other:

* the launcher POSTS each attempt's ``AttemptConfig`` (the checkpoint and plan the controller chose and
  recorded); the workers of a worker group TAKE it before they train — workers that Ray Train restarted
  after a failure wait there until the controller has planned and recorded the next attempt, or posts
  ``ABORT`` (the job ended);
* workers BEAT each step (rank, step, pid, node, rank 0's metrics) and note COMMITTED checkpoints and
  emergency CLAIMS;
* ``FailureRelay``, a Ray Train ``UserCallback`` running in the Train controller, marks the posted attempt
  FAILED with its class and cause as soon as a worker raises or dies, before Ray restarts the group.
"""

from __future__ import annotations

import time
from typing import Any

from resumer.core.decision import FailureClass
from resumer.jobs.attempt import AttemptConfig

NAMESPACE = "resumer"
ABORT = "abort"  # posted instead of an attempt when the job ends: a waiting worker group returns


def board_name(job: str) -> str:
    return f"resumer-board-{job}"


def classify_causes(causes: list[BaseException]) -> tuple[FailureClass, str]:
    """Failure class and a one-line cause for the exceptions an attempt's workers raised."""
    for e in causes:
        if type(e).__name__ == "Preempted" or "Preempted" in str(e)[:2000]:
            return FailureClass.PREEMPTED, "preempted (SIGTERM): stopped at a step boundary after an emergency save"
    for e in causes:
        name = type(e).__name__
        if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerHealthCheckFailedError") \
                or "died" in str(e).lower():
            return FailureClass.CRASHED, f"worker process died ({name})"
    first = causes[0]
    lines = [ln for ln in str(first).splitlines() if ln.strip()]
    return FailureClass.CRASHED, f"{type(first).__name__}: {lines[-1][:200] if lines else ''}"


class ProgressBoard:
    """The posted attempt, its failure, and per attempt: steps, pids, metrics, commits, claims."""

    def __init__(self) -> None:
        self.posted: tuple[int, AttemptConfig | str] | None = None
        self.failed: tuple[int, str, str] | None = None  # (attempt, failure class, cause)
        self.takers: dict[int, int] = {}  # rank -> pid of the worker group running the posted attempt
        self.clear()

    def clear(self) -> None:
        self.steps: dict[int, int] = {}
        self.pids: dict[int, tuple[str, int]] = {}
        self.nodes: dict[int, tuple[str, int]] = {}  # rank -> (Ray node id, pid)
        self.at: float | None = None
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.last_commit: tuple[int, str] | None = None
        self.claims: dict[int, int] = {}

    def post(self, attempt: int, cfg: AttemptConfig | str) -> None:
        """A new attempt (metrics of the last one were drained by the launcher's poll first)."""
        self.clear()
        self.posted, self.takers = (attempt, cfg), {}

    def take(self, rank: int, pid: int) -> AttemptConfig | str | None:
        """The attempt a starting worker group is to run, or None while the controller decides.

        A posted attempt runs in ONE worker group: a rank asking again from another process means Ray
        Train restarted the group after a failure; if that failure was not reported, it is marked here,
        so a restarted group never runs an attempt again without the controller planning it.
        """
        if self.posted is None or (self.failed is not None and self.failed[0] >= self.posted[0]):
            return None
        if self.takers.get(rank, pid) != pid:
            self.fail(FailureClass.CRASHED.value, "the worker group was restarted by Ray Train after a failure")
            return None
        self.takers[rank] = pid
        return self.posted[1]

    def fail(self, cls: str, cause: str) -> None:
        if self.posted is not None and (self.failed is None or self.failed[0] < self.posted[0]):
            self.failed = (self.posted[0], cls, cause)  # the first report of an attempt's failure stands

    def failure(self) -> tuple[int, str, str] | None:
        return self.failed

    def beat(self, rank: int, step: int, metrics: dict[str, float] | None, wall: float,
             host: str = "", pid: int = 0, node: str = "") -> None:
        self.steps[rank] = step
        self.pids[rank] = (host, pid)
        self.nodes[rank] = (node, pid)
        self.at = wall
        if metrics:
            self.metrics.append((step, metrics))

    def snapshot_pids(self) -> dict[int, tuple[str, int]]:
        return dict(self.pids)

    def snapshot_nodes(self) -> dict[int, tuple[str, int]]:
        return dict(self.nodes)

    def current_step(self) -> int:
        return min(self.steps.values()) if self.steps else 0

    def claim(self, step: int, rank: int) -> bool:
        """The first rank to claim an emergency checkpoint of ``step`` writes it."""
        if step in self.claims:
            return False
        self.claims[step] = rank
        return True

    def committed(self, step: int, uri: str) -> None:
        self.last_commit = (step, uri)

    def snapshot(self) -> dict[str, Any]:
        metrics, self.metrics = self.metrics, []
        return {"step": min(self.steps.values()) if self.steps else None, "at": self.at, "metrics": metrics,
                "committed": self.last_commit, "pids": dict(self.pids), "failed": self.failed}



def progress_board_class() -> Any:
    """``ProgressBoard`` as a Ray actor class (no CPU: it only keeps a few numbers)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard)


def failure_relay(board: str) -> Any:
    """A Ray Train callback that marks the posted attempt failed on ``board`` when a worker raises or dies."""
    from ray.train import UserCallback

    class FailureRelay(UserCallback):  # type: ignore[misc]
        def __init__(self, board: str) -> None:
            self.board = board

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            import ray

            cls, cause = classify_causes(list(worker_exceptions.values()))
            handle = ray.get_actor(self.board, namespace=NAMESPACE)
            ray.get(handle.fail.remote(cls.value, cause), timeout=30)  # before Ray restarts the group

    return FailureRelay(board)


def wait_for_attempt(board: Any, rank: int, *, poll_s: float = 0.05) -> AttemptConfig | None:
    """On a worker: block until the controller has posted the attempt this worker group is to run
    (None: the job ended)."""
    import os

    import ray

    while True:
        posted = ray.get(board.take.remote(rank, os.getpid()), timeout=60)
        if isinstance(posted, AttemptConfig):
            return posted
        if posted == ABORT:
            return None
        time.sleep(poll_s)
