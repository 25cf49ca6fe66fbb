"""Signature: what a checkpoint or the current code holds, without any tensor data.

Pure values (no torch): built from a live model by ``resumer.runtime.capture`` or from a manifest by
``Signature.from_dict``; compared by ``resumer.core.reconcile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resumer.core import dtypes

PARAMETER = "parameter"
BUFFER = "buffer"


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """One model tensor: canonical name, shape, dtype, kind, and the other names it is tied to."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str = PARAMETER
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def same_layout(self, other: TensorSpec) -> bool:
        return self.shape == other.shape and self.dtype == other.dtype

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}
        if self.aliases:
            d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            kind=str(d.get("kind", PARAMETER)),
            aliases=tuple(str(a) for a in d.get("aliases", ())),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StateEntry:
    """One piece of per-parameter optimizer state (e.g. Adam's ``exp_avg``); shape None = not a tensor."""

    key: str
    shape: tuple[int, ...] | None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateEntry:
        shape = d.get("shape")
        return cls(key=str(d["key"]), shape=None if shape is None else tuple(int(x) for x in shape),
                   dtype=d.get("dtype"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamState:
    """The optimizer state held for one parameter, by the parameter's canonical name."""

    param: str
    entries: tuple[StateEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamState:
        return cls(param=str(d["param"]), entries=tuple(StateEntry.from_dict(e) for e in d["entries"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamGroupSpec:
    """One optimizer param group: member parameter names (in order) and JSON-encoded hyperparameters."""

    params: tuple[str, ...]
    hyperparams: tuple[tuple[str, Any], ...] = ()

    def hyper(self) -> dict[str, Any]:
        return dict(self.hyperparams)

    def to_dict(self) -> dict[str, Any]:
        return {"params": list(self.params), "hyperparams": dict(self.hyperparams)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamGroupSpec:
        return cls(params=tuple(str(p) for p in d["params"]),
                   hyperparams=tuple(sorted(dict(d.get("hyperparams", {})).items())))


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerSpec:
    """An optimizer: class, param groups, and (for a checkpoint) the state saved per parameter."""

    cls: str
    groups: tuple[ParamGroupSpec, ...]
    state: tuple[ParamState, ...] = ()
    # Set for foreign checkpoints whose class had to be inferred; the text says how sure we are.
    inferred: str | None = None
    # Set when saved state cannot be tied to parameter names (foreign, position-keyed, ambiguous).
    unmapped: str | None = None
    # A plain torch.save optimizer keys its state by POSITION: group members and state are then named
    # "#<index>", and reconcile ties them to names through the current optimizer's order (as torch does).
    positional: bool = False

    @property
    def short_name(self) -> str:
        return self.cls.rsplit(".", 1)[-1]

    def state_by_param(self) -> dict[str, ParamState]:
        return {s.param: s for s in self.state}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cls": self.cls, "groups": [g.to_dict() for g in self.groups],
                             "state": [s.to_dict() for s in self.state]}
        if self.inferred:
            d["inferred"] = self.inferred
        if self.unmapped:
            d["unmapped"] = self.unmapped
        if self.positional:
            d["positional"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSpec:
        return cls(cls=str(d["cls"]), groups=tuple(ParamGroupSpec.from_dict(g) for g in d["groups"]),
                   state=tuple(ParamState.from_dict(s) for s in d.get("state", ())),
                   inferred=d.get("inferred"), unmapped=d.get("unmapped"),
                   positional=bool(d.get("positional", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerSpec:
    """An LR scheduler: class and how many param groups it drives."""

    cls: str
    num_groups: int | None = None

    @property
    def short_name(self) -> str:
        return self.cls.rsplit(".", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "num_groups": self.num_groups}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SchedulerSpec:
        n = d.get("num_groups")
        return cls(cls=str(d["cls"]), num_groups=None if n is None else int(n))


@dataclass(frozen=True, slots=True, kw_only=True)
class Signature:
    """Everything reconcile needs to know about one side: tensors, optimizer, scheduler, RNG, step."""

    tensors: tuple[TensorSpec, ...]
    optimizer: OptimizerSpec | None = None
    scheduler: SchedulerSpec | None = None
    step: int | None = None
    rng: tuple[str, ...] = ()
    world_size: int | None = None
    notes: tuple[str, ...] = field(default=())
    rng_ranks: int | None = None  # a sharded save keeps each rank's RNG state: how many ranks it kept


    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def alias_map(self) -> dict[str, str]:
        """Every alias name -> the canonical name of the tensor it is tied to."""
        return {a: t.name for t in self.tensors for a in t.aliases}

    @property
    def total_bytes_hint(self) -> int:
        return sum(t.numel * dtype_size(t.dtype) for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "optimizer": None if self.optimizer is None else self.optimizer.to_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.to_dict(),
            "step": self.step,
            "rng": list(self.rng),
            "world_size": self.world_size,
            "notes": list(self.notes),
            **({"rng_ranks": self.rng_ranks} if self.rng_ranks else {}),  # absent unless set: digests stay
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Signature:
        opt = d.get("optimizer")
        sch = d.get("scheduler")
        step = d.get("step")
        ws = d.get("world_size")
        ranks = d.get("rng_ranks")
        return cls(
            tensors=tuple(TensorSpec.from_dict(t) for t in d["tensors"]),
            optimizer=None if opt is None else OptimizerSpec.from_dict(opt),
            scheduler=None if sch is None else SchedulerSpec.from_dict(sch),
            step=None if step is None else int(step),
            rng=tuple(str(r) for r in d.get("rng", ())),
            world_size=None if ws is None else int(ws),
            notes=tuple(str(n) for n in d.get("notes", ())),
            rng_ranks=None if ranks is None else int(ranks),
        )


def dtype_size(dtype: str) -> int:
    """Bytes per element of a dtype named as torch names it without the ``torch.`` prefix (resumer.core.dtypes)."""
    return dtypes.itemsize(dtype)


def known_dtype(dtype: str) -> bool:
    return dtypes.known(dtype)
