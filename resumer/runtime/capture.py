"""Signatures of live objects: the current code's model, optimizer and scheduler.

Works on a model built on the meta device: only names, shapes and dtypes are read, never data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resumer.core.errors import UsageError
from resumer.core.signature import (
    BUFFER,
    PARAMETER,
    OptimizerSpec,
    ParamGroupSpec,
    ParamState,
    SchedulerSpec,
    Signature,
    StateEntry,
    TensorSpec,
)
from resumer.formats.jsonvalue import encode
from resumer.formats.torch_dtypes import dtype_name

COMPILE_SEGMENT = "_orig_mod."


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner: Any = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            inner = model._orig_mod  # torch.compile
        else:
            return model
        model = inner


def canonical_name(name: str) -> str:
    """Strip ``_orig_mod.`` segments left by compiling a submodule."""
    return name.replace(COMPILE_SEGMENT, "") if COMPILE_SEGMENT in name else name


@dataclass(slots=True)
class LiveTensor:
    """A model tensor with its canonical name, kind and tied aliases."""

    name: str
    tensor: torch.Tensor
    kind: str
    aliases: list[str]

    def spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, shape=tuple(self.tensor.shape), dtype=dtype_name(self.tensor.dtype),
                          kind=self.kind, aliases=tuple(self.aliases))


def live_tensors(model: nn.Module) -> list[LiveTensor]:
    """Every parameter and persistent buffer once, in module order; tied names become aliases. FSDP2 modules are
    first brought back to their sharded parameters (:func:`reshard`)."""
    model = unwrap(model)
    reshard(model)
    by_id: dict[int, LiveTensor] = {}
    out: list[LiveTensor] = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        items: tuple[tuple[str, Any, str], ...] = (
            *((n, p, PARAMETER) for n, p in mod._parameters.items()),
            *((n, b, BUFFER) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set),
        )
        for local, t, kind in items:
            if t is None:
                continue
            name = canonical_name(prefix + local)
            known = by_id.get(id(t))
            if known is None:
                lt = LiveTensor(name=name, tensor=t, kind=kind, aliases=[])
                by_id[id(t)] = lt
                out.append(lt)
            elif name != known.name and name not in known.aliases:
                known.aliases.append(name)
    return out


def reshard(model: nn.Module) -> None:
    """Bring every FSDP2 (``fully_shard``) module of ``model`` back to its sharded parameters, as torch's own
    ``state_dict()`` and ``load_state_dict()`` do first. Between a forward pass that did not reshard (the root
    module's, with no backward after it, as in evaluation; any module's with ``reshard_after_forward=False``) and
    the next backward, such a module holds its full, unsharded parameters: temporaries, not the DTensors the
    optimizer steps. Read then, the model's names would map to tensors the optimizer does not hold, and values
    copied into them would be dropped at the next reshard. Values are not changed; the next forward gathers the
    parameters again. Costs nothing where FSDP2 was never imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    if module_type is None:
        return
    for module in model.modules():
        if isinstance(module, module_type):
            module.reshard()


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> canonical name."""
    return {id(lt.tensor): lt.name for lt in live_tensors(model) if lt.kind == PARAMETER}


def optimizer_param_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """Canonical names of each param group's members; a parameter outside the model is a usage error."""
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        member = []
        for pi, p in enumerate(group["params"]):
            name = names.get(id(p))
            if name is None:
                raise UsageError(f"The optimizer's param group {gi} holds a parameter (position {pi}, shape "
                                 f"{list(p.shape)}) that is not in the model. Build the optimizer from "
                                 "model.parameters() of the same model instance.")
            member.append(name)
        groups.append(member)
    return groups


def class_path(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def optimizer_spec(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> OptimizerSpec:
    members = optimizer_param_names(optimizer, names)
    groups = []
    for gi, (group, params) in enumerate(zip(optimizer.param_groups, members, strict=True)):
        hyper = {k: encode(v, f"optimizer param group {gi} '{k}'") for k, v in group.items() if k != "params"}
        groups.append(ParamGroupSpec(params=tuple(params), hyperparams=tuple(sorted(hyper.items()))))
    state = []
    for group, params in zip(optimizer.param_groups, members, strict=True):
        for p, name in zip(group["params"], params, strict=True):
            st = optimizer.state.get(p)
            if not st:
                continue
            entries = tuple(
                StateEntry(key=str(k), shape=tuple(v.shape), dtype=dtype_name(v.dtype))
                if isinstance(v, torch.Tensor) else StateEntry(key=str(k), shape=None)
                for k, v in st.items())
            state.append(ParamState(param=name, entries=entries))
    return OptimizerSpec(cls=class_path(optimizer), groups=tuple(groups), state=tuple(state))


def scheduler_spec(scheduler: Any) -> SchedulerSpec:
    base = getattr(scheduler, "base_lrs", None)
    return SchedulerSpec(cls=class_path(scheduler), num_groups=len(base) if base is not None else None)


def signature(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, *,
              step: int | None = None, world_size: int | None = None) -> Signature:
    """The Signature of live objects; costs no tensor memory (meta-device models work)."""
    tensors = live_tensors(model)
    names = {id(lt.tensor): lt.name for lt in tensors if lt.kind == PARAMETER}
    return Signature(
        tensors=tuple(lt.spec() for lt in tensors),
        optimizer=None if optimizer is None else optimizer_spec(optimizer, names),
        scheduler=None if scheduler is None else scheduler_spec(scheduler),
        step=step,
        world_size=world_size,
    )
