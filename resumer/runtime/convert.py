"""convert: a checkpoint of any registered format becomes a native resumer checkpoint, through a plan.

The source is resumed into the CURRENT objects (the caller builds them) under a policy, exactly as
``resumer.resume`` does, and what the objects then hold is saved as a native checkpoint at the source's step,
with where it came from and the plan that produced it in its user metadata (``extra["converted_from"]``).
Order, and why: the plan is made and checked (refused: nothing is read or written), the target step is
checked to be free, the source is resumed with that plan's digest (a source that changed in between is
refused), the checkpoint is written (data first, manifest last), and then read back and checksummed before
success is reported; one that fails its checksums is quarantined (never deleted) and the conversion fails.

RNG: the native checkpoint holds the RNG streams the plan restored from the source and no others (saving
captures the process's streams, which after the resume are the source's; the kinds the source did not hold
would be this process's own, and are left out). The caller's own RNG is put back afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resumer.checkpoints.catalog import quarantine
from resumer.core.errors import CheckpointError, PlanRefused, UsageError
from resumer.core.plan import Action, Plan, Policy, Section
from resumer.core.reconcile import reconcile
from resumer.formats import rng
from resumer.formats.native.manifest import MANIFEST, step_dir
from resumer.formats.native.verify import read_manifest, verify
from resumer.runtime.api import open_source, resume
from resumer.runtime.capture import signature
from resumer.runtime.save import Snapshot, snapshot, write_snapshot
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

EXTRA_KEY = "converted_from"


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversion:
    """What ``convert`` did: the source (URI, format), the plan applied, and the native checkpoint written."""

    source: str
    format: str
    step: int
    plan: Plan
    checkpoint: str
    total_bytes: int
    rng: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "source": self.source, "format": self.format, "step": self.step,
                "checkpoint": self.checkpoint, "bytes": self.total_bytes, "verified": True,
                "rng": list(self.rng), "notes": list(self.notes), "plan_digest": self.plan.digest(),
                "plan": self.plan.to_dict()}


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _check_target(root: Store, step: int, source: Store) -> Store:
    """The step directory to write: refused (UsageError) when a checkpoint is committed there, or when it would
    land inside the source itself."""
    target = root.child(step_dir(step))
    if target.exists(MANIFEST):
        raise UsageError(f"{target.uri} already holds a committed checkpoint (step {step}); convert never "
                         "overwrites one. Pass another ROOT. Nothing was written.")
    src = source.uri.rstrip("/")
    if target.uri == src or target.uri.startswith(src + "/"):
        raise UsageError(f"ROOT {root.uri} would put the converted checkpoint inside the source {source.uri}. "
                         "Pass a ROOT outside it. Nothing was written.")
    return target


def _restored_rng(plan: Plan) -> set[str]:
    return {e.name for e in plan.section(Section.RNG) if e.action is Action.RESTORE}


def convert(source: str, root: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, *, policy: Policy | str = "strict", renames: Any = None,
            storage_options: dict[str, Any] | None = None,
            target_options: dict[str, Any] | None = None) -> Conversion:
    """Resume ``source`` (any registered format, or a root) into these objects and save them under ``root``
    as a native checkpoint at the source's step, verified. The objects are left resumed; the process's RNG is
    put back as it was (the checkpoint carries the source's).

    ``storage_options`` are the source's; ``target_options`` the root's (default: the same).

    Raises:
        PlanRefused: the plan is not ok under ``policy`` (nothing was read past the plan, nothing written).
        UsageError: ``root`` already holds a checkpoint at that step, or lies inside the source.
        CheckpointError: the source is unreadable or unsafe (nothing written), or the written checkpoint
            failed its checksums (it is quarantined, not deleted).
    """
    opened = open_source(source, storage_options, checksums=False)
    try:
        fmt, uri = opened.format, opened.uri
        current = signature(model, optimizer, scheduler, world_size=_world_size())
        the_plan = reconcile(opened.signature, current, policy, renames, checkpoint=uri)
    finally:
        opened.close()
    if not the_plan.ok:
        raise PlanRefused(the_plan)
    notes = [] if the_plan.step is not None else [f"{uri} records no step: the native checkpoint is step 0"]
    step = the_plan.step or 0
    target_options = storage_options if target_options is None else target_options
    root_store = Store.open(root, target_options)
    _check_target(root_store, step, Store.open(uri, storage_options))
    caller_rng = rng.capture()
    try:
        res = resume(uri, model, optimizer, scheduler, policy=policy, renames=renames,
                     storage_options=storage_options, expect_plan=the_plan.digest())
        # The plan applied (its digest is the one checked above; its notes are the applying read's own).
        extra = {**res.extra, EXTRA_KEY: {"uri": uri, "format": fmt, "step": res.plan.step,
                                          "plan_digest": res.plan.digest(), "plan": res.plan.to_dict()}}
        snap = snapshot(step, model, optimizer, scheduler, extra=extra)
    finally:
        rng.restore(rng.parse(caller_rng))
    carried = _keep_rng(snap, _restored_rng(res.plan), notes)
    written = write_snapshot(snap, root_store)
    total = _verify_written(written, target_options, the_plan.digest())
    logger.info("[convert] %s (%s) step=%d -> %s: %d bytes, verified", uri, fmt, step, written, total)
    return Conversion(source=uri, format=fmt, step=step, plan=res.plan, checkpoint=written, total_bytes=total,
                      rng=carried, notes=tuple(notes))


def _keep_rng(snap: Snapshot, restored: set[str], notes: list[str]) -> tuple[str, ...]:
    """Keep in ``snap`` only the RNG streams the plan restored from the source (the rest are this process's)."""
    state = snap.meta["rng"]
    kept = {k: v for k, v in state.items() if k in restored}
    lost = sorted(restored - set(kept))
    if lost:
        notes.append(f"RNG {', '.join(lost)} restored from the source but not carried (not active in this process)")
    if not restored:
        notes.append("the plan restored no RNG state: the native checkpoint holds none")
    snap.meta["rng"] = kept
    snap.meta["signature"]["rng"] = list(kept)
    return tuple(kept)


def _verify_written(uri: str, storage_options: dict[str, Any] | None, digest: str) -> int:
    """Read the written checkpoint back: its manifest, every file's size and checksum, the recorded plan."""
    try:
        manifest = read_manifest(uri, storage_options)
        verify(manifest, storage_options, checksums=True)
        recorded = manifest.extra.get(EXTRA_KEY, {}) if isinstance(manifest.extra, dict) else {}
        if not isinstance(recorded, dict) or recorded.get("plan_digest") != digest:
            raise CheckpointError(f"{uri}: the manifest does not record the plan {digest} that produced it.",
                                  uri=uri)
    except CheckpointError as exc:
        quarantine(uri, f"converted checkpoint failed verification: {exc}", storage_options)
        raise CheckpointError(f"The converted checkpoint {uri} failed verification after writing ({exc}). It was "
                              "quarantined (not deleted) and is not used; convert again into another ROOT.",
                              uri=uri) from None
    return manifest.total_bytes
