"""Launch attempts on Ray Train ``TorchTrainer`` workers and observe them for the controller.

One ``fit()`` runs a job's attempts while it can: when a worker raises or dies, ``FailureRelay`` (a Ray
Train callback) marks the attempt failed on the job's ``ProgressBoard`` with its class, and Ray Train
restarts the worker group (its controller stays up: measured faster than a new ``fit()``, see
``bench/recover_ray.py``). The restarted workers wait on the board until resumer's controller has
classified the failure, planned the next attempt and recorded it, then take that attempt's ``AttemptConfig``
(handed to the entrypoint in ``resumer.jobs.attempt.ENV`` by the function each worker runs) — or return, when
the job ends. Ray's own
restart never reuses a checkpoint without planning: a group that restarts unannounced is caught by the
board (a rank taking an attempt from a second process). A new ``fit()`` starts only when none runs.
Progress (steps, metrics, commits) comes back through the same board, pinged without blocking.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from resumer.core.controller import Observation, Observed
from resumer.core.decision import Decision, FailureClass
from resumer.core.failures import Failure
from resumer.jobs.attempt import ENV, AttemptConfig
from resumer.jobs.board import (
    ABORT,
    NAMESPACE,
    board_name,
    classify_causes,
    failure_relay,
    progress_board_class,
    wait_for_attempt,
)
from resumer.jobs.spec import JobSpec

logger = logging.getLogger(__name__)


def _kill_worker(pid: int) -> str:
    """Runs on the worker's node: SIGKILL ``pid`` if it is still a Ray Train worker (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        return "gone"
    if "RayTrainWorker" not in cmdline:
        return f"not a Ray Train worker ({cmdline[:80]!r}): left alone"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "gone"
    return "killed"


def _run_entrypoint(ref: str, board: str, config: dict[str, Any]) -> None:
    """Runs on each worker: take the attempt from the board (waiting, after a restart, until the controller
    has planned and recorded it), set it in the environment, import the user's entrypoint and call it.
    An abort (the job ends) returns at once."""
    import ray
    import ray.train

    from resumer.jobs.factories import resolve

    cfg = wait_for_attempt(ray.get_actor(board, namespace=NAMESPACE), ray.train.get_context().get_world_rank())
    if cfg is None:
        return
    os.environ[ENV] = cfg.to_json()
    resolve(ref, "entrypoint")(config)


def classify(exc: BaseException) -> tuple[FailureClass, str]:
    """Failure class and a one-line cause for what ``fit()`` raised."""
    failures = getattr(exc, "worker_failures", None) or {}
    return classify_causes(list(failures.values()) or [exc])


