"""Lossless JSON for the small Python values in optimizer and scheduler state.

Tuples, non-finite floats and small tensors (e.g. a tensor ``lr``) do not survive plain JSON; they
are tagged here and restored exactly. Anything else that JSON cannot hold is refused with a clear
error at save time, never pickled.
"""

from __future__ import annotations

import math
from typing import Any

from resumer.errors import ResumerError

_TAG = "__resumer__"


def encode(value: Any, where: str = "value") -> Any:
    """Encode ``value`` to plain JSON types; raise ResumerError naming ``where`` for what cannot be held."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [encode(v, where) for v in value]}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {str(k): encode(v, f"{where}.{k}") for k, v in value.items()}
        return {_TAG: "dict", "v": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if type(value).__module__ == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        if value.numel() > 4096:
            raise ResumerError(f"Cannot save {where}: a tensor of {value.numel()} elements where small values "
                               "were expected.")
        return {_TAG: "tensor", "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "v": value.detach().cpu().reshape(-1).tolist()}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return encode(value.item(), where)
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
