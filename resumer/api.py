"""The public entry points: plan() and resume() on a checkpoint URI, a root, or a torch.save file."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import nn

from resumer import lease
from resumer.apply import ResumeResult, apply_plan
from resumer.capture import signature
from resumer.catalog import latest_checkpoint, list_checkpoints
from resumer.errors import CheckpointError
from resumer.manifest import MANIFEST
from resumer.plan import Plan, Policy
from resumer.reconcile import reconcile
from resumer.source import CheckpointSource, NativeSource
from resumer.store import get_fs, join, read_manifest

logger = logging.getLogger(__name__)


def open_source(checkpoint: str, storage_options: dict[str, Any] | None = None, *, checksums: bool = True,
                select_verified: bool = True, progress: Any = None) -> CheckpointSource:
    """A checkpoint URI, a root (its newest valid checkpoint), or a plain torch.save file."""
    checkpoint = str(checkpoint)
    fs, path = get_fs(checkpoint, storage_options)
    if fs.isfile(path):
        if path.endswith(f"/{MANIFEST}") or path == MANIFEST:
            return open_source(checkpoint.rsplit("/", 1)[0], storage_options, checksums=checksums,
                               progress=progress)
        from resumer.foreign import ForeignSource

        return ForeignSource.open(checkpoint, storage_options)
    if fs.exists(join(path, MANIFEST)):
        return NativeSource(read_manifest(checkpoint, storage_options), storage_options, checksums=checksums,
                            progress=progress)
    if not fs.exists(path):
        raise CheckpointError(f"No checkpoint at {checkpoint}: the path does not exist.", uri=checkpoint)
    if select_verified:
        info = latest_checkpoint(checkpoint, storage_options=storage_options, checksums=checksums,
                                 progress=progress)
    else:
        infos = list_checkpoints(checkpoint, storage_options=storage_options)
        info = infos[0] if infos else None
    if info is None:
        has_data = any(str(p).endswith(".safetensors") for p in fs.ls(path, detail=False))
        why = ("it holds data files but no manifest.json: a torn checkpoint (the writer stopped before committing)"
               if has_data else "no committed, valid checkpoint lies under it")
        raise CheckpointError(f"Cannot resume from {checkpoint}: {why}. Nothing was loaded or deleted.",
                              uri=checkpoint)
    return NativeSource(info.manifest, storage_options, checksums=checksums, progress=progress,
                        verified=select_verified)


def plan(checkpoint: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
         *, policy: Policy | str = "strict", renames: Any = None,
         storage_options: dict[str, Any] | None = None) -> Plan:
    """What resuming ``checkpoint`` into these objects would do. Reads manifests only, no tensor bytes
    (for a root, selecting the newest valid checkpoint verifies sizes, not checksums)."""
    source = open_source(checkpoint, storage_options, checksums=False)
    try:
        return _plan_for(source, model, optimizer, scheduler, policy, renames)
    finally:
        source.close()


def _plan_for(source: CheckpointSource, model: nn.Module, optimizer: Any, scheduler: Any, policy: Any,
              renames: Any, *, world_size: int | None = None) -> Plan:
    """``world_size``: the world the plan is for (default: this process's); a controller plans for its job's."""
    started = time.perf_counter()
    current = signature(model, optimizer, scheduler, world_size=world_size or _world_size())
    result = reconcile(source.signature, current, policy, renames, checkpoint=source.uri)
    logger.debug("planned %s in %.1f ms", source.uri, (time.perf_counter() - started) * 1e3)
    return result


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def resume(checkpoint_or_root: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           scheduler: Any = None, *, policy: Policy | str = "strict", renames: Any = None,
           storage_options: dict[str, Any] | None = None, verify: bool = True, progress: Any = None) -> ResumeResult:
    """Plan, verify, and apply: the model, optimizer, scheduler and RNG continue from the checkpoint.

    Raises PlanRefused (with ``.plan``) when the plan is not ok under ``policy``, and CheckpointError
    when the checkpoint is torn, corrupt or unsafe; in both cases nothing was changed.
    """
    source = open_source(checkpoint_or_root, storage_options, checksums=verify, progress=progress)
    try:
        # Leased for the whole read, so retention cannot delete it under us (see resumer.lease.reading).
        guard = (lease.reading(source.uri, storage_options) if isinstance(source, NativeSource)
                 else contextlib.nullcontext())
        with guard:
            the_plan = _plan_for(source, model, optimizer, scheduler, policy, renames)
            return apply_plan(the_plan, source, model, optimizer, scheduler, verify=verify)
    finally:
        source.close()
