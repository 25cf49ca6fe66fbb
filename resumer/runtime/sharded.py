"""Sharded training state (FSDP2 / DTensor), what a resume needs of it: whether live state is sharded (or trained
across the process group), this rank's region of each tensor, the saved values laid out like the live DTensors,
and the all-ranks agreement before any rank touches its model. The collective save is
``resumer.runtime.sharded_save``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from resumer.core.errors import (
    CheckpointError,
    CheckpointMismatch,
    PlanRefused,
    RanksDiverged,
    ResumerError,
    TransientStorageError,
)
from resumer.core.plan import Action, Plan, Section
from resumer.core.signature import ParamState
from resumer.formats.native.entries import state_key
from resumer.runtime.capture import live_tensors

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether the model (or the optimizer's state) holds DTensors: FSDP2 / tensor-parallel state."""
    if any(is_dtensor(lt.tensor) for lt in live_tensors(model)):
        return True
    return optimizer is not None and any(is_dtensor(v) for st in optimizer.state.values() for v in st.values())


def distributed(model: nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether ``model`` is trained across the process group, so that a resume is a collective call every rank
    makes: sharded (DTensors), or replicated by ``DistributedDataParallel``. A plain module is this process's own
    (a rank may load it alone, for instance before wrapping it)."""
    if model is None or not collective():
        return False
    return isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model, optimizer)


def _region(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The global offsets and sizes of this rank's shard of DTensor ``t`` (None: it needs all of it)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets), tuple(int(n) for n in shape)


def local_regions(plan: Plan, model: nn.Module, saved_state: dict[str, ParamState]
                  ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Of each saved tensor (and carried optimizer state of a parameter's shape) the plan copies into a DTensor,
    the region this rank keeps: saved name or state key -> global offsets and sizes. ``saved_state``: the
    checkpoint's optimizer state specs by saved parameter name (empty when no state is carried)."""
    live = {lt.name: lt.tensor for lt in live_tensors(model)}
    of = {name: _region(t) for name, t in live.items()}  # once per live tensor: its optimizer state shares it
    regions = {}
    for e in plan.section(Section.MODEL):
        region = of.get(e.name) if e.copies else None
        if region is not None:
            regions[e.source or e.name] = region
    for e in plan.section(Section.OPTIMIZER_STATE):
        t = live.get(e.name)
        region = of.get(e.name)
        if e.action is not Action.CARRY or e.source is None or region is None or t is None:
            continue
        spec = saved_state.get(e.source)
        for entry in spec.entries if spec else ():
            if entry.shape is not None and tuple(entry.shape) == tuple(t.shape):
                regions[state_key(plan.state_key(e.source), entry.key)] = region
    return regions


def _shard_of(value: torch.Tensor, live: Any, local: bool, regions: dict[int, Any] | None) -> torch.Tensor | None:
    """This rank's shard of DTensor ``live`` in ``value``: cut from it when it is a whole saved tensor of the live
    tensor's global shape, or ``value`` itself when ``local`` (already this rank's region, read so); None when
    ``value`` is neither (a scalar such as an optimizer's ``step``)."""
    region = regions.get(id(live)) if regions is not None else None
    if region is None:
        region = _region(live)
        assert region is not None
        if regions is not None:
            regions[id(live)] = region
    if local:
        if tuple(value.shape) != region[1]:
            raise ResumerError(f"A shard read for {tuple(live.shape)} has shape {tuple(value.shape)}, not this "
                               f"rank's {region[1]} (a bug in resumer's sharded read; nothing was changed).")
        return value
    if tuple(value.shape) != tuple(live.shape):
        return None
    return value[tuple(slice(o, o + n) for o, n in zip(*region, strict=True))]


def like(value: Any, live: Any, *, local: bool = False, regions: dict[int, Any] | None = None) -> Any:
    """``value`` as this rank's shard laid out like DTensor ``live`` (see :func:`_shard_of`); anything that is not a
    piece of it as it is. ``regions``: a cache of live tensors' regions by ``id`` (one commit's; a parameter's region
    serves its optimizer state too), filled here."""
    if not is_dtensor(live) or not isinstance(value, torch.Tensor):
        return value
    from torch.distributed.tensor import DTensor

    shard = _shard_of(value, live, local, regions)
    if shard is None:
        return value
    return DTensor.from_local(shard.to(live.dtype).contiguous(), live.device_mesh, live.placements,
                              run_check=False, shape=live.shape, stride=live.stride())


def copy_target(live: torch.Tensor, value: torch.Tensor, *, local: bool = False,
                regions: dict[int, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a saved model tensor goes, and what goes there: the memory of this rank's shard of DTensor ``live``
    (its local tensor, written in place as ``load_state_dict`` writes it) and ``value``'s piece of it; a plain
    ``live`` tensor and ``value`` as they are. Raises ResumerError, before anything is written, where the two
    differ in shape."""
    target = live.detach()
    piece: torch.Tensor | None = value
    if is_dtensor(live):
        with torch.no_grad():
            target = cast(Any, live).to_local()
        piece = _shard_of(value, live, local, regions)
    if piece is None or tuple(piece.shape) != tuple(target.shape):
        raise ResumerError(f"A saved tensor of shape {tuple(value.shape)} does not fit this rank's "
                           f"{tuple(target.shape)} of the live {tuple(live.shape)} (a bug in resumer's sharded "
                           "read; nothing was changed).")
    return target, piece


def collective() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def together(distributed: bool, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on every rank of a collective resume, before its agreement (``agree``): opening the checkpoint,
    leasing it, planning. With a ``distributed`` model every rank learns whether every rank got through: where one
    rank failed (its storage, say), it raises its own error and every other rank raises one naming it, of the same
    kind where that kind is a storage or checkpoint error. Else the others would wait for it in the agreement until
    the process group timed out. ``what``: the step, for the message ("open the checkpoint")."""
    if not distributed:
        return fn()
    error: Exception | None = None
    try:
        out: T | None = fn()
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait for this one
        out, error = None, exc
    gathered: list[Any] = [None] * dist.get_world_size()
    mine = None if error is None else (type(error).__name__, str(error), getattr(error, "uri", None))
    dist.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    for rank, g in enumerate(gathered):
        if g is None:
            continue
        name, message, uri = g
        text = (f"Rank {rank} of {len(gathered)} could not {what} ({name}: {message}); every rank stopped before "
                "reading, none changed its model.")
        if name == "TransientStorageError":
            raise TransientStorageError(text, uri=uri)
        if name in ("CheckpointError", "CheckpointMismatch", "RanksDiverged"):
            raise CheckpointError(text, uri=uri, quarantine=False)
        raise ResumerError(text)
    return cast(T, out)


def agree(error: Exception | None, plan: Plan | None = None) -> None:
    """All ranks agree on a staged resume before any touches its model: every rank's plan (its digest) and verdict
    are gathered, and every rank then does the same.

    * Ranks whose plans differ all raise RanksDiverged (naming each rank's checkpoint and plan), whatever else
      failed: ranks that chose different checkpoints from a root (one was committed, marked or removed between
      their listings) would otherwise train on mixed state, or pass over and mark each its own checkpoint for
      another rank's fault.
    * A plan that is not ok (the same on every rank) raises PlanRefused on every rank.
    * If any rank failed, every rank raises the first failing rank's error, as a CheckpointError (a
      CheckpointMismatch when it was one) with the same text on every rank."""
    if not collective():
        if error is not None:
            raise error
        if plan is not None and not plan.ok:
            raise PlanRefused(plan)
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    verdict = None if error is None else (type(error).__name__, str(error), getattr(error, "uri", None),
                                          bool(getattr(error, "quarantine", False)))
    mine = (None if plan is None else plan.digest(), None if plan is None else plan.checkpoint, verdict)
    dist.all_gather_object(gathered, mine)
    if len({digest for digest, _, _ in gathered}) > 1:
        each = "; ".join(f"rank {rank}: {uri} (plan {digest})" for rank, (digest, uri, _) in enumerate(gathered))
        raise RanksDiverged(f"The {len(gathered)} ranks planned different resumes ({each}): from a root, a "
                            "checkpoint was committed, marked or removed while they listed it, or the ranks' models "
                            "differ. No rank changed its model. Resume again; if this repeats, check that every "
                            "rank builds the same model.", uri=plan.checkpoint if plan is not None else None)
    if plan is not None and not plan.ok:
        raise PlanRefused(plan)
    for rank, (_, _, g) in enumerate(gathered):
        if g is None:
            continue
        name, message, uri, quarantine = g
        text = f"{message} (found by rank {rank} of {len(gathered)}; every rank refused, none changed its model)"
        if name == "CheckpointMismatch":
            raise CheckpointMismatch(text, uri=uri)
        raise CheckpointError(text, uri=uri, quarantine=quarantine)
