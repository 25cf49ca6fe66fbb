"""Tie a position-keyed optimizer state (a plain ``torch.save`` file) to parameter names. Pure.

``optimizer.load_state_dict`` gives the state at saved position k to the k-th parameter of the CURRENT
optimizer (groups in order, members in order). resumer does the same, and then checks what torch does not:
the same number of groups and members, and every carried state's shape against the saved tensor that the
current parameter loads from. Where that does not hold, nothing is guessed: the state is not tied to names,
and the plan says why. The saved model's registration order is NOT used: an optimizer built in another
order (layer-wise LR decay listing blocks top-down, AdamW decay / no-decay groups) would swap the state of
identically shaped blocks and still pass every shape check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from resumer.core.signature import OptimizerSpec, ParamGroupSpec, ParamState, TensorSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """The outcome: a name-keyed spec (or None with ``problem``), and saved name -> position key."""

    spec: OptimizerSpec | None
    positions: dict[str, str]
    note: str = ""
    problem: str | None = None


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """A state tensor fits its parameter: the same shape, or that shape with some dimensions 1 (factored
    second moments, as the native reader's check allows too)."""
    return len(shape) == len(expected) and all(d in (e, 1) for d, e in zip(shape, expected, strict=True))


def _state_shape(ps: ParamState, expected: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a parameter's state tells: its first non-scalar entry that does not fit ``expected`` (a
    misfit), else ``expected`` when some entry is non-scalar, else None (scalars only tell nothing)."""
    shapes = [e.shape for e in ps.entries if e.shape]
    return next((sh for sh in shapes if not _fits(sh, expected)), expected if shapes else None)


def _order_note(saved: Mapping[str, TensorSpec], flat: list[str], by_key: Mapping[str, str]) -> str:
    """Says when the optimizer's order is not the saved model's own parameter order (shown, not acted on)."""
    params = [t.name for t in saved.values() if t.kind == "parameter"]
    if [by_key[k] for k in flat] == params:
        return ""
    return ("; the optimizer lists its parameters in another order than the model registers them (e.g. layer-wise "
            "learning rates or decay / no-decay groups), which the current optimizer's order accounts for")


def bind_positions(so: OptimizerSpec, co: OptimizerSpec, saved: Mapping[str, TensorSpec],
                   named: Mapping[str, str]) -> Binding:
    """Tie ``so``'s positions to saved names through ``co``'s order; ``named``: current -> saved name."""
    sizes_saved = [len(g.params) for g in so.groups]
    sizes_now = [len(g.params) for g in co.groups]
    if sizes_saved != sizes_now:
        return Binding(spec=None, positions={}, problem=(
            f"optimizer state is keyed by position, and the current optimizer's param groups do not line up with "
            f"the saved ones ({sizes_saved} parameters per group saved, {sizes_now} now), so which parameter each "
            "position belongs to cannot be told"))
    state = so.state_by_param()
    positions: dict[str, str] = {}
    checked = 0
    for sg, cg in zip(so.groups, co.groups, strict=True):
        for key, param in zip(sg.params, cg.params, strict=True):
            src = named.get(param)
            if src is None:
                return Binding(spec=None, positions={}, problem=(
                    f"optimizer state is keyed by position; position {key[1:]} falls on the current parameter "
                    f"'{param}', which the checkpoint's model does not hold, so the positions cannot be tied to "
                    "names"))
            shape = _state_shape(state[key], saved[src].shape) if key in state else None
            if shape is not None and shape != saved[src].shape:
                return Binding(spec=None, positions={}, problem=(
                    f"optimizer state is keyed by position; the state at position {key[1:]} has shape "
                    f"{list(shape)}, but the current optimizer's parameter at that position ('{param}') loads from "
                    f"'{src}' {list(saved[src].shape)}, so the current optimizer's order does not fit the saved "
                    "one"))
            checked += shape is not None
            positions[src] = key
    groups = tuple(ParamGroupSpec(params=tuple(named[p] for p in cg.params), hyperparams=sg.hyperparams)
                   for sg, cg in zip(so.groups, co.groups, strict=True))
    by_key = {key: name for name, key in positions.items()}
    stray = [ps.param for ps in so.state if ps.param not in by_key]
    if stray:  # state for a position no group lists: nothing to tie it to
        return Binding(spec=None, positions={}, problem=(
            f"optimizer state is keyed by position; position {stray[0][1:]} holds state but no param group lists "
            "it, so the positions cannot be tied to names"))
    spec = OptimizerSpec(cls=so.cls, groups=groups, inferred=so.inferred,
                         state=tuple(ParamState(param=by_key[ps.param], entries=ps.entries) for ps in so.state))
    flat = [k for g in so.groups for k in g.params]
    note = (f"optimizer state tied from positions to names through the current optimizer's parameter order "
            f"(as torch's load_state_dict does), shapes checked for {checked} of {len(flat)} parameters"
            + _order_note(saved, flat, by_key))
    return Binding(spec=spec, positions=positions, note=note)
