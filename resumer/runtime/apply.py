"""apply: execute a Plan on live objects, in two steps, so a failed resume changes nothing.

``stage`` does everything that can fail: the source's own checks (``prepare``: for the native format the
manifest's consistency and file sizes), the saved values against the live objects (resumer.runtime.preflight),
and the model tensors and carried optimizer state read into fresh memory (``load``: for the native format
each file once, header checked and checksummed as it is read). ``commit`` then only copies memory: model
tensors in place, the optimizer state re-keyed from saved names to the current optimizer's positions,
scheduler and RNG. Storage that fails mid-read (a killed server) fails ``stage``, before anything live
changed. The cost: fresh memory for the model tensors (the model's size) until ``commit`` has copied them.
It works on any ``resumer.formats.source.CheckpointSource``: nothing here knows a format.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resumer.core.errors import PlanRefused
from resumer.core.plan import Action, Plan, Section
from resumer.formats import rng
from resumer.formats.native.entries import state_key
from resumer.formats.source import CheckpointSource
from resumer.runtime import preflight, sharded
from resumer.runtime.capture import live_tensors, optimizer_param_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeResult:
    """What a resume did: the step to continue after, the plan applied, and what it cost."""

    step: int
    plan: Plan
    checkpoint: str
    bytes_read: int = 0
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Staged:
    """A plan whose checkpoint has been verified and whose optimizer state is in memory; nothing applied yet."""

    plan: Plan
    source: CheckpointSource
    carry: bool
    started: float
    sharded: ShardedCommit | None = None


@dataclass(slots=True)
class ShardedCommit:
    """A sharded commit made ready before the ranks agree, so that what can fail fails there: each saved model
    tensor's piece with the live memory it goes into, and the optimizer state dict (DTensors laid out like the live
    parameters) the optimizer loads."""

    copies: list[tuple[torch.Tensor, torch.Tensor]]
    optimizer_state: dict[str, Any] | None


def stage(plan: Plan, source: CheckpointSource, optimizer: torch.optim.Optimizer | None = None, *,
          verify: bool = True, model: nn.Module | None = None, scheduler: Any = None,
          refused: Exception | None = None) -> Staged:
    """Everything that can fail, before anything live is touched: PlanRefused when the plan is not ok,
    CheckpointError when the checkpoint is corrupt or holds values the live objects cannot take, a
    ResumerError when storage fails (then nothing changed, and a caller may try another checkpoint).

    ``verify``: kept for callers; whether bytes are checksummed is the source's own setting (``resume``
    opens it with ``checksums=verify``). ``model`` and ``scheduler``: the live objects the saved values are
    checked against (shapes, scheduler state); without them those checks are skipped. ``refused``: this rank's
    reason not to go on, found before staging (a plan that differs from the controller's): raised, and with a
    distributed model every rank refuses with it.
    """
    if not sharded.distributed(model, optimizer):
        if not plan.ok:
            raise PlanRefused(plan)
        if refused is not None:
            raise refused
        return _stage(plan, source, optimizer, model=model, scheduler=scheduler)
    # A model trained across the process group (sharded, or replicated by DDP): every rank's plan, checks and
    # reads are gathered before any rank goes on to touch its model. Plans that differ (ranks that chose different
    # checkpoints) are every rank's refusal, and so is one rank's failed check or read (the same error
    # everywhere), so no rank trains on state the others do not have.
    try:
        if refused is not None:
            raise refused
        staged = _stage(plan, source, optimizer, model=model, scheduler=scheduler) if plan.ok else None
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement, or the others hang
        sharded.agree(exc, plan)
        raise  # agree raised already; for the type checker
    sharded.agree(None, plan)  # raises PlanRefused where the plan is not ok (on every rank: the plans agree)
    assert staged is not None
    return staged


def _stage(plan: Plan, source: CheckpointSource, optimizer: torch.optim.Optimizer | None, *,
           model: nn.Module | None, scheduler: Any) -> Staged:
    started = time.perf_counter()
    carry = optimizer is not None and plan.optimizer_action() is Action.CARRY
    carried = {e.source for e in plan.section(Section.OPTIMIZER_STATE)
               if e.action is Action.CARRY and e.source is not None} if carry else set()
    copies = {e.source or e.name for e in plan.section(Section.MODEL) if e.copies}
    source.prepare()
    if model is not None:
        preflight.check_model(plan, source, model)
        if carry:
            preflight.check_state(plan, source, model)
    if carry:
        assert optimizer is not None
        preflight.check_groups(plan, source, optimizer)
    preflight.check_scheduler(plan, source, scheduler)
    restrict = getattr(source, "restrict", None)
    if model is not None and restrict is not None and sharded.is_sharded(model, optimizer):
        saved = source.signature.optimizer.state_by_param() if carry and source.signature.optimizer else {}
        restrict(sharded.local_regions(plan, model, saved))
    source.load(copies, carried)
    staged = Staged(plan=plan, source=source, carry=carry, started=started)
    if model is not None and sharded.is_sharded(model, optimizer):
        staged.sharded = _prepare_sharded(staged, model, optimizer)
    return staged


def commit(staged: Staged, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           scheduler: Any = None) -> ResumeResult:
    """Apply a staged plan to the live objects: model tensors in place, optimizer, scheduler, RNG."""
    plan, source = staged.plan, staged.source
    tensors = live_tensors(model)
    by_name = {lt.name: lt.tensor for lt in tensors}
    if sharded.is_sharded(model, optimizer):
        ready = staged.sharded or _prepare_sharded(staged, model, optimizer)
        with torch.no_grad():
            for target, value in ready.copies:
                target.copy_(value)
        if ready.optimizer_state is not None:
            assert optimizer is not None
            optimizer.load_state_dict(ready.optimizer_state)
    else:
        with torch.no_grad():
            for e in plan.section(Section.MODEL):
                if e.copies:
                    by_name[e.name].detach().copy_(source.tensor(e.source or e.name))
        if staged.carry:
            assert optimizer is not None
            _apply_optimizer(plan, source, optimizer, {id(lt.tensor): lt.name for lt in tensors})
    if scheduler is not None and any(e.action is Action.RESTORE for e in plan.section(Section.SCHEDULER)):
        scheduler.load_state_dict(source.scheduler_state())
    if any(e.action is Action.RESTORE for e in plan.section(Section.RNG)):
        state = source.rng_state()
        if state:
            rng.restore(state)
    seconds = time.perf_counter() - staged.started
    logger.info("%s", plan.summary())
    return ResumeResult(step=plan.step or 0, plan=plan, checkpoint=source.uri, bytes_read=source.bytes_read,
                        load_seconds=seconds, extra=source.extra())


def _prepare_sharded(staged: Staged, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> ShardedCommit:
    """Sharded live state (FSDP2 / DTensor): each rank's own shard of the saved tensors (cut from what it read: its
    region of each, see ``sharded.local_regions``). The model's are copied into the memory of the live DTensors'
    local shards, as torch's ``load_state_dict`` copies them (through ``set_model_state_dict`` it also converted
    names and made a DTensor of each piece first, which cost more than the copies); the FSDP2 modules hold their
    sharded parameters (``capture.reshard``). The optimizer's become DTensors laid out like the live parameters,
    loaded by the optimizer's own ``load_state_dict``, keyed by position as for unsharded state. Not
    ``set_optimizer_state_dict``: on an optimizer with no state yet (every relaunched job's) it first runs a step at
    learning rate 0 over every parameter to create state it then replaces, which costs a training step's memory and
    time and moves the parameters of any optimizer whose update does not vanish at learning rate 0."""
    plan, source = staged.plan, staged.source
    tensors = live_tensors(model)
    live = {lt.name: lt.tensor for lt in tensors}
    is_local = getattr(source, "is_local", lambda key: False)  # read as this rank's region only (restrict)
    regions: dict[int, Any] = {}  # each live DTensor's region, worked out once
    copies = [sharded.copy_target(live[e.name], source.tensor(e.source or e.name), local=is_local(e.source or e.name),
                                  regions=regions)
              for e in plan.section(Section.MODEL) if e.copies]
    if not staged.carry:
        return ShardedCommit(copies=copies, optimizer_state=None)
    assert optimizer is not None
    osd, position = _optimizer_state(plan, source, optimizer, {id(lt.tensor): lt.name for lt in tensors})
    name_of = {i: n for n, i in position.items()}
    saved_of = {e.name: plan.state_key(e.source) for e in plan.section(Section.OPTIMIZER_STATE)
                if e.action is Action.CARRY and e.source is not None}
    osd["state"] = {i: {k: sharded.like(v, live[name_of[i]], local=is_local(state_key(saved_of[name_of[i]], k)),
                                        regions=regions)
                        for k, v in st.items()}
                    for i, st in osd["state"].items()}
    return ShardedCommit(copies=copies, optimizer_state=osd)


def _apply_optimizer(plan: Plan, source: CheckpointSource, optimizer: torch.optim.Optimizer,
                     names: dict[int, str]) -> None:
    # load_state_dict matches this structure exactly (we built it from the live optimizer) and casts
    # state to each parameter's dtype and device, as torch does for any resume.
    optimizer.load_state_dict(_optimizer_state(plan, source, optimizer, names)[0])


def _optimizer_state(plan: Plan, source: CheckpointSource, optimizer: torch.optim.Optimizer,
                     names: dict[int, str]) -> tuple[dict[str, Any], dict[str, int]]:
    """The optimizer state dict the plan makes: the live groups (saved hyperparameters where carried), state by
    position; and each parameter name's position."""
    members = optimizer_param_names(optimizer, names)
    position: dict[str, int] = {}
    groups = []
    for gi, (group, params) in enumerate(zip(optimizer.param_groups, members, strict=True)):
        hyper = {k: v for k, v in group.items() if k != "params"}
        entry = plan.entry(Section.OPTIMIZER_GROUP, f"group {gi}")
        if entry.action is Action.CARRY and entry.source:
            saved = source.group_hyperparams(int(entry.source.split()[-1]))
            hyper.update({k: v for k, v in saved.items() if k in hyper})
        indices = []
        for name in params:
            position.setdefault(name, len(position))
            indices.append(position[name])
        groups.append({**hyper, "params": indices})
    state = {}
    for e in plan.section(Section.OPTIMIZER_STATE):
        if e.action is Action.CARRY and e.source is not None:
            state[position[e.name]] = source.optimizer_state(plan.state_key(e.source))
    return {"state": state, "param_groups": groups}, position
