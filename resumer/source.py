"""Where a resume reads from: a resumer checkpoint (streamed by byte range) or a foreign file.

``CheckpointSource`` is the whole surface ``apply`` needs; ``NativeSource`` implements it for the
resumer format, ``resumer.foreign.ForeignSource`` for plain ``torch.save`` files.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from resumer.errors import CheckpointError
from resumer.jsonvalue import decode
from resumer.manifest import MODEL_FILE, OPTIMIZER_FILE, Manifest, state_key
from resumer.safetensors_io import TensorLocation, readinto_exact, tensor_bytes
from resumer.signature import Signature
from resumer.store import get_fs, join, verify

_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class CheckpointSource(Protocol):
    """What apply reads from. ``verify`` runs before anything touches the model."""

    uri: str
    signature: Signature
    bytes_read: int

    def verify(self) -> None: ...
    def copy_into(self, name: str, dest: torch.Tensor) -> None: ...
    def state(self, param: str) -> dict[str, Any]: ...
    def group_hyperparams(self, index: int) -> dict[str, Any]: ...
    def scheduler_state(self) -> Any: ...
    def rng_state(self) -> dict[str, Any] | None: ...
    def extra(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class NativeSource:
    """A resumer checkpoint: tensors are read one at a time, by byte range, straight into place."""

    def __init__(self, manifest: Manifest, storage_options: dict[str, Any] | None = None, *,
                 checksums: bool = True, progress: Any = None) -> None:
        self.manifest = manifest
        self.uri = manifest.uri
        self.signature = manifest.signature
        self.storage_options = storage_options
        self.checksums = checksums
        self.progress = progress
        self.bytes_read = 0
        self._fs, self._path = get_fs(manifest.uri, storage_options)
        self._files: dict[str, Any] = {}

    def verify(self) -> None:
        verify(self.manifest, self.storage_options, checksums=self.checksums, progress=self.progress)

    def _file(self, name: str) -> Any:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = self._fs.open(join(self._path, name), "rb")
        return f

    def _read(self, loc: TensorLocation, dest: torch.Tensor) -> None:
        f = self._file(loc.file)
        f.seek(loc.offset)
        readinto_exact(f, tensor_bytes(dest), join(self.uri, loc.file))
        self.bytes_read += loc.nbytes
        if self.progress is not None:
            self.progress(loc.nbytes)

    def copy_into(self, name: str, dest: torch.Tensor) -> None:
        """Copy saved tensor ``name`` into ``dest``: in place when layouts agree, else via one staging tensor."""
        loc = self.manifest.tensors[name]
        dest = dest.detach()
        if tuple(dest.shape) != loc.shape:
            raise CheckpointError(f"{self.uri}: '{name}' has shape {list(loc.shape)}, the model {list(dest.shape)}; "
                                  "the plan does not match this model.", uri=self.uri)
        direct = dest.device.type == "cpu" and dest.is_contiguous() and dest.dtype == torch_dtype(loc.dtype)
        if direct:
            self._read(loc, dest)
            return
        staging = torch.empty(loc.shape, dtype=torch_dtype(loc.dtype))
        self._read(loc, staging)
        with torch.no_grad():
            dest.copy_(staging)

    def state(self, param: str) -> dict[str, Any]:
        """Saved optimizer state of ``param`` (by saved name): fresh tensors plus plain values."""
        out: dict[str, Any] = {k: decode(v) for k, v in self.manifest.optimizer_scalars.get(param, {}).items()}
        spec = self.signature.optimizer.state_by_param()[param] if self.signature.optimizer else None
        for entry in spec.entries if spec else ():
            if entry.shape is None:
                continue
            loc = self.manifest.optimizer_tensors[state_key(param, entry.key)]
            t = torch.empty(loc.shape, dtype=torch_dtype(loc.dtype))
            self._read(loc, t)
            out[entry.key] = t
        return out

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        assert self.signature.optimizer is not None
        return {k: decode(v) for k, v in self.signature.optimizer.groups[index].hyperparams}

    def scheduler_state(self) -> Any:
        return None if self.manifest.scheduler_state is None else decode(self.manifest.scheduler_state)

    def rng_state(self) -> dict[str, Any] | None:
        return self.manifest.rng

    def extra(self) -> dict[str, Any]:
        return decode(self.manifest.extra)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


__all__ = ["MODEL_FILE", "OPTIMIZER_FILE", "CheckpointSource", "NativeSource", "torch_dtype"]
