"""Typed checks of values read from untrusted manifest JSON: each returns the value with the type the caller needs,
or raises ``_Bad`` naming the field and what it holds instead. Both manifest forms (the long and the compact one) are
read through them; ``resumer.formats.native.manifest.parse`` turns a ``_Bad`` into a CheckpointError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from resumer.core.signature import known_dtype

MAX_COUNT = 2**62  # sizes, offsets, steps and element counts above this are absurd, whatever the type says
MAX_DIMS = 64
_PIECE_SUM = re.compile(r"^[0-9a-f]{16}$")


class _Bad(ValueError):
    """One wrong field; ``parse`` turns it into a CheckpointError naming the checkpoint."""


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _Bad(f"missing or wrong field ({key!r} missing in {where})")
    return obj[key]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {_kind(value)}, not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{where} is {_kind(value)}, not a list")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is {_kind(value)}, not a string")
    return value


def _int(value: Any, where: str, *, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{where} is {_kind(value)}, not an integer")
    if not low <= value <= high:
        raise _Bad(f"{where} is {value}, outside {low}..{high}")
    return value


def _opt(value: Any, check: Any, where: str) -> Any:
    return None if value is None else check(value, where)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    dims = _list(value, where)
    if len(dims) > MAX_DIMS:
        raise _Bad(f"{where} has {len(dims)} dimensions (at most {MAX_DIMS})")
    shape = tuple(_int(d, f"{where}[{i}]") for i, d in enumerate(dims))
    if math.prod(shape) > MAX_COUNT:
        raise _Bad(f"{where} {list(shape)} holds more than {MAX_COUNT} elements")
    return shape


def _dtype(value: Any, where: str) -> str:
    if not isinstance(value, str) or not known_dtype(value):
        raise _Bad(f"{where} is {str(value)[:40]!r}, not a known dtype")
    return value


def _strs(value: Any, where: str) -> tuple[str, ...]:
    return tuple(_str(x, f"{where}[{i}]") for i, x in enumerate(_list(value, where)))


def _piece_sum(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _PIECE_SUM.match(value):
        raise _Bad(f"{where} checksum is {str(value)[:40]!r}, not 16 hex digits")
    return value


def _fast_shape(value: Any, where: Callable[[], str]) -> tuple[int, ...]:
    """``_shape``, with the common case checked without building a message."""
    if type(value) is list and len(value) <= MAX_DIMS and all(type(d) is int and 0 <= d <= MAX_COUNT for d in value):
        shape = tuple(value)
        if math.prod(shape) <= MAX_COUNT:
            return shape
    return _shape(value, where())


def _w(fmt: str, *args: Any) -> Callable[[], str]:
    """A message made only when it is needed (a callable in ``args`` is called first)."""
    return lambda: fmt.format(*(a() if callable(a) else a for a in args))
