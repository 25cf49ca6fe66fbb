"""Foreign checkpoints: plain ``torch.save`` files as people make them today.

Either a bare model ``state_dict`` or a dict with ``model_state_dict`` / ``optimizer_state_dict`` (and
commonly ``epoch``, ``loss``). Loaded with ``weights_only=True`` only: a file that needs arbitrary
unpickling is refused, never executed. The optimizer state in such files is keyed by POSITION; reconcile
ties positions to names through the CURRENT optimizer's parameter order (as ``load_state_dict`` does) and
checks every tied state against the saved tensor's shape.
"""

from __future__ import annotations

import io
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
from resumer.formats.jsonvalue import encode_saved, walk_refused
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.formats.torch_dtypes import dtype_name
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

MODEL_KEYS = ("model_state_dict", "state_dict", "model")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim")
SCHEDULER_KEYS = ("scheduler_state_dict", "lr_scheduler", "scheduler")
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MAX_FOREIGN_BYTES = 64 * 1024**3
# Plain values (every reference counted) a torch.save file may hold besides its tensors: a few more than its
# size in bytes (each value takes at least one byte of pickle unless it is a shared reference), capped.
MIN_FOREIGN_VALUES = 10_000
MAX_FOREIGN_VALUES = 4_000_000


def safe_load(store: Store) -> Any:
    """The file's object, loaded with weights_only=True; refused unless its plain (non-tensor) values can be
    walked in a number of steps about the file's size: shared references make a tiny pickle describe a huge
    structure, and every later walk (encoding hyperparameters, copying groups) would pay for all of it."""
    uri = store.uri
    size = store.size()
    if size > MAX_FOREIGN_BYTES:
        raise CheckpointError(f"{uri} is larger than {MAX_FOREIGN_BYTES} bytes; refusing to load it whole.", uri=uri)
    obj = _unpickle(store)
    why = walk_refused(obj, max_values=MIN_FOREIGN_VALUES + min(size, MAX_FOREIGN_VALUES))
    if why:
        raise CheckpointError(f"Refused {uri}: {why}. A state_dict of this size ({size} bytes) cannot hold that "
                              "much; nothing was loaded. Re-save it without shared or deeply nested Python objects.",
                              uri=uri)
    return obj


