"""Where a resume reads from: a resumer checkpoint (streamed by byte range) or a foreign file.

``CheckpointSource`` is the whole surface ``apply`` needs; ``NativeSource`` implements it for the
resumer format, ``resumer.foreign.ForeignSource`` for plain ``torch.save`` files.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

from resumer import rng
from resumer.errors import CheckpointError, ResumerError
from resumer.jsonvalue import decode
from resumer.manifest import Manifest, state_key
from resumer.prefault import FreshTensors
from resumer.safetensors_io import TensorLocation, read_hashing, readinto_exact, tensor_bytes
from resumer.signature import Signature
from resumer.store import get_fs, join, verify
from resumer.transfer import open_for_scan

_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class CheckpointSource(Protocol):
    """What apply reads from. ``verify`` runs before anything touches the model; ``reserve`` (optional
    work ahead, e.g. memory for the optimizer state) may run before ``verify`` and reads nothing."""

    uri: str
    signature: Signature
    bytes_read: int

    def reserve(self, params: set[str]) -> None: ...
    def verify(self) -> None: ...
    def prepare(self) -> None: ...
    def load_optimizer_state(self, params: set[str]) -> None: ...
    def copy_into(self, name: str, dest: torch.Tensor) -> None: ...
    def state(self, param: str) -> dict[str, Any]: ...
    def group_hyperparams(self, index: int) -> dict[str, Any]: ...
    def scheduler_state(self) -> Any: ...
    def rng_state(self) -> dict[str, Any] | None: ...
    def extra(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def _locked(progress: Any) -> Any:
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            progress(n)

    return call


class NativeSource:
    """A resumer checkpoint: tensors are read one at a time, by byte range, straight into place."""

    def __init__(self, manifest: Manifest, storage_options: dict[str, Any] | None = None, *,
                 checksums: bool = True, progress: Any = None, verified: bool = False) -> None:
        self.manifest = manifest
        self.uri = manifest.uri
        self.signature = manifest.signature
        self.storage_options = storage_options
        self.checksums = checksums
        self.progress = _locked(progress) if progress is not None else None  # verify and loads run side by side
        self.bytes_read = 0
        self._fs, self._path = get_fs(manifest.uri, storage_options)
        self._files: dict[str, Any] = {}
        self._plain: dict[str, Any] | None = None
        self._state_specs = self.signature.optimizer.state_by_param() if self.signature.optimizer else {}
        self._preloaded: dict[str, torch.Tensor] = {}
        self._verified = verified  # selection already checked it this way: do not read it all twice
        self._reserved: tuple[frozenset[str], FreshTensors] | None = None  # see reserve()


    def verify(self) -> None:
        """Sizes of every file; headers and checksums (unless turned off) of the model files.

        The optimizer file is checksummed by :meth:`load_optimizer_state` in the same pass that reads it
        into fresh tensors, before any of them reaches the optimizer.
        """
        if not self._verified:
            model_files = {loc.file for loc in self.manifest.tensors.values()}
            verify(self.manifest, self.storage_options, checksums=self.checksums, progress=self.progress,
                   checksum_files=model_files)

    def _layout(self, params: set[str]) -> list[tuple[str, list[tuple[str, TensorLocation]]]]:
        """The optimizer tensors of ``params`` (saved names), per file, in file order."""
        wanted = {state_key(p, e.key) for p in params for e in self._state_entries(p)}
        by_file: dict[str, list[tuple[str, TensorLocation]]] = {}
        for key, loc in self.manifest.optimizer_tensors.items():
            if key in wanted:
                by_file.setdefault(loc.file, []).append((key, loc))
        return [(name, sorted(locs, key=lambda kl: kl[1].offset)) for name, locs in sorted(by_file.items())]

    def reserve(self, params: set[str]) -> None:
        """Start faulting in fresh memory for the optimizer state of ``params`` on a helper thread (see
        resumer.prefault), so it overlaps verification instead of following it. Reads nothing."""
        if self._reserved is None:
            specs = [(loc.shape, torch_dtype(loc.dtype)) for _, locs in self._layout(params) for _, loc in locs]
            self._reserved = (frozenset(params), FreshTensors(specs))

    def load_optimizer_state(self, params: set[str]) -> None:
        """Read each optimizer file once, in order, into fresh tensors for ``params`` (saved names), hashing
        every byte; a checksum mismatch raises CheckpointError before anything is attached."""
        if self._reserved is None or self._reserved[0] != frozenset(params):
            self._release()
            self.reserve(params)
        assert self._reserved is not None
        fresh = self._reserved[1]
        try:
            taken = 0
            for name, chosen in self._layout(params):  # the order reserve() made the tensors in
                self._preloaded.update(self._read_fresh(name, chosen, fresh, taken))
                taken += len(chosen)
        finally:
            self._release()

    def _release(self) -> None:
        if self._reserved is not None:
            self._reserved[1].close()
            self._reserved = None

    def _read_fresh(self, name: str, chosen: list[tuple[str, TensorLocation]], fresh: FreshTensors,
                    first: int) -> dict[str, torch.Tensor]:
        """One hashing pass over file ``name``: the ``chosen`` tensors (in file order) land in tensors
        ``first``, ``first + 1``, ... of ``fresh``; returned only when the checksum matches."""
        entry = self.manifest.file(name)
        furi = join(self.uri, name)
        tensors: dict[str, torch.Tensor] = {}

        def into(i: int) -> memoryview:
            t = tensors[chosen[i][0]] = fresh.get(first + i)
            return tensor_bytes(t)

        got = read_hashing(self._file(name), entry.size, [(loc.offset, loc.nbytes) for _, loc in chosen], into,
                           furi, self.progress)
        self.bytes_read += entry.size
        if self.checksums and not self._verified and got != entry.checksum:
            raise CheckpointError(f"{furi} fails its checksum ({got} != {entry.checksum}): the bytes changed "
                                  "after the checkpoint was written. Nothing was loaded.", uri=self.uri)
        return tensors

    def _state_entries(self, param: str) -> tuple[Any, ...]:
        spec = self._state_specs.get(param)
        return tuple(e for e in spec.entries if e.shape is not None) if spec else ()

    def prepare(self) -> None:
        """Decode every plain value (hyperparameters, scalars, scheduler, RNG, extra) before anything is set."""
        m = self.manifest
        opt = self.signature.optimizer
        self._plain = {
            "groups": [self._decode(dict(g.hyperparams), f"optimizer param group {i}")
                       for i, g in enumerate(opt.groups)] if opt else [],
            "scalars": self._decode(m.optimizer_scalars, "optimizer state"),
            "scheduler": self._decode(m.scheduler_state, "scheduler state"),
            "extra": self._decode(m.extra, "extra metadata"),
        }
        self._plain["rng"] = rng.parse(m.rng, self.uri) if m.rng else None

    def _decode(self, value: Any, what: str) -> Any:
        try:
            return decode(value)
        except (ResumerError, AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.uri}: the saved {what} in the manifest is malformed ({exc}). Nothing was "
                                  "loaded.", uri=self.uri) from None

    def _decoded(self, key: str) -> Any:
        if self._plain is None:
            self.prepare()
        assert self._plain is not None
        return self._plain[key]

    def _file(self, name: str) -> Any:
        f = self._files.get(name)
        if f is None:
            size = self.manifest.file(name).size
            f = self._files[name] = open_for_scan(self._fs, join(self._path, name), size)
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
        out: dict[str, Any] = dict(self._decoded("scalars").get(param, {}))
        for entry in self._state_entries(param):
            key = state_key(param, entry.key)
            if key in self._preloaded:
                out[entry.key] = self._preloaded.pop(key)
                continue
            loc = self.manifest.optimizer_tensors[key]
            t = torch.empty(loc.shape, dtype=torch_dtype(loc.dtype))
            self._read(loc, t)
            out[entry.key] = t
        return out

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        return dict(self._decoded("groups")[index])

    def scheduler_state(self) -> Any:
        return self._decoded("scheduler")

    def rng_state(self) -> dict[str, Any] | None:
        """RNG state already parsed by :func:`resumer.rng.parse`."""
        return self._decoded("rng")

    def extra(self) -> dict[str, Any]:
        return self._decoded("extra")

    def close(self) -> None:
        self._release()
        self._preloaded.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()


__all__ = ["CheckpointSource", "NativeSource", "torch_dtype"]
