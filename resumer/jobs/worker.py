"""The two calls a training loop makes on Ray Train workers (plus an optional heartbeat).

    def train_loop(config):                                  # your entrypoint, run on every worker
        model = ray.train.torch.prepare_model(build_model())
        opt = make_optimizer(model)
        start = resumer.jobs.worker.restore(model, opt, sched)     # the step to continue AFTER (0: fresh)
        for step in range(start + 1, config["total_steps"] + 1):
            loss = train_step(model, opt, step)              # data position = global step, not a per-rank counter
            resumer.jobs.worker.save(step, model, opt, sched, metrics={"loss": loss})   # writes every N steps

Both read the attempt's ``AttemptConfig`` (``resumer.jobs.attempt``), parsed once per process from the
environment the launcher set. ``restore`` applies the checkpoint the controller chose, on every rank, planning
it once and refusing before it reads anything when this rank's plan differs from the controller's
(``resume(expect_plan=...)``; a checkpoint committed between two ranks' listings cannot split them: the
controller names the checkpoint URI, not the root). The controller chose it by sizes, not checksums: each
rank checks the checksums as it reads, and one that finds the checkpoint corrupt quarantines it, so the
controller's next attempt falls back to the previous checkpoint. ``save`` reports progress every call
(heartbeat for hang detection, metrics) and writes on rank 0 every ``checkpoint.every`` steps
(replicated DDP state), or on every rank together when the model is sharded (FSDP2, ``scaling.sharding: fsdp``:
``build`` shards it). Outside a resumer-launched job both calls are harmless no-ops (restore returns 0).

Preemption: ``restore`` installs a SIGTERM handler (``resumer.jobs.preemption``). After a notice, the next
``save`` on the notified rank writes an emergency checkpoint of its (replicated) state, whatever the
cadence, and raises ``resumer.core.errors.Preempted``; the controller resumes from that checkpoint. When
several ranks are notified at once, the first to claim the step on the progress board writes it. With sharded
state every rank writes the emergency checkpoint together: the ranks agree at each ``save`` whether any was notified.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from typing import Any

import torch
from torch import nn

from resumer.core.errors import AlreadyCommitted, CheckpointError, Preempted, ResumerError
from resumer.jobs import preemption
from resumer.jobs.attempt import ENV, AttemptConfig
from resumer.jobs.board import NAMESPACE as BOARD_NAMESPACE
from resumer.jobs.board import board_name

logger = logging.getLogger(__name__)

__all__ = ["ENV", "AttemptConfig", "attempt_config", "build", "plan_hash", "rank", "report", "restore", "save"]

_board: Any = None


def attempt_config() -> AttemptConfig | None:
    """The attempt this worker belongs to, as set by the launcher, or None outside resumer."""
    raw = os.environ.get(ENV)
    return _parse(raw) if raw else None


@functools.lru_cache(maxsize=4)
def _parse(raw: str) -> AttemptConfig:
    # Parsed and validated once per attempt, not twice per training step (report + save).
    return AttemptConfig.from_json(raw)


def plan_hash(plan: Any) -> str:
    """``Plan.digest()``: what every rank must agree on before it loads."""
    return str(plan.digest())


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def _get_board(cfg: AttemptConfig) -> Any:
    global _board
    if _board is None:
        import ray

        if not ray.is_initialized():  # a plain local run: never start a Ray just to report progress
            return None
        try:
            _board = ray.get_actor(board_name(cfg.job), namespace=BOARD_NAMESPACE)
        except ValueError:
            _board = False  # no controller listening (e.g. a manual run): keep training
    return _board or None


def build() -> tuple[nn.Module, Any, Any]:
    """The job's model (prepared for DDP by Ray Train), optimizer and scheduler, from its factories."""
    from resumer.jobs.factories import build as build_from_refs

    cfg = attempt_config()
    if cfg is None:
        raise CheckpointError("resumer.jobs.worker.build() runs inside a job launched by resumer (no attempt config).")
    model = build_from_refs(cfg.model)[0]
    if cfg.sharding == "fsdp":
        model = shard(model)
    else:
        try:
            import ray.train.torch

            model = ray.train.torch.prepare_model(model)
        except (ImportError, RuntimeError):  # not inside a Ray Train worker: a plain local run
            pass
    _, optimizer, scheduler = _optimizer_for(model, cfg)  # after sharding: the optimizer holds the shards
    return model, optimizer, scheduler


