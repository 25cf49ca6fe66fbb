"""Launch attempts as Ray Train ``TorchTrainer`` runs and observe them for the controller.

Each attempt is one ``TorchTrainer.fit()`` with ``FailureConfig(max_failures=0)``: a failure comes back
to resumer's controller, which classifies it, plans again and records the decision before relaunching
(Ray's own restart would reuse a checkpoint without planning). The attempt's decision reaches the
workers as an environment variable (``resumer.train.ENV``, set by the function each worker runs);
progress comes back through a small named actor (``ProgressBoard``) the workers ping without blocking.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from resumer.controller import Observation, RunStatus
from resumer.decision import Decision, FailureClass
from resumer.failures import Failure
from resumer.jobspec import JobSpec
from resumer.train import BOARD_NAMESPACE, ENV, board_name

logger = logging.getLogger(__name__)


def _progress_board_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Last step per rank, wall time of the last beat, rank 0's metrics, last committed checkpoint."""

        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.steps: dict[int, int] = {}
            self.pids: dict[int, tuple[str, int]] = {}
            self.nodes: dict[int, tuple[str, int]] = {}  # rank -> (Ray node id, pid)
            self.at: float | None = None
            self.metrics: list[tuple[int, dict[str, float]]] = []
            self.last_commit: tuple[int, str] | None = None
            self.claims: dict[int, int] = {}

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
                    "committed": self.last_commit, "pids": dict(self.pids)}

    return ProgressBoard


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


def _run_entrypoint(ref: str, env: dict[str, str], config: dict[str, Any]) -> None:
    """Runs on each worker: set the attempt's environment, import the user's entrypoint by reference, call it.

    The attempt reaches the workers inside this function's arguments rather than as a runtime env: a
    runtime env that changes every attempt would keep Ray from starting the new workers on idle,
    already-started worker processes (seconds per restart on a small machine).
    """
    from resumer.factories import resolve

    os.environ.update(env)

    resolve(ref, "entrypoint")(config)


def classify(exc: BaseException) -> tuple[FailureClass, str]:
    """Failure class and a one-line cause for what ``fit()`` raised."""
    failures = getattr(exc, "worker_failures", None) or {}
    causes = list(failures.values()) or [exc]
    for e in causes:
        if type(e).__name__ == "Preempted" or "Preempted" in str(e)[:2000]:
            return FailureClass.PREEMPTED, "preempted (SIGTERM): stopped at a step boundary after an emergency save"
    for e in causes:
        name = type(e).__name__
        if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError") or "died" in str(e).lower():
            return FailureClass.CRASHED, f"worker process died ({name})"
    first = causes[0]
    lines = [ln for ln in str(first).splitlines() if ln.strip()]
    return FailureClass.CRASHED, f"{type(first).__name__}: {lines[-1][:200] if lines else ''}"


