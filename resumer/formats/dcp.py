"""Foreign checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, as torchtitan writes them.

A directory (torchtitan's ``step-N/``) holding ``.metadata`` and ``*.distcp`` data files, written by
``torch.distributed.checkpoint.save`` with its ``FileSystemWriter``. ``.metadata`` is a pickle of DCP's
``Metadata``: it is read only through ``_MetadataUnpickler``, which builds DCP's metadata dataclasses and the few
torch values they hold (``torch.Size``, dtypes, ``torch.strided``) and refuses every other global, so a hostile
``.metadata`` runs nothing. Every item of a data file is one ``torch.save`` blob (a tensor chunk, or any other
value) at the offset and length the metadata's storage data gives; it is read from exactly that byte range,
checked to lie inside the file, and loaded with ``weights_only=True``.

The saved state is nested again through the metadata's key paths (DCP flattens ``{"model": ..., "optim": ...}``
into ``model.0.weight``, ``optim.state.0.weight.exp_avg``). Model tensors sit under ``model`` (or at the top
level: torchtitan flattens its model state). Optimizer state under ``optim`` / ``optimizer`` is keyed by
parameter name, as ``torch.distributed.checkpoint.state_dict.get_state_dict`` writes it (nested, or flattened
by ``flatten_optimizer_state_dict``), so it is carried by name, no positions involved. A scheduler under
``lr_scheduler`` / ``scheduler`` and a step under ``step`` / ``train_state.step`` are read when present.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import math
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import torch

from resumer.core import dtypes
from resumer.core.errors import CheckpointError
from resumer.core.signature import (
    BUFFER,
    PARAMETER,
    OptimizerSpec,
    ParamGroupSpec,
    ParamState,
    SchedulerSpec,
    Signature,
    StateEntry,
    TensorSpec,
)
from resumer.formats.jsonvalue import encode, walk_refused
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.formats.torch_dtypes import dtype_name, torch_dtype
from resumer.formats.torch_save import (
    BUFFER_SUFFIXES,
    MAX_FOREIGN_VALUES,
    MIN_FOREIGN_VALUES,
    infer_optimizer_class,
    scheduler_class,
)
from resumer.storage import retry
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1024**3
MODEL_KEYS = ("model",)
OPTIMIZER_KEYS = ("optim", "optimizer")
SCHEDULER_KEYS = ("lr_scheduler", "scheduler")
STEP_PATHS = (("step",), ("train_state", "step"))

_MD = "torch.distributed.checkpoint.metadata"
# The globals a DCP .metadata pickle names (torch/distributed/checkpoint/metadata.py and filesystem.py): DCP's
# metadata dataclasses, the enum TensorProperties pickles its memory format as, and torch.Size (chunk offsets and
# sizes). Nothing else is built; dtypes, the strided layout and pathlib paths are handled in find_class below.
_ALLOWED = frozenset({
    (_MD, "Metadata"), (_MD, "TensorStorageMetadata"), (_MD, "BytesStorageMetadata"),
    (_MD, "ChunkStorageMetadata"), (_MD, "TensorProperties"), (_MD, "StorageMeta"), (_MD, "MetadataIndex"),
    (_MD, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
})
# StorageMeta.checkpoint_id is the writer's pathlib path: rebuilt as plain text, never as a path object.
_PATHS = frozenset({("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                             "PureWindowsPath")})
# What building the allowed types from hostile arguments can raise; each becomes a CheckpointError.
_BAD_PICKLE = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError,
               ValueError, RuntimeError, OverflowError, RecursionError, NotImplementedError, MemoryError)


def _path_text(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _layout(name: Any) -> torch.layout:
    """torch pickles a layout as ``torch.serialization._get_layout(str(layout))``; DCP tensors are strided."""
    if name != "torch.strided":
        raise pickle.UnpicklingError(f"layout {str(name)[:40]!r} is not one a DCP tensor has")
    return torch.strided


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata types and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(module), name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module == "torch" and dtypes.known(name):
            return torch_dtype(name)
        if (module, name) in _PATHS:
            return _path_text
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


class _Layout:
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


class DcpSource(CheckpointSource):
    """A DCP directory seen through a Signature; model and optimizer tensors are read by ``load``."""

    format = "torch-dcp"

    def __init__(self, store: Store) -> None:
        self.uri = store.uri
        self.store = store
        self.bytes_read = 0
        self._md = read_metadata(store)
        self.layout = _Layout(self._md, store)
        self._tensors: dict[str, torch.Tensor] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self._state_keys: dict[str, dict[str, str]] = {}  # param -> state key -> DCP key
        self._values: dict[str, Any] = {}  # DCP key -> loaded value of a non-tensor item
        self._groups: list[dict[str, Any]] = []
        notes = ["a torch.distributed.checkpoint (DCP) directory: .metadata read with only DCP's metadata types "
                 "allowed, each data item loaded from its byte range with weights_only=True"]
        self._model = self._find_model(notes)
        opt_spec = self._find_optimizer(notes)
        self._scheduler, sched_spec = self._find_scheduler(notes)
        step = self._find_step(notes)
        used = set(self._model.values()) | {k for v in self._state_keys.values() for k in v.values()}
        used |= set(self._values)
        unused = [k for k in self.layout.paths if k not in used]
        if unused:
            notes.append(f"not used: {len(unused)} saved entr{'y' if len(unused) == 1 else 'ies'} "
                         f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''})")
        notes.append("no RNG state is read from a DCP checkpoint: the current RNG is kept")
        specs = [TensorSpec(name=n, shape=self.layout.tensors[k][0], dtype=dtype_name(self.layout.tensors[k][1]),
                            kind=BUFFER if n.rsplit(".", 1)[-1] in BUFFER_SUFFIXES else PARAMETER)
                 for n, k in self._model.items()]
        self.signature = Signature(tensors=tuple(specs), optimizer=opt_spec, scheduler=sched_spec, step=step,
                                   notes=tuple(notes))

    # --- reading -------------------------------------------------------------------------------------------

    def _blob(self, key: str, at: tuple[int, ...] | None) -> Any:
        """One item's torch.save blob, from exactly its byte range, loaded with weights_only=True."""
        name, offset, length = self.layout.where[(key, at)]
        path = self.store.path_of(name)
        data = retry.call(lambda: self.store.fs.cat_file(path, start=offset, end=offset + length), what="reading",
                          uri=self.store.uri_of(name))
        self.bytes_read += len(data)
        if len(data) != length:
            raise CheckpointError(f"Refused {self.uri}: {name} ended after {len(data)} of the {length} bytes of "
                                  f"{key!r}: the file is truncated. Nothing was loaded.", uri=self.uri)
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"Refused {self.uri}: item {key!r} in {name} needs arbitrary unpickling "
                                  f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}), which "
                                  "can run code; it was not loaded.", uri=self.uri) from None
        except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
            raise CheckpointError(f"Refused {self.uri}: item {key!r} in {name} is not a readable torch.save blob "
                                  f"({exc.__class__.__name__}: {str(exc)[:200]}).", uri=self.uri) from None
        why = walk_refused(value, max_values=MIN_FOREIGN_VALUES + min(length, MAX_FOREIGN_VALUES))
        if why:
            raise CheckpointError(f"Refused {self.uri}: item {key!r}: {why}.", uri=self.uri)
        return value

    def _value(self, key: str) -> Any:
        """A non-tensor item (or a small tensor) as saved, read once."""
        if key not in self._values:
            self._values[key] = self._read_tensor(key) if key in self.layout.tensors else self._blob(key, None)
        return self._values[key]

    def _read_tensor(self, key: str) -> torch.Tensor:
        size, dtype, chunks = self.layout.tensors[key]
        whole = len(chunks) == 1 and chunks[0][1] == size
        out = None if whole else torch.empty(size, dtype=dtype)
        seen = None if whole else torch.zeros(size, dtype=torch.bool)
        for offsets, sizes in chunks:
            t = self._blob(key, offsets)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != sizes or t.dtype != dtype:
                raise CheckpointError(f"Refused {self.uri}: the data of {key!r} is not the {dtype_name(dtype)} "
                                      f"tensor of shape {list(sizes)} the metadata promises.", uri=self.uri)
            if out is None:
                return t
            assert seen is not None
            where = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
            if bool(seen[where].any()):
                raise CheckpointError(f"Refused {self.uri}: chunks of {key!r} overlap.", uri=self.uri)
            seen[where] = True
            out[where] = t
        assert out is not None
        return out

    # --- layout ------------------------------------------------------------------------------------------

    def _find_model(self, notes: list[str]) -> dict[str, str]:
        """Saved model name -> DCP key."""
        tensors = self.layout.tensors
        nested = {p[0]: k for k, p in self.layout.under(MODEL_KEYS).items() if len(p) == 1 and k in tensors}
        if nested:
            notes.append(f"model state under 'model' ({len(nested)} tensors)")
            return {str(n): k for n, k in nested.items()}
        skip = {p[0] for p in STEP_PATHS} | set(OPTIMIZER_KEYS) | set(SCHEDULER_KEYS)
        top = {str(p[0]): k for k, p in self.layout.paths.items()
               if len(p) == 1 and k in tensors and p[0] not in skip}
        if not top:
            raise CheckpointError(f"{self.uri} is a DCP checkpoint without model tensors: expected them under "
                                  f"'model' or at the top level (torchtitan), found {list(self.layout.paths)[:10]}.",
                                  uri=self.uri)
        notes.append(f"model state at the top level ({len(top)} tensors, as torchtitan saves it)")
        return top

    def _find_optimizer(self, notes: list[str]) -> OptimizerSpec | None:
        top = next((t for t in OPTIMIZER_KEYS if self.layout.under((t,))), None)
        if top is None:
            notes.append("no optimizer state saved")
            return None
        entries = self.layout.under((top,))
        if any(len(p) > 1 for p in entries.values()):
            groups = self._nested_groups(entries, top)
            how = f"optimizer state under {top!r}, keyed by parameter name (get_state_dict): carried by name"
        else:
            groups = self._flattened_groups(entries, top)
            how = (f"optimizer state under {top!r}, flattened per parameter (flatten_optimizer_state_dict): carried "
                   "by name; param groups rebuilt from parameters with equal hyperparameters, in saved order")
        notes.append(how)
        members = {p for _, params in groups for p in params}
        stray = sorted(set(self._state_keys) - members)
        if stray:
            raise CheckpointError(f"{self.uri}: the optimizer holds state for {stray[0]!r}, which no param group "
                                  "lists.", uri=self.uri)
        self._groups = [hyper for hyper, _ in groups]
        cls, inferred = infer_optimizer_class(self._groups)
        specs = tuple(ParamGroupSpec(params=tuple(params), hyperparams=tuple(sorted(
            (k, encode(v, f"optimizer hyperparameter {k!r}")) for k, v in hyper.items()))) for hyper, params in groups)
        state = tuple(ParamState(param=param, entries=tuple(self._state_entry(k, key) for k, key in keys.items()))
                      for param, keys in self._state_keys.items())
        return OptimizerSpec(cls=cls, groups=specs, state=state, inferred=inferred)

    def _state_entry(self, name: str, key: str) -> StateEntry:
        if key in self.layout.tensors:
            return StateEntry(key=name, shape=self.layout.tensors[key][0],
                              dtype=dtype_name(self.layout.tensors[key][1]))
        return StateEntry(key=name, shape=None)

    def _nested_groups(self, entries: Mapping[str, tuple[str | int, ...]],
                       top: str) -> list[tuple[dict[str, Any], list[str]]]:
        by_index: dict[int, dict[str, str]] = {}
        for key, p in entries.items():
            if len(p) == 3 and p[0] == "state":
                self._state_keys.setdefault(str(p[1]), {})[str(p[2])] = key
            elif len(p) == 3 and p[0] == "param_groups" and type(p[1]) is int:
                by_index.setdefault(p[1], {})[str(p[2])] = key
        groups = []
        for i in sorted(by_index):
            hyper = {h: self._value(k) for h, k in by_index[i].items()}
            params = hyper.pop("params", None)
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise CheckpointError(f"{self.uri}: param group {i} under {top!r} does not list its parameters by "
                                      "name.", uri=self.uri)
            groups.append((hyper, list(params)))
        return groups

    def _flattened_groups(self, entries: Mapping[str, tuple[str | int, ...]],
                          top: str) -> list[tuple[dict[str, Any], list[str]]]:
        hyper_of: dict[str, dict[str, Any]] = {}
        for key, p in entries.items():
            head, _, rest = str(p[0]).partition(".") if len(p) == 1 else ("", "", "")
            param, _, name = rest.rpartition(".")
            if head == "state" and param:
                self._state_keys.setdefault(param, {})[name] = key
            elif head == "param_groups" and param:
                hyper_of.setdefault(param, {})[name] = self._value(key)
            else:
                raise CheckpointError(f"{self.uri}: {key!r} under {top!r} is neither optimizer state nor a param "
                                      "group entry.", uri=self.uri)
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for param, hyper in hyper_of.items():
            same = json.dumps(encode(hyper, "optimizer hyperparameters"), sort_keys=True)
            groups.setdefault(same, (hyper, []))[1].append(param)
        return list(groups.values())

    def _find_scheduler(self, notes: list[str]) -> tuple[Any, SchedulerSpec | None]:
        top = next((t for t in SCHEDULER_KEYS if self.layout.under((t,))), None)
        if top is None:
            return None, None
        state: Any = {}
        for key, p in self.layout.under((top,)).items():
            state = _nest(state, p, self._value(key))
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.uri}: {top!r} is not a scheduler state_dict.", uri=self.uri)
        notes.append(f"scheduler state from {top!r}")
        base = state.get("base_lrs")
        return state, SchedulerSpec(cls=scheduler_class(state), num_groups=len(base) if isinstance(base, list)
                                    else None)

    def _find_step(self, notes: list[str]) -> int | None:
        for path in STEP_PATHS:
            key = next((k for k, p in self.layout.paths.items() if p == path), None)
            if key is None:
                continue
            value = self._value(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = int(value.item())
            if type(value) is int:
                notes.append(f"the step is the saved {'.'.join(path)!r}")
                return value
        notes.append("no step saved ('step' or 'train_state.step')")
        return None

    # --- CheckpointSource --------------------------------------------------------------------------------

    def load(self, tensors: set[str], optimizer_params: set[str]) -> None:
        loaded = {n: self._read_tensor(self._model[n]) for n in tensors}
        state = {p: {k: self._value(key) for k, key in self._state_keys.get(p, {}).items()}
                 for p in optimizer_params}
        self._tensors, self._state = loaded, state

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def optimizer_state(self, param: str) -> dict[str, Any]:
        return dict(self._state[param])

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        return dict(self._groups[index])

    def scheduler_state(self) -> Any:
        return self._scheduler

    def details(self) -> dict[str, Any]:
        return {"kind": "torch.distributed.checkpoint", "dcp_version": str(getattr(self._md, "version", None)),
                "files": [{"path": n, "size": s, "checksum": "none kept"} for n, s in self.layout.sizes.items()]}

    def close(self) -> None:
        self._tensors, self._state, self._values = {}, {}, {}


def _nest(into: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """``into`` with ``value`` set at ``path``: str parts index dicts, int parts index lists (as DCP rebuilds)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if type(head) is int:
        into = into if isinstance(into, list) else []
        into.extend([None] * (head + 1 - len(into)))
        into[head] = _nest(into[head], rest, value)
    else:
        into = into if isinstance(into, dict) else {}
        into[head] = _nest(into.get(head), rest, value)
    return into


class DcpReader:
    """The registry's entry for DCP directories: a ``.metadata`` beside ``*.distcp`` files, told by the listing
    alone (nothing is unpickled to recognise one)."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind != "directory":
            return False
        names = probe.names()
        return METADATA in names and any(n.endswith(SUFFIX) for n in names)

    def open(self, store: Store, options: ReadOptions) -> DcpSource:
        return DcpSource(store)


READER = DcpReader()