def shard(model: nn.Module) -> nn.Module:
    """``model`` sharded over the process group by FSDP2 (``scaling.sharding: fsdp``): each direct child that
    holds parameters is one unit (the items of a container child, such as the blocks of an ``nn.Sequential``
    or ``nn.ModuleList``, are units of their own), then the root. A loop that shards its model its own way
    builds it itself; ``save`` and ``restore`` recognise sharded parameters either way."""
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ResumerError("scaling.sharding: fsdp needs the process group Ray Train sets up; this process has "
                           "none (run the job with 'resumer submit', or leave sharding out for a local run).")
    model = model.to(_device())
    for child in model.children():
        units = child.children() if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) else [child]
        for unit in units:
            if any(True for _ in unit.parameters()):
                fully_shard(unit)
    fully_shard(model)
    return model


def _device() -> torch.device:
    try:
        import ray.train.torch

        return torch.device(ray.train.torch.get_device())
    except (ImportError, RuntimeError):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s state is sharded (DTensors, as FSDP2 makes them): every rank then saves. Asked of the
    sharded parameters, which an FSDP2 module gets back first: after an evaluation pass it holds full, unsharded
    ones (``resumer.runtime.capture.reshard``), and a model sharded as one unit would look unsharded, so rank 0
    would save alone and wait for the others in the collective save. Called at every step: it stops at the first
    sharded parameter rather than listing the model's tensors."""
    from torch.distributed.tensor import DTensor

    from resumer.runtime.capture import reshard

    reshard(model)
    return any(isinstance(p, DTensor) for p in model.parameters())


def _optimizer_for(model: nn.Module, cfg: AttemptConfig) -> tuple[nn.Module, Any, Any]:
    from resumer.jobs.factories import resolve

    optimizer = resolve(cfg.optimizer, "optimizer")(model) if cfg.optimizer else None
    scheduler = resolve(cfg.scheduler, "scheduler")(optimizer) if cfg.scheduler and optimizer else None
    return model, optimizer, scheduler


