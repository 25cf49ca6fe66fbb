"""A parsed manifest checked against itself and against this torch, before any tensor byte is read: every tensor's
signature shape and dtype are those of its stored byte range, every optimizer state tensor the signature names is
stored, and this torch has every dtype (one it lacks is refused without a quarantine mark). ``NativeSource.prepare``
runs it.
"""

from __future__ import annotations

import torch

from resumer.core.errors import CheckpointError
from resumer.formats.native.entries import Manifest, state_key
from resumer.formats.torch_dtypes import torch_dtype


def check_manifest(m: Manifest) -> None:  # noqa: C901 - one check per section
    """The manifest agrees with itself: every tensor's signature shape and dtype are those of its byte range,
    every optimizer state tensor the signature names is stored as named, and this torch has every dtype."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{m.uri}: the manifest contradicts itself: {why}. The checkpoint is corrupt; "
                               "nothing was loaded.", uri=m.uri)

    for key, chunks in m.chunks.items():  # their shapes were checked to tile the signature's when parsed
        torch_dtype_or_refuse(m, key, chunks[0].loc.dtype)
    for spec in m.signature.tensors:
        if spec.name in m.chunks:
            continue
        loc = m.tensors[spec.name]
        if (loc.shape, loc.dtype) != (spec.shape, spec.dtype):
            raise bad(f"tensor {spec.name!r} is {spec.dtype}{list(spec.shape)} in the signature, but its "
                      f"{loc.nbytes} stored bytes are {loc.dtype}{list(loc.shape)}")
    for param in m.signature.optimizer.state if m.signature.optimizer else ():
        for e in param.entries:
            if e.shape is None:
                continue
            if state_key(param.param, e.key) in m.chunks:
                continue
            stored = m.optimizer_tensors.get(state_key(param.param, e.key))
            if stored is None:
                raise bad(f"optimizer state '{param.param}/{e.key}' is in the signature but has no stored bytes")
            if stored.shape != e.shape or (e.dtype is not None and stored.dtype != e.dtype):
                raise bad(f"optimizer state '{param.param}/{e.key}' is {e.dtype}{list(e.shape)} in the signature, "
                          f"but its {stored.nbytes} stored bytes are {stored.dtype}{list(stored.shape)}")
    for what, loc in (*m.tensors.items(), *m.optimizer_tensors.items()):
        torch_dtype_or_refuse(m, what, loc.dtype)


def torch_dtype_or_refuse(m: Manifest, what: str, dtype: str) -> torch.dtype:
    """The torch dtype of ``dtype``; a dtype this torch lacks is refused, but not quarantined: the checkpoint is
    fine for a torch that has it (as one in a newer format is for a newer resumer)."""
    try:
        return torch_dtype(dtype)
    except ValueError as exc:
        raise CheckpointError(f"{m.uri}: tensor {what!r}: {exc}. Resume with a torch that has it.",
                              uri=m.uri, quarantine=False) from None