class RayLauncher:
    """The controller's Launcher on Ray Train. Embedded local Ray unless ``address`` is given."""

    def __init__(self, spec: JobSpec, *, address: str | None = None, clock: Callable[[], float] = time.monotonic,
                 num_cpus: int | None = None, progress: Any = None) -> None:
        self.spec = spec
        # Where rank 0's training points and checkpoint commits go (the job's recorder): relayed in poll(),
        # before an attempt's end is reported, so every point reaches the attempt it belongs to.
        self.progress = progress
        self._relayed_commit: tuple[int, str] | None = None
        self.clock = clock
        self._address, self._num_cpus = address, num_cpus
        self._board: Any = None
        self._board_lock = threading.Lock()  # the board may first be asked for from another thread (a watcher)
        self._storage: str | None = None  # Ray Train's storage for this job's fits, made by the first
        self._thread: threading.Thread | None = None
        self._result: dict[str, Any] = {}
        self._run_name = ""
        self._attempt = 0
        self._reported = False  # the current attempt's failure went to the controller
        self.last_metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def board(self) -> Any:
        """The job's progress board (a named actor). Ray is connected (embedded local Ray unless an address was
        given), and the board made, on first use: the first launch. A job refused before it ever launches (its
        plan refused at submission) never starts Ray."""
        with self._board_lock:
            return self._board_locked()

    def _board_locked(self) -> Any:
        if self._board is None:
            import ray

            if not ray.is_initialized():
                kw: dict[str, Any] = {"address": self._address, "namespace": NAMESPACE, "include_dashboard": False,
                                      "logging_level": logging.WARNING}
                if self._address is None and self._num_cpus is not None:
                    kw["num_cpus"] = self._num_cpus
                ray.init(**kw)
            self._board = progress_board_class().options(name=board_name(self.spec.name), namespace=NAMESPACE,
                                                         get_if_exists=True).remote()
        return self._board

    def launch(self, decision: Decision) -> None:
        """Post the recorded decision; start a fit when none is running (else Ray Train's restarted group,
        waiting on the board, takes it)."""
        import ray

        cfg = AttemptConfig.for_decision(self.spec, decision)
        self._attempt, self._reported = decision.attempt, False
        self._relayed_commit = None
        ray.get(self.board.post.remote(decision.attempt, cfg), timeout=30)
        if self._thread is None or not self._thread.is_alive():
            self._start_fit(decision.attempt)

    def _start_fit(self, attempt: int) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        scaling = ScalingConfig(num_workers=self.spec.workers, use_gpu=self.spec.use_gpu,
                                resources_per_worker=self.spec.resources_per_worker or None)
        self._run_name = f"{self.spec.name}-a{attempt}-{uuid.uuid4().hex[:6]}"
        # Ray Train restarts the worker group itself (its controller stays up: seconds faster than a new fit),
        # but a restarted group only waits on the board until resumer's controller has classified the
        # failure, planned and recorded the next attempt. Our budgets stop first; this is only a ceiling.
        ceiling = sum(b.max_restarts for b in self.spec.budgets.values()) + 1
        if self._storage is None:
            self._storage = tempfile.mkdtemp(prefix=f"resumer-ray-{self.spec.name}-")
        trainer = TorchTrainer(
            functools.partial(_run_entrypoint, self.spec.entrypoint, board_name(self.spec.name)),
            train_loop_config=dict(self.spec.config), scaling_config=scaling,
            run_config=RunConfig(name=self._run_name, storage_path=self._storage,
                                 failure_config=FailureConfig(max_failures=ceiling),
                                 callbacks=[failure_relay(board_name(self.spec.name))]))
        result: dict[str, Any] = {}
        self._result = result

        def fit() -> None:
            try:
                result["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - handed to the controller as a classified failure
                result["error"] = exc

        self._thread = threading.Thread(target=fit, name=f"resumer-fit-{attempt}", daemon=True)
        self._thread.start()

    def poll(self) -> Observation:
        import ray

        snap = ray.get(self.board.snapshot.remote(), timeout=30)
        self._relay(snap)
        step = snap["step"]
        at = None if snap["at"] is None else self.clock() - max(0.0, time.time() - snap["at"])
        failed = snap["failed"]
        if failed is not None and failed[0] == self._attempt and not self._reported:
            return self._failure(FailureClass(failed[1]), failed[2], step)
        if self._thread is not None and self._thread.is_alive():
            return Observation(status=Observed.RUNNING, step=step, reported_at=at)
        if "error" in self._result and not self._reported:
            return self._failure(*classify(self._result["error"]), step)
        return Observation(status=Observed.SUCCEEDED, step=step)

    def _failure(self, cls: FailureClass, cause: str, step: int | None) -> Observation:
        self._reported = True
        logger.warning("[launcher] attempt %d failed: %s", self._attempt, cause)
        return Observation(status=Observed.FAILED, step=step, failure=Failure(cls=cls, step=step, cause=cause))

    def _relay(self, snap: dict[str, Any]) -> None:
        self.last_metrics.extend(snap["metrics"])
        if self.progress is None:
            return
        for step, metrics in snap["metrics"]:
            self.progress.log_training(step, metrics)
        commit = snap["committed"]
        if commit is not None and tuple(commit) != self._relayed_commit:
            self._relayed_commit = tuple(commit)
            self.progress.checkpoint_committed(int(commit[0]))

    def worker_pids(self) -> dict[int, tuple[str, int]]:
        """rank -> (host, pid) of this attempt's training workers, as they reported themselves."""
        import ray

        if self._board is None:  # nothing launched yet (and Ray not started for it)
            return {}
        return dict(ray.get(self.board.snapshot_pids.remote(), timeout=30))

    def last_step(self) -> int:
        """The step every rank has finished in the running attempt (0 before the first report)."""
        import ray

        if self._board is None:  # nothing launched yet
            return 0
        return int(ray.get(self.board.current_step.remote(), timeout=30))

    def stop(self, reason: str) -> None:
        """Kill this attempt's worker processes (a hung step cannot be interrupted politely).

        Each worker is killed by a small task pinned to its own node (``NodeAffinitySchedulingStrategy``),
        so this works on a multi-node cluster as on one machine; the task checks the pid is still a Ray
        Train worker first. Returns once the attempt is marked failed (or its fit ended), so a late report
        of this kill can never be taken for the next attempt's failure.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        logger.warning("[launcher] stopping attempt %d (%s): %s", self._attempt, self._run_name, reason)
        kill = ray.remote(num_cpus=0, max_retries=0)(_kill_worker)
        nodes = ray.get(self.board.snapshot_nodes.remote(), timeout=30)
        refs = {rank: kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
                for rank, (node, pid) in nodes.items() if node and pid}
        for rank, ref in refs.items():
            try:
                logger.warning("[launcher] rank %d (pid %s): %s", rank, nodes[rank][1], ray.get(ref, timeout=60))
            except ray.exceptions.RayError as exc:  # the node is gone: its workers with it
                logger.warning("[launcher] rank %d: kill task failed (%s)", rank, type(exc).__name__)
        self._reported = True  # the controller classifies this end itself (hung, stopped)
        deadline = time.monotonic() + 60
        while refs and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            failed = ray.get(self.board.failure.remote(), timeout=30)
            if failed is not None and failed[0] >= self._attempt:
                break
            time.sleep(0.1)

    def shutdown(self) -> None:
        """End the job's fit: post an abort (a group waiting on the board returns), kill a running one."""
        import ray

        if self._board is None:  # never launched: Ray was not started for this job
            return
        if self._thread is not None and self._thread.is_alive():
            ray.get(self.board.post.remote(self._attempt + 1, ABORT), timeout=30)
            if ray.get(self.board.snapshot_nodes.remote(), timeout=30):
                self.stop("shutting down")
            self._thread.join(timeout=120)
        ray.kill(self.board)