def restore(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> int:
    """Apply the controller's checkpoint and plan on this rank; returns the last completed step (0 if fresh)."""
    import resumer

    cfg = attempt_config()
    if cfg is None:
        return 0
    preemption.install(cfg.grace_s)
    if cfg.checkpoint is None:
        return 0
    try:
        # One plan per rank: resume() plans, and refuses before reading anything if that plan's digest is not
        # the one the controller recorded; it checks the checksums as it reads (the controller checked sizes).
        res = resumer.resume(cfg.checkpoint, model, optimizer, scheduler, policy=cfg.policy,
                             renames=list(cfg.renames) or None, storage_options=cfg.storage_options or None,
                             expect_plan=cfg.plan_hash)
    except CheckpointError as exc:
        raise _restore_failed(cfg, cfg.checkpoint, exc) from exc
    logger.info("[restore] rank %d: %s", rank(), res.plan.summary())
    return res.step


def _restore_failed(cfg: AttemptConfig, uri: str, exc: CheckpointError) -> CheckpointError:
    """The error this rank's failed restore ends the attempt with. A checkpoint found bad (corrupt, torn; not
    a plan that differs, nor one a newer resumer can read) is quarantined first: the controller selected it by
    sizes, and its next attempt must fall back to the previous checkpoint instead of choosing this one again."""
    if exc.quarantine and _still_committed(uri, cfg.storage_options or None):
        from resumer.checkpoints.catalog import quarantine

        quarantine(uri, f"rank {rank()} could not restore it: {exc}", cfg.storage_options or None)
    return CheckpointError(f"rank {rank()}: {exc}", uri=exc.uri or uri, quarantine=exc.quarantine)


def _still_committed(uri: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``uri`` still has its manifest (a mark is never written into a directory that is gone)."""
    from resumer.formats.native.manifest import MANIFEST
    from resumer.storage.store import Store

    try:
        return Store.open(uri, storage_options).exists(MANIFEST)
    except (OSError, ResumerError):  # unreachable after its retries: no mark either
        return False


def report(step: int, metrics: dict[str, float] | None = None) -> None:
    """Heartbeat: the step this rank just finished (and metrics from rank 0). Non-blocking."""
    cfg = attempt_config()
    board = _get_board(cfg) if cfg else None
    if board is not None:
        board.beat.remote(rank(), step, metrics if rank() == 0 else None, time.time(), socket.gethostname(),
                          os.getpid(), _node_id())


def _node_id() -> str:
    """This worker's Ray node (where the controller sends a kill for a hung step), or "" outside Ray."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except (ImportError, RuntimeError):
        return ""


def save(step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, *,
         metrics: dict[str, float] | None = None, force: bool = False) -> str | None:
    """Report progress; on rank 0, every ``checkpoint.every`` steps (or when ``force``), save and commit.

    After a preemption notice: writes an emergency checkpoint (see the module doc) and raises ``Preempted``.
    """
    report(step, metrics)
    cfg = attempt_config()
    if cfg is None:
        return None
    if sharded(model):
        return _save_sharded(cfg, step, model, optimizer, scheduler, metrics, force)
    if preemption.noticed() is not None:
        uri = _emergency(cfg, step, model, optimizer, scheduler, metrics) if _claim(cfg, step) else None
        raise Preempted(step, uri)
    if (not force and step % cfg.every != 0) or rank() != 0:
        return None
    return _write(cfg, step, model, optimizer, scheduler, metrics)


def _save_sharded(cfg: AttemptConfig, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
                  metrics: dict[str, float] | None, force: bool) -> str | None:
    """``save`` for sharded state: each rank holds only its shards, so every rank writes (a collective call of
    ``save_checkpoint``; ``force`` must be the same on every rank). A preemption notice reaches the ranks one
    by one, so they first agree whether any was notified (one small all-reduce per call): then all of them
    write the emergency checkpoint together, or none does; a checkpoint missing the notified rank's shards is
    never committed."""
    if _any_rank_noticed():
        try:
            uri = _write(cfg, step, model, optimizer, scheduler, metrics, emergency=True)
        except AlreadyCommitted as exc:  # this step was committed by the cadence save before the notice
            uri = str(exc.uri)
        raise Preempted(step, uri)
    if not force and step % cfg.every != 0:
        return None
    return _write(cfg, step, model, optimizer, scheduler, metrics)


def _any_rank_noticed() -> bool:
    """Whether any rank has had a preemption notice (every rank calls this at the same step)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if preemption.noticed() is not None else 0],
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _emergency(cfg: AttemptConfig, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
               metrics: dict[str, float] | None) -> str:
    """The emergency checkpoint of ``step``. On a cadence step, rank 0's regular save of the same (replicated)
    state may commit first: that checkpoint stands and serves, so the notice still ends as a preemption."""
    try:
        return _write(cfg, step, model, optimizer, scheduler, metrics, emergency=True)
    except AlreadyCommitted as exc:
        logger.warning("[preemption] rank %d: step %d was committed by another save first (%s); resuming from it",
                       rank(), step, exc.uri)
        return str(exc.uri)


def _claim(cfg: AttemptConfig, step: int) -> bool:
    """Whether this rank writes the emergency checkpoint of ``step`` (the first notified rank does)."""
    board = _get_board(cfg)
    if board is None:
        return True
    try:
        import ray

        return bool(ray.get(board.claim.remote(step, rank()), timeout=10))
    except Exception as exc:  # noqa: BLE001 - no answer from the board: write it (a duplicate is safe)
        logger.warning("[preemption] progress board unreachable (%s): writing the emergency checkpoint", exc)
        return True


def _write(cfg: AttemptConfig, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
           metrics: dict[str, float] | None, *, emergency: bool = False) -> str:
    import resumer

    started = time.monotonic()
    extra = {"metrics": metrics or {}, "job": cfg.job, "attempt": cfg.attempt}
    if emergency:
        extra |= {"emergency": True, "rank": rank()}
    uri = resumer.save_checkpoint(cfg.root, step, model, optimizer, scheduler, extra=extra,
                                  storage_options=cfg.storage_options or None)
    if emergency:
        notice = preemption.noticed() or time.time()
        logger.warning("[preemption] rank %d: emergency checkpoint %s committed %.1fs after the notice (%.1fs)",
                       rank(), uri, time.time() - notice, time.monotonic() - started)
    if rank() != 0 and sharded(model):  # every rank wrote its shards: rank 0 reports and prunes, once
        return uri
    board = _get_board(cfg)
    if board is not None:
        board.committed.remote(step, uri)
    if not emergency and (cfg.keep_last or cfg.keep_every):
        _prune(cfg)
    return uri


def _prune(cfg: AttemptConfig) -> None:
    """Retention after a commit (never before: the new checkpoint must exist first). Sizes, not checksums:
    this process just wrote the newest one, checksumming as it wrote; a failure here never stops training."""
    from resumer.checkpoints.retention import RetentionPolicy, prune
    from resumer.core.errors import ResumerError

    try:
        prune(cfg.root, RetentionPolicy(keep_last=cfg.keep_last, keep_every=cfg.keep_every),
              storage_options=cfg.storage_options or None, checksums=False)
    except (OSError, ResumerError) as exc:
        logger.warning("[retention] pruning %s failed (the next save tries again): %s", cfg.root, exc)
