"""The torch side of the one dtype table (``resumer.core.dtypes``): ``torch.dtype`` <-> its name there."""

from __future__ import annotations

import torch

from resumer.core import dtypes


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype in resumer.core.dtypes' table (and in manifests): ``float32``, ``complex128``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in resumer.core.dtypes' table; ValueError for a name the table or this torch lacks."""
    dtypes.lookup(name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not available in torch {torch.__version__}")
    return dtype
