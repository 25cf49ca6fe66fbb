"""The public entry points: plan() and resume() on a checkpoint of any registered format, or a root.

Which format a checkpoint is, and how it is read, is ``resumer.formats.registry``'s to say; a root of native
checkpoints (the newest valid one is used) is checkpoint selection, ``resumer.checkpoints.catalog``'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from resumer.checkpoints import foreign, lease
from resumer.checkpoints.catalog import list_checkpoints, quarantine, select
from resumer.core.errors import CheckpointError, CheckpointMismatch, RanksDiverged
from resumer.core.plan import Plan, Policy
from resumer.core.reconcile import reconcile
from resumer.formats import registry
from resumer.formats.native.manifest import STEP_DIR
from resumer.formats.native.source import NativeSource
from resumer.formats.source import CheckpointSource, ReadOptions
from resumer.runtime import sharded
from resumer.runtime.apply import ResumeResult, commit, stage
from resumer.runtime.capture import signature
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

# Times a collective resume from a root chooses again after its ranks chose different checkpoints (a listing race).
RECHOOSE = 3


def open_source(checkpoint: str | Store, storage_options: dict[str, Any] | None = None, *, checksums: bool = True,
                select_verified: bool = True, progress: Any = None) -> CheckpointSource:
    """A checkpoint of any registered format (``resumer.formats.registry``), or a root (its newest valid
    checkpoint); ``checkpoint`` is a URI (with ``storage_options``) or a Store."""
    return _open(Store.of(checkpoint, storage_options), checksums=checksums, select_verified=select_verified,
                 progress=progress)[0]


def _open(store: Store, *, checksums: bool, select_verified: bool = True, progress: Any = None,
          defer: bool = False, passed_over: Mapping[str, str] | None = None) -> tuple[CheckpointSource, bool]:
    """``open_source``, and whether the source was chosen from a root.

    ``defer``: choose a root's checkpoint by its manifest and file sizes only; its checksums are then
    checked as it is read (one pass instead of two), and a caller that finds it bad passes it over
    (``passed_over``: URI -> why) and asks again.
    """
    options = ReadOptions(checksums=checksums, progress=progress)
    found = registry.detect(store)
    if found is not None:
        return registry.open(store, options, format=found), False
    if not store.isdir():
        if store.exists():
            raise registry.unrecognised(store)
        raise CheckpointError(f"No checkpoint at {store.uri}: the path does not exist.", uri=store.uri)
    return _open_root(store, options, select_verified=select_verified, defer=defer, passed_over=passed_over), True


def _open_root(store: Store, options: ReadOptions, *, select_verified: bool, defer: bool,
               passed_over: Mapping[str, str] | None) -> CheckpointSource:
    """The newest committed (and, with ``select_verified``, verified) native checkpoint under the root ``store``;
    in a folder of other tools' checkpoints, the newest that opens (``resumer.checkpoints.foreign``)."""
    kids = foreign.children(store)  # one listing; a folder mixing two tools' namings is refused here
    chosen = foreign.open_newest(store, kids, options, passed_over) if foreign.other_tools(kids) else None
    if chosen is not None:
        return chosen
    if select_verified:
        info = select(store, checksums=options.checksums and not defer, progress=options.progress,
                      exclude=passed_over).chosen
    else:
        infos = list_checkpoints(store)
        info = infos[0] if infos else None
    if info is None:
        chosen = foreign.open_newest(store, kids, options, passed_over)  # torchtitan's step-N DCP directories
        if chosen is not None:
            return chosen
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in store.ls()]
        if passed_over:
            why = f"every committed checkpoint failed verification ({len(passed_over)} passed over; see the log)"
        elif any(n.endswith(".safetensors") for n in names):
            why = "it holds data files but no manifest.json: a torn checkpoint (the writer stopped before committing)"
        elif any(STEP_DIR.match(n) for n in names):
            why = "no committed, valid checkpoint lies under it"
        else:
            raise registry.unrecognised(store, "it is no checkpoint of a known format, and no root of resumer "
                                               "checkpoints (no step-N directory under it)")
        raise CheckpointError(f"Cannot resume from {store.uri}: {why}. Nothing was loaded or deleted.", uri=store.uri)
    foreign.refuse_beside(store, kids, info.step)
    return NativeSource(info.manifest, store=store.child(info.uri.rstrip("/").rsplit("/", 1)[-1]),
                        checksums=options.checksums, progress=options.progress,
                        verified=select_verified and not defer)


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
           storage_options: dict[str, Any] | None = None, verify: bool = True, progress: Any = None,
           expect_plan: str | None = None) -> ResumeResult:
    """Plan, verify, and apply: the model, optimizer, scheduler and RNG continue from the checkpoint.

    ``expect_plan``: the ``Plan.digest()`` another process (a job's controller) made for this checkpoint;
    a plan that differs is refused (CheckpointMismatch) before anything is read or changed.

    A model trained across a process group (FSDP2-sharded, or wrapped in DistributedDataParallel) makes this a
    collective call: every rank calls it, and every rank's checks and reads are gathered before any rank
    touches its state; if one rank refuses, every rank raises the same CheckpointError and nothing changed
    anywhere. Ranks that planned differently (from a root, a checkpoint committed between their listings) all
    raise RanksDiverged, and from a root choose again together; a rank that cannot open the checkpoint stops
    every rank at once. A plain module is resumed by the calling process alone.

    From a root, the newest committed checkpoint is read once, its checksums checked on the way; one found
    corrupt is quarantined and passed over for the next newest, before anything live was touched.
    Raises PlanRefused (with ``.plan``) when the plan is not ok under ``policy``, and CheckpointError
    when the checkpoint is torn, corrupt or unsafe; in both cases nothing was changed.
    """
    store = Store.open(checkpoint_or_root, storage_options)
    passed_over: dict[str, str] = {}
    rechosen = 0
    # A model trained across the process group makes this collective: every rank's open, lease and plan are
    # gathered before the reads (sharded.together), and every rank's plan and reads before any rank changes its model
    # (stage); a failure on one rank is every rank's, at each of the two.
    ranks = sharded.distributed(model, optimizer)
    while True:
        with contextlib.ExitStack() as held:
            def prepare() -> tuple[CheckpointSource, bool, Plan]:
                source, from_root = _open(store, checksums=verify, progress=progress, defer=True,
                                          passed_over=passed_over)
                held.callback(source.close)
                # Retention manages native checkpoints: one is leased for the whole read, so a prune cannot delete it
                # under us (see resumer.checkpoints.lease.reading). Other formats are not retention's to delete.
                if source.format == registry.NATIVE:
                    held.enter_context(lease.reading(source.uri, store.options))
                return source, from_root, _plan_for(source, model, optimizer, scheduler, policy, renames)

            source, from_root, the_plan = sharded.together(ranks, prepare, "open and plan the checkpoint")
            split = None
            if expect_plan is not None and the_plan.digest() != expect_plan:
                # Refused before reading; with a distributed model every rank refuses with it (stage).
                split = CheckpointMismatch(f"This process planned {source.uri} differently from the "
                                           f"controller ({the_plan.summary()}); refusing to train on split "
                                           "state. Nothing was changed.", uri=source.uri)
            try:
                staged = stage(the_plan, source, optimizer, verify=verify, model=model, scheduler=scheduler,
                               refused=split)
            except RanksDiverged as exc:
                if not from_root or rechosen >= RECHOOSE:
                    raise
                # Every rank got this error (they agreed on it): all choose again from one new listing each.
                rechosen += 1
                logger.warning("[select] the ranks chose different checkpoints; choosing again: %s", exc)
                continue
            except CheckpointError as exc:
                if not from_root or isinstance(exc, CheckpointMismatch):
                    raise  # a mismatch with this code: an older checkpoint would silently lose progress
                # Nothing live was touched yet: mark it (never delete) and take the next newest.
                logger.warning("[select] passed over %s: %s", source.uri, exc)
                # Not for what a newer resumer can read, a copied step dir, or another tool's checkpoint.
                if exc.quarantine and source.format == registry.NATIVE:
                    quarantine(source.uri, str(exc), store.options)
                passed_over[source.uri] = str(exc)
                continue
            return commit(staged, model, optimizer, scheduler)
