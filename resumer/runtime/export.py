"""export: a checkpoint of any registered format written out in another tool's plain layout, so nobody is
locked in. No model is needed: everything the checkpoint holds is read through its ``CheckpointSource``.

- ``torch``: ONE ``torch.save`` file of plain types (loads with ``torch.load(weights_only=True)``):
  ``{"model": state_dict, "optimizer": state_dict, "scheduler": ..., "step": N, "rng": ..., "resumer": {...}}``.
  The optimizer's parameters are numbered in the saved order of its groups (what ``load_state_dict``
  expects); ``resumer.param_names`` says which name each number is (None when the source itself keys its
  state by position and so never knew the names).
- ``hf``: a Hugging Face ``Trainer``-style directory: ``model.safetensors`` (tied names stored once, as
  ``save_pretrained`` does; the result says which), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
  when the source holds RNG state, ``resumer_export.json`` (where it came from, which name each optimizer
  position is), and ``trainer_state.json`` with ``global_step``, written LAST: a directory
  without it is not detected as a Trainer checkpoint, so an export that stopped halfway is never read as one.

Every file is written under a temporary name beside its final one and renamed once complete (a crash leaves
no half-file under a final name); an export that fails removes what it wrote. An existing, non-empty OUT is
refused: nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

from resumer.core.errors import CheckpointError, UsageError
from resumer.core.version import __version__
from resumer.formats.source import CheckpointSource
from resumer.runtime.api import open_source
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

TARGETS = ("torch", "hf")
HF_MODEL, HF_OPTIMIZER, HF_SCHEDULER, HF_RNG, HF_STATE = (
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
HF_PROVENANCE = "resumer_export.json"  # where it came from, and which name each optimizer position is


@dataclass(slots=True, kw_only=True)
class State:
    """Everything a checkpoint holds, in memory, in plain torch terms."""

    source: str
    format: str
    step: int | None
    model: dict[str, torch.Tensor]  # canonical names and their tied aliases (the same tensor object)
    aliases: dict[str, str]  # alias -> the canonical name it is tied to
    param_names: list[str] | None  # optimizer position -> saved name; None when the source keys by position
    optimizer: dict[str, Any] | None  # a torch optimizer state_dict
    scheduler: Any
    rng: dict[str, Any] | None  # as resumer.formats.rng.parse returns it
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Export:
    """What ``export`` wrote."""

    to: str
    out: str
    source: str
    format: str
    step: int | None
    tensors: int
    optimizer_params: int
    scheduler: bool
    rng: tuple[str, ...]
    files: tuple[str, ...]
    deduplicated: tuple[tuple[str, str], ...]  # (alias, the name it is stored under)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "to": self.to, "out": self.out, "source": self.source, "format": self.format,
                "step": self.step, "tensors": self.tensors, "optimizer_params": self.optimizer_params,
                "scheduler": self.scheduler, "rng": list(self.rng), "files": list(self.files),
                "deduplicated": [{"name": a, "stored_as": c} for a, c in self.deduplicated],
                "notes": list(self.notes)}


def read_state(checkpoint: str, storage_options: dict[str, Any] | None = None) -> State:
    """Read every tensor, the optimizer state of every parameter, the param groups, the scheduler, RNG and step
    of ``checkpoint`` (any registered format, or a root), checksummed where the format keeps checksums."""
    src = open_source(checkpoint, storage_options, checksums=True)
    try:
        return _read(src)
    finally:
        src.close()


def _read(src: CheckpointSource) -> State:
    sig = src.signature
    opt = sig.optimizer
    stateful = {ps.param for ps in opt.state} if opt is not None else set()
    src.prepare()
    src.load({t.name for t in sig.tensors}, stateful)
    model: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for spec in sig.tensors:
        model[spec.name] = src.tensor(spec.name)
        for alias in spec.aliases:
            model[alias] = model[spec.name]
            aliases[alias] = spec.name
    state = State(source=src.uri, format=src.format, step=sig.step, model=model, aliases=aliases, param_names=None,
                  optimizer=None, scheduler=src.scheduler_state(), rng=src.rng_state(), notes=list(sig.notes))
    if opt is not None:
        names = [p for g in opt.groups for p in g.params]
        index = {name: i for i, name in enumerate(names)}
        groups = [{**src.group_hyperparams(gi), "params": [index[p] for p in g.params]}
                  for gi, g in enumerate(opt.groups)]
        stray = sorted(stateful - set(index))
        if stray:
            raise CheckpointError(f"{src.uri}: optimizer state is saved for {stray[0]!r}, which no param group lists; "
                                  "the checkpoint contradicts itself. Nothing was written.", uri=src.uri)
        by_index = {index[p]: src.optimizer_state(p) for p in stateful}
        state.optimizer = {"state": dict(sorted(by_index.items())), "param_groups": groups}
        if opt.positional:
            state.notes.append("the source keys its optimizer state by position and never names the parameters: "
                               "positions are kept, param_names is None")
        else:
            state.param_names = names
    return state


def _provenance(state: State) -> dict[str, Any]:
    return {"source": state.source, "format": state.format, "step": state.step, "param_names": state.param_names,
            "aliases": dict(state.aliases), "resumer_version": __version__}


def _torch_rng(parsed: dict[str, Any] | None) -> dict[str, Any] | None:
    """RNG states as plain types (what ``weights_only`` loads): tensors, ints, floats, lists, tuples."""
    if not parsed:
        return None
    out: dict[str, Any] = {}
    if "torch" in parsed:
        out["torch"] = parsed["torch"]
    if "cuda" in parsed:
        out["cuda"] = list(parsed["cuda"])
    if "python" in parsed:
        out["python"] = parsed["python"]
    if "numpy" in parsed:
        kind, keys, pos, has_gauss, cached = parsed["numpy"]
        out["numpy"] = {"kind": kind, "keys": [int(k) for k in keys], "pos": pos, "has_gauss": has_gauss,
                        "cached_gaussian": cached}
    return out


def _hf_rng(parsed: dict[str, Any] | None) -> dict[str, Any] | None:
    """RNG states under the keys ``Trainer`` writes in rng_state.pth (numpy's as its own tuple, as Trainer does)."""
    if not parsed:
        return None
    out: dict[str, Any] = {}
    if "python" in parsed:
        out["python"] = parsed["python"]
    if "numpy" in parsed:
        kind, keys, pos, has_gauss, cached = parsed["numpy"]
        out["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    if "torch" in parsed:
        out["cpu"] = parsed["torch"]
    if "cuda" in parsed:
        out["cuda"] = list(parsed["cuda"])
    return out


class _Writer:
    """Files under a location, each written to a temporary name and renamed when complete; ``discard``
    removes everything this writer made (used when the export fails)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.token = uuid.uuid4().hex[:12]
        self.made: list[str] = []

    def write(self, name: str, fill: Callable[[BinaryIO], None], check: Callable[[Store], None] | None = None, *,
              local: Callable[[str], None] | None = None) -> None:
        """``fill`` writes the file's bytes; ``local``, when given and the store is a local disk, writes the file
        at a path itself (safetensors' save_file: no second copy of the bytes in memory)."""
        tmp = f".{name}.partial-{self.token}"
        self.made.append(tmp)
        if local is not None and self.store.local:
            local(self.store.path_of(tmp))
        else:
            with self.store.create(tmp) as f:
                fill(f)
        if check is not None:
            check(self.store.child(tmp))  # read back before the final name exists
        self.made.append(name)
        self.store.move(tmp, name, what="renaming the finished export file")

    def discard(self) -> None:
        for name in self.made:
            try:
                self.store.rm(name, missing_ok=True)
            except (OSError, CheckpointError) as exc:  # cleanup must not hide the error being raised
                logger.warning("[export] could not remove %s: %s", self.store.uri_of(name), exc)


def _weights_only(file: Store) -> None:
    """The file loads with ``torch.load(weights_only=True)``: plain types only."""
    try:
        if file.local:
            torch.load(file.path, map_location="cpu", weights_only=True, mmap=True)
        else:
            torch.load(io.BytesIO(file.read()), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the export is not what it promises
        raise CheckpointError(f"The exported {file.uri} does not load with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {str(exc)[:200]}); it was removed.", uri=file.uri) from None


def _json_fill(value: Any) -> Callable[[BinaryIO], None]:
    data = json.dumps(value, indent=2, sort_keys=True).encode()

    def fill(f: BinaryIO) -> None:
        f.write(data)

    return fill


def _saver(obj: Any) -> Callable[[BinaryIO], None]:
    return lambda f: torch.save(obj, f)


def _refuse_occupied(out: Store, to: str) -> None:
    if not out.exists():
        return
    if to == "hf" and out.isdir() and not out.ls():
        return
    what = "a non-empty directory" if out.isdir() else "a file"
    raise UsageError(f"{out.uri} already exists ({what}); export never overwrites. Pass a new OUT"
                     f"{' (or an empty directory)' if to == 'hf' else ''}. Nothing was written.")


def export(checkpoint: str, out: str, to: str, *, storage_options: dict[str, Any] | None = None,
           target_options: dict[str, Any] | None = None) -> Export:
    """Write ``checkpoint`` (any registered format, or a root) to ``out`` as ``to`` (``torch`` or ``hf``).

    ``storage_options`` are the checkpoint's; ``target_options`` OUT's (default: the same).

    Raises:
        UsageError: ``to`` is unknown, or ``out`` exists (a file, or a non-empty directory).
        CheckpointError: the checkpoint is unreadable or unsafe; nothing was written.
    """
    if to not in TARGETS:
        raise UsageError(f"Unknown export target {to!r}: pass --to torch or --to hf.")
    target = Store.open(out, storage_options if target_options is None else target_options)
    _refuse_occupied(target, to)
    state = read_state(checkpoint, storage_options)
    writer = _Writer(target.parent() if to == "torch" else target)
    made_dir = to == "hf" and not target.exists()
    writer.store.makedirs()
    try:
        result = _write_torch(state, target, writer) if to == "torch" else _write_hf(state, target, writer)
    except BaseException:
        writer.discard()
        if made_dir:
            with contextlib.suppress(OSError):
                target.rmdir_if_empty()
        raise
    logger.info("[export] %s (%s) -> %s as %s: %d tensors", state.source, state.format, target.uri, to,
                result.tensors)
    return result


def _result(state: State, to: str, out: Store, files: list[str], deduplicated: list[tuple[str, str]],
            notes: list[str]) -> Export:
    opt = state.optimizer
    return Export(to=to, out=out.uri, source=state.source, format=state.format, step=state.step,
                  tensors=len(state.model) - len(state.aliases),
                  optimizer_params=sum(len(g["params"]) for g in opt["param_groups"]) if opt else 0,
                  scheduler=state.scheduler is not None, rng=tuple(state.rng or ()), files=tuple(files),
                  deduplicated=tuple(deduplicated), notes=tuple(state.notes + notes))


def _write_torch(state: State, target: Store, writer: _Writer) -> Export:
    obj = {"model": state.model, "optimizer": state.optimizer, "scheduler": state.scheduler, "step": state.step,
           "rng": _torch_rng(state.rng), "resumer": _provenance(state)}
    writer.write(target.name, _saver(obj), _weights_only)
    return _result(state, "torch", target, [target.uri], [], [])


def _write_safetensors(writer: _Writer, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save, save_file

    def fill(f: BinaryIO) -> None:  # object stores: the file's bytes are made in memory, then uploaded
        f.write(save(tensors, metadata=metadata))

    def at(path: str) -> None:
        save_file(tensors, path, metadata=metadata)
        with open(path, "rb+") as f:  # durable before it gets its final name
            os.fsync(f.fileno())

    writer.write(HF_MODEL, fill, local=at)


def _unshared(model: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The canonical tensors, each contiguous and owning its memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.items():
        if name in aliases:
            continue
        ptr = t.untyped_storage().data_ptr()
        shared = t.numel() > 0 and ptr in seen
        seen.add(ptr)
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out


def _write_hf(state: State, target: Store, writer: _Writer) -> Export:
    notes: list[str] = []
    dedup = sorted(state.aliases.items())
    if dedup:
        notes.append(f"{len(dedup)} tied name(s) stored once in {HF_MODEL} (as save_pretrained does): "
                     + ", ".join(f"{a} -> {c}" for a, c in dedup))
    metadata = {"format": "pt", "resumer.source": state.source, "resumer.source_format": state.format}
    _write_safetensors(writer, _unshared(state.model, state.aliases), metadata)
    files = [HF_MODEL]
    if state.optimizer is not None:
        writer.write(HF_OPTIMIZER, _saver(state.optimizer), _weights_only)
        files.append(HF_OPTIMIZER)
    if state.scheduler is not None:
        writer.write(HF_SCHEDULER, _saver(state.scheduler), _weights_only)
        files.append(HF_SCHEDULER)
    rng_obj = _hf_rng(state.rng)
    if rng_obj is not None:
        writer.write(HF_RNG, _saver(rng_obj))
        files.append(HF_RNG)
    step = state.step
    if step is None:
        step = 0
        notes.append(f"the source records no step: {HF_STATE} says global_step 0")
    writer.write(HF_PROVENANCE, _json_fill(_provenance(state)))
    files.append(HF_PROVENANCE)
    # Last: trainer_state.json is what makes the directory a Trainer checkpoint to readers. Only fields
    # transformers' TrainerState has (it is built with TrainerState(**json)).
    writer.write(HF_STATE, _json_fill({"global_step": step}))
    files.append(HF_STATE)
    target.fsync_dir()
    return _result(state, "hf", target, files, dedup, notes)