class RayLauncher:
    """The controller's Launcher on Ray Train. Embedded local Ray unless ``address`` is given."""

    def __init__(self, spec: JobSpec, *, address: str | None = None, clock: Callable[[], float] = time.monotonic,
                 num_cpus: int | None = None, progress: Any = None) -> None:
        import ray

        self.spec = spec
        # Where rank 0's training points and checkpoint commits go (the job's recorder): relayed in poll(),
        # before an attempt's end is reported, so every point reaches the attempt it belongs to.
        self.progress = progress
        self._relayed_commit: tuple[int, str] | None = None
        self.clock = clock
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": address, "namespace": BOARD_NAMESPACE, "include_dashboard": False,
                                  "logging_level": logging.WARNING}
            if address is None and num_cpus is not None:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
        self.board = _progress_board_class().options(name=board_name(spec.name), namespace=BOARD_NAMESPACE,
                                                     get_if_exists=True).remote()
        self.ray_storage = tempfile.mkdtemp(prefix=f"resumer-ray-{spec.name}-")
        self._thread: threading.Thread | None = None
        self._result: dict[str, Any] = {}
        self._run_name = ""
        self._started = 0.0
        self.last_metrics: list[tuple[int, dict[str, float]]] = []

    def _env(self, decision: Decision, plan_hash: str | None) -> dict[str, str]:
        cfg = {"job": self.spec.name, "attempt": decision.attempt, "root": self.spec.root,
               "storage_options": self.spec.storage_options, "checkpoint": decision.checkpoint
               if decision.step is not None else None, "policy": decision.policy,
               "renames": list(self.spec.renames), "plan_hash": plan_hash, "every": self.spec.every,
               "grace_s": self.spec.grace_s, "keep_last": self.spec.keep_last, "keep_every": self.spec.keep_every,
               "model": self.spec.model, "optimizer": self.spec.optimizer, "scheduler": self.spec.scheduler}
        return {ENV: json.dumps(cfg)}

    def launch(self, decision: Decision) -> None:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from resumer.train import plan_hash

        if self._thread is not None:
            self._thread.join(timeout=120)  # the previous fit must release its workers first
        ray.get(self.board.reset.remote())
        self._relayed_commit = None
        scaling = ScalingConfig(num_workers=self.spec.workers, use_gpu=self.spec.use_gpu,
                                resources_per_worker=self.spec.resources_per_worker or None)
        self._run_name = f"{self.spec.name}-a{decision.attempt}-{uuid.uuid4().hex[:6]}"
        env = self._env(decision, plan_hash(decision.plan) if decision.plan is not None else None)
        trainer = TorchTrainer(
            functools.partial(_run_entrypoint, self.spec.entrypoint, env), train_loop_config=dict(self.spec.config),
            scaling_config=scaling,
            run_config=RunConfig(name=self._run_name, storage_path=self.ray_storage,
                                 failure_config=FailureConfig(max_failures=0)))
        result: dict[str, Any] = {}
        self._result = result

        def fit() -> None:
            try:
                result["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - handed to the controller as a classified failure
                result["error"] = exc

        self._started = self.clock()
        self._thread = threading.Thread(target=fit, name=f"resumer-fit-{decision.attempt}", daemon=True)
        self._thread.start()

    def poll(self) -> Observation:
        import ray

        snap = ray.get(self.board.snapshot.remote(), timeout=30)
        self._relay(snap)
        step = snap["step"]
        at = None if snap["at"] is None else self.clock() - max(0.0, time.time() - snap["at"])
        if self._thread is not None and self._thread.is_alive():
            return Observation(status=RunStatus.RUNNING, step=step, reported_at=at)
        if "error" in self._result:
            cls, cause = classify(self._result["error"])
            logger.warning("[launcher] attempt failed: %s", cause)
            return Observation(status=RunStatus.FAILED, step=step, failure=Failure(cls=cls, step=step, cause=cause))
        return Observation(status=RunStatus.SUCCEEDED, step=step)

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

        return dict(ray.get(self.board.snapshot_pids.remote(), timeout=30))

    def last_step(self) -> int:
        """The step every rank has finished in the running attempt (0 before the first report)."""
        import ray

        return int(ray.get(self.board.current_step.remote(), timeout=30))

    def stop(self, reason: str) -> None:
        """Kill this attempt's worker processes (a hung step cannot be interrupted politely).

        Each worker is killed by a small task pinned to its own node (``NodeAffinitySchedulingStrategy``),
        so this works on a multi-node cluster as on one machine; the task checks the pid is still a Ray
        Train worker first.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        logger.warning("[launcher] stopping attempt %s: %s", self._run_name, reason)
        kill = ray.remote(num_cpus=0, max_retries=0)(_kill_worker)
        nodes = ray.get(self.board.snapshot_nodes.remote(), timeout=30)
        refs = {rank: kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
                for rank, (node, pid) in nodes.items() if node and pid}
        for rank, ref in refs.items():
            try:
                logger.warning("[launcher] rank %d (pid %s): %s", rank, nodes[rank][1], ray.get(ref, timeout=60))
            except ray.exceptions.RayError as exc:  # the node is gone: its workers with it
                logger.warning("[launcher] rank %d: kill task failed (%s)", rank, type(exc).__name__)
        if self._thread is not None:
            self._thread.join(timeout=120)

    def shutdown(self) -> None:
        import ray

        if self._thread is not None and self._thread.is_alive():
            self.stop("shutting down")
        ray.kill(self.board)
