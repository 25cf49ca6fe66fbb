"""Foreign checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, as torchtitan writes them.

A directory (torchtitan's ``step-N/``) holding ``.metadata`` and ``*.distcp`` data files, written by
``torch.distributed.checkpoint.save`` with its ``FileSystemWriter``. ``.metadata`` is a pickle of DCP's
``Metadata``: it is read only through ``resumer.formats.dcp_metadata``, whose unpickler builds DCP's metadata
dataclasses and the few torch values they hold (``torch.Size``, dtypes, the strided layout) and refuses every other
global, so a hostile ``.metadata`` runs nothing. Every item of a data file is one ``torch.save`` blob (a tensor
chunk, or any other value) at the offset and length the metadata's storage data gives; it is read from exactly that
byte range, checked to lie inside the file, and loaded with ``weights_only=True``.

The saved state is nested again through the metadata's key paths (DCP flattens ``{"model": ..., "optim": ...}``
into ``model.0.weight``, ``optim.state.0.weight.exp_avg``). Model tensors sit under ``model`` (or at the top
level: torchtitan flattens its model state). Optimizer state under ``optim`` / ``optimizer`` is keyed by
parameter name, as ``torch.distributed.checkpoint.state_dict.get_state_dict`` writes it (nested, or flattened
by ``flatten_optimizer_state_dict``), so it is carried by name, no positions involved. A scheduler under
``lr_scheduler`` / ``scheduler`` and a step under ``step`` / ``train_state.step`` are read when present.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections.abc import Mapping
from typing import Any

import torch

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
from resumer.formats.dcp_metadata import METADATA, SUFFIX, Layout, read_metadata
from resumer.formats.jsonvalue import encode_saved, walk_refused
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.formats.torch_dtypes import dtype_name
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

MODEL_KEYS = ("model",)
OPTIMIZER_KEYS = ("optim", "optimizer")
SCHEDULER_KEYS = ("lr_scheduler", "scheduler")
STEP_PATHS = (("step",), ("train_state", "step"))


class DcpSource(CheckpointSource):
    """A DCP directory seen through a Signature; model and optimizer tensors are read by ``load``."""

    format = "torch-dcp"

    def __init__(self, store: Store) -> None:
        self.uri = store.uri
        self.store = store
        self.bytes_read = 0
        self._md = read_metadata(store)
        self.layout = Layout(self._md, store)
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
            (k, encode_saved(v, f"optimizer hyperparameter {k!r}", self.uri)) for k, v in hyper.items())))
            for hyper, params in groups)
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
            same = json.dumps(encode_saved(hyper, "optimizer hyperparameters", self.uri), sort_keys=True)
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