def _unpickle(store: Store) -> Any:
    uri = store.uri
    try:
        if store.local:
            try:
                return torch.load(store.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped
                    raise
        return torch.load(io.BytesIO(store.read()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"Refused {uri}: it needs arbitrary unpickling ({detail.strip()[:200]}), which can run code. resumer "
            "loads torch.save files with weights_only=True only and never executes a checkpoint. Re-save it with "
            "tensors and plain values only (e.g. torch.save({'model_state_dict': model.state_dict(), ...})), "
            "or save with resumer.save_checkpoint.", uri=uri) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{uri} is not a readable torch.save file ({exc.__class__.__name__}: "
                              f"{str(exc)[:200]}). It may be truncated or not a checkpoint.", uri=uri) from None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes = []
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        keys = [k[len("module."):] for k in keys]
        notes.append("stripped the DDP prefix 'module.' from every saved name")
    if any("_orig_mod." in k for k in keys):
        keys = [k.replace("_orig_mod.", "") for k in keys]
        notes.append("stripped torch.compile's '_orig_mod.' from saved names")
    return dict(zip(keys, sd.values(), strict=True)), notes


def _tensor_specs(sd: dict[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs with tied tensors (same storage, offset, shape) folded into aliases, in the file's order."""
    canon: dict[tuple, int] = {}
    specs: list[dict[str, Any]] = []
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in canon:
            specs[canon[key]]["aliases"].append(name)
            continue
        canon[key] = len(specs)
        kind = BUFFER if name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES else PARAMETER
        specs.append({"name": name, "shape": tuple(t.shape), "dtype": dtype_name(t.dtype), "kind": kind,
                      "aliases": []})
    return [TensorSpec(**{**s, "aliases": tuple(s["aliases"])}) for s in specs]


_CLASSES = [
    ({"betas", "amsgrad"}, None),  # Adam family, decided below
    ({"momentum", "dampening", "nesterov"}, "torch.optim.sgd.SGD"),
    ({"alpha", "centered"}, "torch.optim.rmsprop.RMSprop"),
    ({"lr_decay"}, "torch.optim.adagrad.Adagrad"),
]


def infer_optimizer_class(groups: list[dict[str, Any]]) -> tuple[str, str]:
    """(class path or 'a|b' candidates, how it was told) from param-group hyperparameter keys."""
    keys = set(groups[0]) if groups else set()
    for needed, cls in _CLASSES:
        if not needed <= keys:
            continue
        if cls is not None:
            return cls, f"{cls.rsplit('.', 1)[-1]} inferred from its hyperparameters {sorted(needed)}"
        if "decoupled_weight_decay" in keys:
            adamw = bool(groups[0]["decoupled_weight_decay"])
            name = "AdamW" if adamw else "Adam"
            return (f"torch.optim.{name.lower()}.{name}",
                    f"{name} inferred from 'betas', 'amsgrad' and decoupled_weight_decay={adamw}")
        return ("torch.optim.adam.Adam|torch.optim.adamw.AdamW",
                "Adam or AdamW: the file's state and hyperparameter keys cannot tell them apart")
    return "unknown", f"could not be inferred from the hyperparameter keys {sorted(keys - {'params'})}"


def position_key(index: int) -> str:
    """How a position-keyed optimizer entry is named until reconcile ties it to a parameter."""
    return f"#{index}"


def _positions(opt_sd: Mapping[str, Any], uri: str) -> list[list[int]]:
    """Each group's saved positions, checked: integers, each used once, state only for held positions."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    for g in opt_sd["param_groups"]:
        members = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(members, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in members):
            raise CheckpointError(f"{uri}: an optimizer param group's 'params' is not a list of positions.", uri=uri)
        dup = seen.intersection(members) or (len(set(members)) != len(members))
        if dup:
            raise CheckpointError(f"{uri}: the optimizer's param groups list one position twice.", uri=uri)
        seen.update(members)
        groups.append([int(i) for i in members])
    state = opt_sd["state"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{uri}: the optimizer's 'state' is not a mapping.", uri=uri)
    stray = [k for k in state if not isinstance(k, int) or k not in seen]
    if stray:
        raise CheckpointError(f"{uri}: the optimizer holds state for position {stray[0]!r}, which no param group "
                              "lists.", uri=uri)
    return groups


def scheduler_class(state: Mapping[str, Any]) -> str:
    keys = set(state)
    for needed, cls in (({"step_size", "gamma"}, "StepLR"), ({"milestones", "gamma"}, "MultiStepLR"),
                        ({"T_max", "eta_min"}, "CosineAnnealingLR"), ({"lr_lambdas"}, "LambdaLR"),
                        ({"gamma"}, "ExponentialLR")):
        if needed <= keys:
            return f"torch.optim.lr_scheduler.{cls}"
    return "unknown"


class TorchSaveSource(CheckpointSource):
    """A plain torch.save checkpoint, loaded safely and seen through a Signature. Everything is in memory
    once it is open, so it keeps the defaults for ``prepare``, ``load`` and ``verify``."""

    format = "torch-save"

    def __init__(self, uri: str, model: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, step: int | None,
                 extra: dict[str, Any], notes: list[str]) -> None:
        self.uri = uri
        self.bytes_read = 0
        self._model = model
        self._scheduler = scheduler
        self._extra = extra
        specs = _tensor_specs(model)
        opt_spec = None
        self._by_name: dict[str, dict[str, Any]] = {}
        self._groups: list[dict[str, Any]] = []
        if optimizer is not None:
            opt_spec = self._optimizer_spec(optimizer, notes)
        sched_spec = None
        if scheduler is not None:
            sched_spec = SchedulerSpec(cls=scheduler_class(scheduler),
                                       num_groups=len(scheduler.get("base_lrs", ())) or None)
        self.signature = Signature(tensors=tuple(specs), optimizer=opt_spec, scheduler=sched_spec, step=step,
                                   notes=tuple(notes))

    def _optimizer_spec(self, opt_sd: Any, notes: list[str]) -> OptimizerSpec:
        try:
            groups = [dict(g) for g in opt_sd["param_groups"]]
            opt_sd["state"]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.uri}: the optimizer entry is not an optimizer state_dict "
                                  "(no 'state' and 'param_groups').", uri=self.uri) from None
        cls, how = infer_optimizer_class(groups)
        positions = _positions(opt_sd, self.uri)
        self._groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        # Positions stay positions here: which parameter each one is can only be told against the CURRENT
        # optimizer's order (what torch's load_state_dict does), so reconcile ties them to names.
        notes.append("optimizer state is keyed by position (torch.save): tied to parameters through the current "
                     "optimizer's parameter order and checked against the saved shapes")
        self._by_name = {position_key(int(i)): dict(st) for i, st in opt_sd["state"].items()}
        specs = []
        for g, members in zip(groups, positions, strict=True):
            hyper = {k: encode_saved(v, f"optimizer hyperparameter {k!r}", self.uri) for k, v in g.items()
                     if k != "params"}
            specs.append(ParamGroupSpec(params=tuple(position_key(i) for i in members),
                                        hyperparams=tuple(sorted(hyper.items()))))
        state = tuple(
            ParamState(param=key, entries=tuple(
                StateEntry(key=str(k), shape=tuple(v.shape), dtype=dtype_name(v.dtype))
                if isinstance(v, torch.Tensor) else StateEntry(key=str(k), shape=None) for k, v in st.items()))
            for key, st in self._by_name.items())
        return OptimizerSpec(cls=cls, groups=tuple(specs), state=state, inferred=how, positional=True)

    @classmethod
    def open(cls, store: Store) -> TorchSaveSource:
        uri = store.uri
        obj = safe_load(store)
        if is_state_dict(obj):
            model, notes = strip_prefixes(obj)
            return cls(uri, model, None, None, None, {}, ["a bare model state_dict (torch.save)"] + notes)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a state_dict or a dict of them.", uri=uri)
        model_key = next((k for k in MODEL_KEYS if is_state_dict(obj.get(k))), None)
        if model_key is None:
            raise CheckpointError(f"{uri} is a torch.save dict without a model state_dict: expected one of "
                                  f"{list(MODEL_KEYS)}, found keys {sorted(map(str, obj))[:20]}.", uri=uri)
        model, notes = strip_prefixes(obj[model_key])
        opt = next((obj[k] for k in OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), None)
        sched = next((obj[k] for k in SCHEDULER_KEYS if isinstance(obj.get(k), Mapping)), None)
        step_key = next((k for k in STEP_KEYS if isinstance(obj.get(k), int)), None)
        step = int(obj[step_key]) if step_key else None
        if step_key == "epoch":
            notes.append("the step is the file's 'epoch' value")
        extra = {str(k): v for k, v in obj.items() if isinstance(v, (int, float, str, bool)) and k != step_key}
        return cls(uri, model, opt, sched, step, extra, notes)

    def tensor(self, name: str) -> torch.Tensor:
        src = self._model[name]
        self.bytes_read += src.numel() * src.element_size()
        return src

    def optimizer_state(self, param: str) -> dict[str, Any]:
        return dict(self._by_name[param])

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        return dict(self._groups[index])

    def scheduler_state(self) -> Any:
        return self._scheduler

    def extra(self) -> dict[str, Any]:
        return dict(self._extra)

    def details(self) -> dict[str, Any]:
        return {"kind": "torch.save"}

    def close(self) -> None:
        self._model = {}


_ZIP = b"PK\x03\x04"  # a zip's first local file header; torch.save's first entry is ``<archive>/data.pkl``
_PROTO = 0x80  # a pickle's first opcode (protocol 2 and later): the legacy torch.save format, or a bare pickle


class TorchSaveReader:
    """The registry's entry for plain torch.save files: recognised by their first bytes, never unpickled to be
    recognised. A bare pickle counts too: opening it refuses anything but tensors and plain values, and says so."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind != "file":
            return False
        head = probe.head()
        if head.startswith(_ZIP) and len(head) >= 30:
            name_len = int.from_bytes(head[26:28], "little")
            return head[30:30 + name_len].endswith(b"data.pkl")
        return len(head) >= 2 and head[0] == _PROTO and 2 <= head[1] <= 5

    def open(self, store: Store, options: ReadOptions) -> TorchSaveSource:
        return TorchSaveSource.open(store)


READER = TorchSaveReader()
