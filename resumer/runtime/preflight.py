"""Checks a staged resume runs on the saved values against the live objects, before anything live is written.

What torch would install without a word and fail on later: a saved hyperparameter of the wrong type
(``lr: "fast"``: the next ``step()`` crashes), optimizer state whose shape cannot belong to its parameter,
a scheduler state that does not load (tried on a copy), or one that would replace a scheduler attribute.
Each is a CheckpointError naming the value; nothing reads storage here.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from resumer.core.errors import CheckpointError, CheckpointMismatch
from resumer.core.plan import Action, Plan, Section
from resumer.formats.source import CheckpointSource
from resumer.runtime.capture import live_tensors


def compatible(saved: Any, live: Any) -> bool:
    """Whether ``saved`` may replace ``live``: numbers stay numbers (int and float interchangeable), bools and
    None stay flags, strings strings, sequences keep their length and kinds, dicts their common keys' kinds."""
    if live is None or isinstance(live, bool):
        return saved is None or isinstance(saved, (bool, int, float)) and (live is None or isinstance(saved, bool))
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) or (
            isinstance(saved, torch.Tensor) and saved.numel() == 1)
    if isinstance(live, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == live.shape or (
            live.numel() == 1 and isinstance(saved, (int, float)) and not isinstance(saved, bool))
    if isinstance(live, (tuple, list)):
        return (isinstance(saved, (tuple, list)) and len(saved) == len(live)
                and all(compatible(s, v) for s, v in zip(saved, live, strict=True)))
    if isinstance(live, dict):
        return isinstance(saved, dict) and all(compatible(v, live[k]) for k, v in saved.items() if k in live)
    return type(saved) is type(live)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mismatch(message: str, uri: str) -> CheckpointMismatch:
    """What the checkpoint holds does not go into THESE live objects: maybe the code's doing, not damage."""
    return CheckpointMismatch(message, uri=uri)


def _refuse(uri: str, what: str, saved: Any, live: Any) -> CheckpointMismatch:
    return _mismatch(
        f"{uri}: the saved {what} is {_short(saved)} ({type(saved).__name__}), where this code has {_short(live)} "
        f"({type(live).__name__}); installed, it would break training at the next step. The checkpoint is "
        "not used; nothing was loaded. Resume with --policy reset-optimizer to start the optimizer and "
        "scheduler fresh, or fix the checkpoint.", uri)


def check_groups(plan: Plan, source: CheckpointSource, optimizer: torch.optim.Optimizer) -> None:
    """Every saved hyperparameter a carried group takes has the kind of the live group's value."""
    for gi, group in enumerate(optimizer.param_groups):
        entry = plan.entry(Section.OPTIMIZER_GROUP, f"group {gi}")
        if entry.action is not Action.CARRY or not entry.source:
            continue
        saved = source.group_hyperparams(int(entry.source.split()[-1]))
        for key, value in saved.items():
            if key != "params" and key in group and not compatible(value, group[key]):
                raise _refuse(source.uri, f"optimizer param group {gi} '{key}'", value, group[key])


def _fits(state: tuple[int, ...], param: tuple[int, ...]) -> bool:
    """State of shape ``state`` can belong to a parameter of shape ``param``: the same shape, a scalar (a step
    count), or the parameter's shape with some dimensions reduced to 1 (factored second moments)."""
    if state == param or math.prod(state) <= 1:
        return True
    return len(state) == len(param) and all(s in (p, 1) for s, p in zip(state, param, strict=True))


def check_state(plan: Plan, source: CheckpointSource, model: nn.Module) -> None:
    """Every carried optimizer state tensor fits its parameter's current shape; plain values are numbers,
    flags or None (what torch's optimizers keep), never text."""
    shapes = {lt.name: tuple(lt.tensor.shape) for lt in live_tensors(model)}
    saved = source.signature.optimizer.state_by_param() if source.signature.optimizer else {}
    for e in plan.section(Section.OPTIMIZER_STATE):
        if e.action is not Action.CARRY or e.source is None or e.name not in shapes:
            continue
        spec = saved.get(e.source)
        for entry in spec.entries if spec else ():
            if entry.shape is not None and not _fits(entry.shape, shapes[e.name]):
                raise CheckpointError(
                    f"{source.uri}: saved optimizer state '{e.source}/{entry.key}' has shape {list(entry.shape)}, "
                    f"but parameter '{e.name}' has shape {list(shapes[e.name])}: that state cannot belong to it. "
                    "The checkpoint is not used; nothing was loaded.", uri=source.uri)


def check_scheduler(plan: Plan, source: CheckpointSource, scheduler: Any) -> None:
    """The saved scheduler state has the live state's kinds, replaces no scheduler attribute that is not
    state, and loads into a copy of the scheduler (its optimizer shared, not copied)."""
    if scheduler is None or not any(e.action is Action.RESTORE for e in plan.section(Section.SCHEDULER)):
        return
    saved = source.scheduler_state()
    live = scheduler.state_dict()
    if not isinstance(saved, dict):
        raise _refuse(source.uri, "scheduler state", saved, live)
    for key, value in saved.items():
        if key in live:
            if not compatible(value, live[key]):
                raise _refuse(source.uri, f"scheduler state '{key}'", value, live[key])
        elif hasattr(scheduler, key):
            raise _mismatch(f"{source.uri}: the saved scheduler state holds {key!r}, which would replace the "
                            f"scheduler's own attribute of that name. The checkpoint is not used; nothing was "
                            "loaded.", source.uri)
    memo: dict[int, Any] = {}
    opt = getattr(scheduler, "optimizer", None)
    if opt is not None:
        memo[id(opt)] = opt  # the copy shares the optimizer: loading never writes to it
    try:
        trial = copy.deepcopy(scheduler, memo)
    except (TypeError, AttributeError, copy.Error, RuntimeError):
        return  # a scheduler that cannot be copied is checked by kinds alone
    try:
        trial.load_state_dict(copy.deepcopy(saved))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise _mismatch(f"{source.uri}: the saved scheduler state does not load into this "
                        f"{type(scheduler).__name__} ({type(exc).__name__}: {exc}). The checkpoint is not "
                        "used; nothing was loaded.", source.uri) from None


def check_model(plan: Plan, source: CheckpointSource, model: nn.Module) -> None:
    """Every tensor the plan copies has, in the checkpoint, the shape of the live tensor it goes into."""
    shapes = {lt.name: tuple(lt.tensor.shape) for lt in live_tensors(model)}
    saved = source.signature.by_name()
    for e in plan.section(Section.MODEL):
        if not e.copies:
            continue
        spec = saved.get(e.source or e.name)
        if spec is None or e.name not in shapes or spec.shape != shapes[e.name]:
            got = list(spec.shape) if spec else "nothing"
            raise _mismatch(f"{source.uri}: '{e.source or e.name}' has shape {got} in the checkpoint, the "
                            f"model {list(shapes.get(e.name, ()))}; the plan does not match this model. "
                            "Plan again with this model; nothing was loaded.", source.uri)
