"""Lossless JSON for the small Python values in optimizer and scheduler state, and strict parsing of JSON
read from a checkpoint.

Tuples, non-finite floats and small tensors (e.g. a tensor ``lr``) do not survive plain JSON; they
are tagged here and restored exactly. Anything else that JSON cannot hold is refused with a clear
error at save time, never pickled. Values are walked with a budget (nesting depth and count of values
visited), so a structure that shares one list a million times is refused instead of expanded.

``strict_loads`` parses untrusted JSON (manifests, safetensors headers): only values Python can use
(no ``NaN`` / ``Infinity``, no float that overflows, no integer of more than ``MAX_INT_DIGITS`` digits,
no nesting deeper than Python's recursion limit; ``too_deep`` checks a part against ``MAX_DEPTH``), and
only when the objects it would build fit a memory budget estimated from the bytes before any is built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from resumer.core.errors import CheckpointError, ResumerError

_TAG = "__resumer__"
MAX_DEPTH = 64
MAX_INT_DIGITS = 40
MAX_VALUES = 1_000_000  # values one encode may visit (each visit of a shared object counts)


class _Budget:
    """Counts the values one walk visits; the walk stops with a ResumerError past the limits."""

    def __init__(self, where: str, limit: int) -> None:
        self.where, self.limit, self.left = where, limit, limit

    def visit(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise ResumerError(f"Cannot save {self.where}: it holds more than {self.limit} values (a structure "
                               "that repeats one object many times counts every repeat). Keep large data in "
                               "tensors, out of optimizer and scheduler state and `extra`.")
        if depth > MAX_DEPTH:
            raise ResumerError(f"Cannot save {self.where}: it is nested more than {MAX_DEPTH} levels deep.")


def encode(value: Any, where: str = "value", *, max_values: int = MAX_VALUES) -> Any:
    """Encode ``value`` to plain JSON types; raise ResumerError naming ``where`` for what cannot be held.

    At most ``max_values`` values are visited (a shared object once per reference) and nesting is at most
    ``MAX_DEPTH`` deep: past either, a ResumerError, never an expansion of a tiny structure into a huge one.
    """
    return _encode(value, where, _Budget(where, max_values), 0)


def encode_saved(value: Any, where: str, uri: str) -> Any:
    """:func:`encode` of a value read from the checkpoint at ``uri``: one no checkpoint can hold makes that
    checkpoint bad (a CheckpointError naming it, so a root passes over it to an older one), not the caller's
    input."""
    where = where if len(where) <= 200 else where[:200] + "..."  # a name from the checkpoint: any length
    try:
        return encode(value, where)
    except ResumerError as exc:
        raise CheckpointError(f"{uri}: {where} cannot be carried ({exc}). Nothing was loaded.", uri=uri) from None


def plain_state(value: Any) -> bool:
    """Whether a (decoded) optimizer state value is one optimizers keep besides tensors: a number, flag or None, a
    small tensor (e.g. ``step``), or a tuple or list of those (Adam's ``betas``). Saving refuses anything else, and
    reading refuses it too: no optimizer's ``load_state_dict`` knows what to do with a string there."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if type(value).__module__ == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        return True
    return isinstance(value, (tuple, list)) and all(plain_state(v) for v in value)


def _encode(value: Any, where: str, budget: _Budget, depth: int) -> Any:  # noqa: C901 - one branch per type
    budget.visit(depth)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_DIGITS * 3:  # 2**120 has 37 digits: what is saved always reads back
            raise ResumerError(f"Cannot save {where}: an integer of {value.bit_length()} bits; a checkpoint holds "
                               f"integers of at most {MAX_INT_DIGITS} digits.")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [_encode(v, where, budget, depth + 1) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where, budget, depth + 1) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {str(k): _encode(v, f"{where}.{k}", budget, depth + 1) for k, v in value.items()}
        return {_TAG: "dict", "v": [[_encode(k, where, budget, depth + 1), _encode(v, where, budget, depth + 1)]
                                    for k, v in value.items()]}
    if type(value).__module__ == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        if value.numel() > 4096:
            raise ResumerError(f"Cannot save {where}: a tensor of {value.numel()} elements where small values "
                               "were expected.")
        return {_TAG: "tensor", "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "v": value.detach().cpu().reshape(-1).tolist()}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return _encode(value.item(), where, budget, depth)
    raise ResumerError(f"Cannot save {where}: a {type(value).__name__} is not a plain value "
                       "(None, bool, int, float, str, tuple, list, dict or small tensor). "
                       "Keep such objects out of optimizer and scheduler state, or pass them in `extra`.")


def decode(value: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "float":
        return float(value["v"])
    if tag == "tuple":
        return tuple(decode(v) for v in value["v"])
    if tag == "dict":
        return {decode(k): decode(v) for k, v in value["v"]}
    if tag == "tensor":
        import torch

        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ResumerError(f"Unknown tensor dtype {value['dtype']!r} in saved state.")
        return torch.tensor(value["v"], dtype=dtype).reshape(value["shape"])
    raise ResumerError(f"Unknown tagged value {tag!r} in saved state (written by a newer resumer?).")


class JSONRefused(ValueError):
    """Untrusted JSON that ``strict_loads`` will not turn into Python objects; the message says why."""


# Upper bounds, in bytes of Python objects, per "{", per "[" and per "," or ":" (a value or a key), measured
# on CPython 3.11 for the worst cases (one-key dicts, empty lists, short unique strings and keys): the
# estimate is at least twice what json.loads really builds, for our own manifests and for hostile shapes.
_COST_OBJECT, _COST_ARRAY, _COST_VALUE = 240, 96, 128


def parse_cost(data: bytes) -> int:
    """An upper bound on the memory ``json.loads(data)`` takes, from byte counts alone (no object is built)."""
    return (_COST_OBJECT * data.count(b"{") + _COST_ARRAY * data.count(b"[")
            + _COST_VALUE * (data.count(b",") + data.count(b":")) + len(data))


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not a number a checkpoint may hold")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise JSONRefused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are allowed)")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"the number {text[:40]} overflows a float")
    return value


def strict_loads(data: bytes, *, max_cost: int) -> Any:
    """Parse untrusted JSON bytes into plain values, refusing what Python cannot use or hold.

    Args:
        data: the JSON text, UTF-8.
        max_cost: the most memory (bytes, as estimated by :func:`parse_cost`) the parsed value may take.

    Raises:
        JSONRefused: (a ValueError) not JSON, ``NaN`` / ``Infinity``, a float that overflows, an integer of
            more than ``MAX_INT_DIGITS`` digits, nesting deeper than Python's recursion limit, or over ``max_cost``.
    """
    cost = parse_cost(data)
    if cost > max_cost:
        raise JSONRefused(f"parsing it would take about {cost} bytes of memory, more than the {max_cost} allowed "
                          "for its size (it holds too many tiny values)")
    strings: dict[str, str] = {}

    def share(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Equal short strings (file names, dtypes) become one object: a big manifest repeats them per tensor.
        return {k: strings.setdefault(v, v) if type(v) is str and len(v) < 256 else v for k, v in pairs}

    try:
        value = json.loads(data, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float,
                           object_pairs_hook=share)
    except JSONRefused:
        raise
    except RecursionError:
        raise JSONRefused("nested deeper than Python can parse") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise JSONRefused(f"not JSON ({exc})") from None
    return value


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: a deep value cannot exhaust the stack).

    ``strict_loads`` leaves this to its callers, for the parts they walk recursively: json itself stops at
    Python's recursion limit, and a walk over every part of a large manifest would cost as much as parsing it.
    """
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in v if isinstance(c, (dict, list)))
    return False


def walk_refused(value: Any, *, max_values: int, max_depth: int = MAX_DEPTH) -> str | None:
    """Why walking ``value`` as plain data would cost too much, or None.

    Every reference is counted (an object shared a thousand times is a thousand values, as any walk that copies
    or encodes it would see it), the walk stops at the first value past ``max_values`` or container deeper than
    ``max_depth`` (so a cycle stops too), and nothing is built: the cost is at most ``max_values`` steps.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if seen > max_values:
            return (f"it holds more than {max_values} plain values (an object shared many times counts once per "
                    "reference: a tiny file can describe an enormous structure)")
        children: Iterable[Any]
        if isinstance(v, dict):
            n, children = 2 * len(v), (x for kv in v.items() for x in kv)
        elif isinstance(v, (list, tuple, set, frozenset)):
            n, children = len(v), v
        else:
            continue
        if depth >= max_depth and n:
            return f"it is nested more than {max_depth} levels deep"
        if seen + len(stack) + n > max_values:  # each value on the stack is a visit still to come
            return (f"it holds more than {max_values} plain values (an object shared many times counts once per "
                    "reference: a tiny file can describe an enormous structure)")
        stack.extend((c, depth + 1) for c in children)
    return None
