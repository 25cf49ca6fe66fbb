"""Reading a ``torch.distributed.checkpoint`` directory's ``.metadata`` safely, and indexing what it says.

``.metadata`` is a pickle of DCP's ``Metadata`` (``torch/distributed/checkpoint/metadata.py``, with
``FileSystemWriter``'s ``_StorageInfo`` from ``filesystem.py`` as its storage data). ``read_metadata`` unpickles it
with ``_MetadataUnpickler``, which builds those dataclasses and the few torch values they hold and refuses every
other global before looking it up, so a hostile ``.metadata`` runs nothing. ``Layout`` then checks what was built
(types, key paths, chunks inside their tensor, storage entries naming plain files of this directory, every byte
range inside its file) and indexes it for ``resumer.formats.dcp``.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import pickle
from collections.abc import Iterable
from typing import Any, NoReturn

import torch

from resumer.core import dtypes
from resumer.core.errors import CheckpointError
from resumer.formats.torch_dtypes import torch_dtype
from resumer.storage.store import Store

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1024**3
_MD = "torch.distributed.checkpoint.metadata"
# The globals a DCP .metadata pickle names (torch/distributed/checkpoint/metadata.py and filesystem.py): DCP's
# metadata dataclasses; besides them only torch.Size (chunk offsets and sizes), dtypes, the strided layout, the enum
# TensorProperties pickles its memory format as, and the writer's pathlib path, each handled in find_class below.
_CLASSES = frozenset({
    (_MD, "Metadata"), (_MD, "TensorStorageMetadata"), (_MD, "BytesStorageMetadata"),
    (_MD, "ChunkStorageMetadata"), (_MD, "TensorProperties"), (_MD, "StorageMeta"), (_MD, "MetadataIndex"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})
_MEMORY_FORMAT = (_MD, "_MEM_FORMAT_ENCODING")
# StorageMeta.checkpoint_id is the writer's pathlib path: rebuilt as plain text, never as a path object.
_PATHS = frozenset({("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                             "PureWindowsPath")})
# What building the allowed types from hostile arguments can raise; each becomes a CheckpointError.
_BAD_PICKLE = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError,
               ValueError, RuntimeError, OverflowError, RecursionError, NotImplementedError, MemoryError)


def _path_text(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _memory_format(code: Any) -> int:
    """_MEM_FORMAT_ENCODING(code), kept as its code: resumer reads no memory format."""
    if type(code) is not int or code not in (0, 1, 2):
        raise pickle.UnpicklingError(f"memory format code {str(code)[:40]!r} is not one DCP writes")
    return code


def _properties_state(self: Any, state: Any) -> None:
    """TensorProperties.__setstate__ without its enum: (dtype, layout, requires_grad, memory format, pin_memory)."""
    self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state


def _layout(name: Any) -> torch.layout:
    """torch pickles a layout as ``torch.serialization._get_layout(str(layout))``; DCP tensors are strided."""
    if name != "torch.strided":
        raise pickle.UnpicklingError(f"layout {str(name)[:40]!r} is not one a DCP tensor has")
    return torch.strided


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata types and nothing else: any other global is refused before it is looked up.

    Pickle's BUILD opcode sets attributes on whatever object it is handed, a class or a function included. So every
    load gets throwaway subclasses of DCP's classes and its own wrappers of the functions: a pickle that sets
    attributes on them changes those copies, never torch's classes or this module (torch.Size, dtypes and layouts
    take no attributes).
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _CLASSES:
            if key not in self._types:
                body: dict[str, Any] = {"__module__": module}
                if name == "TensorProperties":
                    body["__setstate__"] = _properties_state
                self._types[key] = type(name, (getattr(importlib.import_module(module), name),), body)
            return self._types[key]
        if key == ("torch", "Size"):
            return torch.Size
        if module == "torch" and dtypes.known(name):
            return torch_dtype(name)
        wrapped = {_MEMORY_FORMAT: _memory_format, ("torch.serialization", "_get_layout"): _layout}.get(key)
        if wrapped is None and key in _PATHS:
            wrapped = _path_text
        if wrapped is not None:
            return functools.partial(wrapped)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not one of DCP's metadata types")


def read_metadata(store: Store) -> Any:
    """The directory's ``.metadata``, unpickled with only DCP's metadata types allowed; CheckpointError otherwise."""
    uri = store.uri_of(METADATA)
    size = store.size(METADATA)
    if size > MAX_METADATA_BYTES:
        raise CheckpointError(f"{uri} is larger than {MAX_METADATA_BYTES} bytes; refusing to read it.", uri=store.uri)
    try:
        md = _MetadataUnpickler(io.BytesIO(store.read(METADATA))).load()
    except _BAD_PICKLE as exc:
        raise CheckpointError(
            f"Refused {uri}: it is not DCP metadata that can be read safely ({exc.__class__.__name__}: "
            f"{str(exc)[:200]}). resumer reads a .metadata pickle with only DCP's metadata types allowed and never "
            "runs code from it. Nothing was loaded.", uri=store.uri) from None
    if type(md).__name__ != "Metadata" or type(md).__module__ != _MD:
        raise CheckpointError(f"Refused {uri}: it holds a {type(md).__name__}, not DCP's Metadata.", uri=store.uri)
    return md


def _ints(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


class Layout:
    """The metadata checked and indexed: per key its path, its kind, and where its bytes are."""

    def __init__(self, md: Any, store: Store) -> None:
        self.uri = store.uri
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = {}
        self.paths: dict[str, tuple[str | int, ...]] = {}
        self.where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
        sdm = getattr(md, "state_dict_metadata", None)
        if not isinstance(sdm, dict) or not all(isinstance(k, str) for k in sdm):
            self._bad("its state_dict_metadata is not a mapping of names")
        self._index(getattr(md, "storage_data", None))
        planned = getattr(md, "planner_data", None)
        planned = planned if isinstance(planned, dict) else {}
        for key, item in sdm.items():
            path = planned.get(key, (key,))
            # A list index is below the number of items (DCP names every entry of a list it descends into).
            if (not isinstance(path, (tuple, list)) or not path or not all(
                    isinstance(p, str) or (type(p) is int and 0 <= p < len(sdm)) for p in path)
                    or ".".join(map(str, path)) != key):
                self._bad(f"the key path of {key!r} does not spell its name")
            self.paths[key] = tuple(path)
            if type(item).__name__ == "BytesStorageMetadata":
                self._located(key, None)
            elif type(item).__name__ == "TensorStorageMetadata":
                self.tensors[key] = self._tensor(key, item)
            else:
                self._bad(f"{key!r} is described by a {type(item).__name__}")
        self.sizes = {name: self._size(store, name) for name in sorted({w[0] for w in self.where.values()})}
        for (key, _), (name, offset, length) in self.where.items():
            if offset + length > self.sizes[name]:
                raise CheckpointError(f"Refused {self.uri}: {name} is {self.sizes[name]} bytes, but the metadata puts "
                                      f"{key!r} at bytes {offset}..{offset + length}: the file is truncated or the "
                                      "metadata lies. Nothing was loaded.", uri=self.uri)

    def _size(self, store: Store, name: str) -> int:
        try:
            return store.size(name)
        except FileNotFoundError:
            raise CheckpointError(f"Refused {self.uri}: its metadata names {name}, which is not there. Nothing was "
                                  "loaded.", uri=self.uri) from None

    def _bad(self, why: str) -> NoReturn:
        raise CheckpointError(f"Refused {self.uri}: its {METADATA} is not consistent DCP metadata ({why}). "
                              "Nothing was loaded.", uri=self.uri)

    def _index(self, storage: Any) -> None:
        if not isinstance(storage, dict):
            self._bad("no storage data: not written by FileSystemWriter")
        for index, info in storage.items():
            fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
            name, start, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
            at = None if offset is None else _ints(offset)
            if (not isinstance(fqn, str) or (offset is not None and at is None) or not isinstance(name, str)
                    or not name.endswith(SUFFIX) or "/" in name or "\\" in name or name.startswith(".")
                    or type(start) is not int or type(length) is not int or start < 0 or length < 0):
                self._bad("a storage entry is not a file name, offset and length inside this directory")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{self.uri}: items were written through storage transforms "
                                      f"({list(info.transform_descriptors)[:3]}), which resumer does not read.",
                                      uri=self.uri)
            self.where[(fqn, at)] = (name, start, length)

    def _located(self, key: str, at: tuple[int, ...] | None) -> None:
        if (key, at) not in self.where:
            self._bad(f"{key!r} has no storage entry")

    def _tensor(self, key: str, item: Any) -> tuple[tuple[int, ...], torch.dtype, list[Any]]:
        size, chunk_list = _ints(getattr(item, "size", None)), getattr(item, "chunks", None)
        dtype = getattr(getattr(item, "properties", None), "dtype", None)
        if size is None or not isinstance(dtype, torch.dtype) or not isinstance(chunk_list, list):
            self._bad(f"tensor {key!r} has no shape, dtype or chunk list")
        chunks, covered = [], 0
        for chunk in chunk_list:
            offsets, sizes = _ints(getattr(chunk, "offsets", None)), _ints(getattr(chunk, "sizes", None))
            if (offsets is None or sizes is None or len(offsets) != len(size) or len(sizes) != len(size)
                    or any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True))):
                self._bad(f"a chunk of tensor {key!r} lies outside its shape {list(size)}")
            self._located(key, offsets)
            chunks.append((offsets, sizes))
            covered += math.prod(sizes)
        if covered != math.prod(size):
            self._bad(f"the chunks of tensor {key!r} hold {covered} values, its shape {list(size)} needs "
                      f"{math.prod(size)}")
        return size, dtype, chunks

    def under(self, top: Iterable[str]) -> dict[str, tuple[str | int, ...]]:
        """Keys whose path starts with one of ``top``: key -> the rest of its path."""
        tops = tuple(top)
        return {k: p[1:] for k, p in self.paths.items() if p[0] in tops}
