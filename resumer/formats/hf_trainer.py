"""Hugging Face ``transformers.Trainer`` checkpoints: a ``checkpoint-N/`` directory as ``Trainer`` saves it.

What is read, under the names ``Trainer._save_checkpoint`` writes:

- the model: ``model.safetensors``, or ``model.safetensors.index.json`` and the shards it names, or
  ``pytorch_model.bin``. Safetensors headers are read and checked by resumer's own bounded reader when the
  checkpoint is opened; the index may name only shards in the directory, and each shard must hold exactly
  the tensors the index puts in it (a lying index is refused). Tensor bytes are read by ``load``, only for
  the tensors the plan copies. ``pytorch_model.bin`` is a torch.save file, loaded with ``weights_only=True``.
- ``optimizer.pt`` and ``scheduler.pt``: torch.save files, read as ``resumer.formats.torch_save`` reads them;
  the optimizer state is keyed by position and tied to names through the CURRENT optimizer's order.
- ``trainer_state.json``: ``global_step`` is the step.
- ``rng_state.pth``: Python, numpy and torch RNG states. numpy's is an ndarray inside the pickle, so the file is
  loaded with ``weights_only=True`` and nothing more allowlisted than numpy's array and dtype reconstruction
  (what ``Trainer`` itself allowlists to read it back), then checked by ``resumer.formats.rng.parse``.
  Per-process ``rng_state_N.pth`` files (a multi-process run) are not restored: a resume cannot tell which
  process's state belongs to which rank now; the plan says so.
- never ``training_args.bin``: a pickle of ``TrainingArguments``, which could run code when unpickled.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from resumer.core.errors import CheckpointError, ResumerError
from resumer.core.signature import BUFFER, PARAMETER, TensorSpec
from resumer.formats import rng
from resumer.formats.jsonvalue import JSONRefused, encode, strict_loads
from resumer.formats.native.readpass import read_file
from resumer.formats.native.safetensors_io import (
    MIN_PARSE_BUDGET,
    PARSE_BUDGET_PER_BYTE,
    TensorLocation,
    read_header,
    tensor_bytes,
)
from resumer.formats.source import Probe, ReadOptions
from resumer.formats.torch_dtypes import torch_dtype
from resumer.formats.torch_save import BUFFER_SUFFIXES, TorchSaveSource, is_state_dict, safe_load
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
MODEL_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN)  # the first present is read
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_STATE = "rng_state.pth"
NOT_READ = {
    "training_args.bin": "a pickle of TrainingArguments; unpickling it could run code",
    "scaler.pt": "the AMP GradScaler state; resumer restores no gradient scaler",
}
MAX_JSON_BYTES = 64 * 1024**2
MAX_RNG_BYTES = 1024**2  # a few RNG states take a few kilobytes


def _read_json(store: Store, name: str) -> Any:
    """A JSON file of the checkpoint, bounded in size and parse cost; CheckpointError when it is not JSON."""
    uri = store.uri_of(name)
    data = store.read(name, limit=MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{uri} is larger than {MAX_JSON_BYTES} bytes; refusing to parse it.", uri=uri)
    try:
        return strict_loads(data, max_cost=max(MIN_PARSE_BUDGET, PARSE_BUDGET_PER_BYTE * len(data)))
    except JSONRefused as exc:
        raise CheckpointError(f"{uri} is not valid JSON ({exc}); nothing was loaded.", uri=uri) from None


def _step(store: Store) -> tuple[int, dict[str, Any]]:
    """``global_step`` from trainer_state.json, and the epoch (as extra) when it holds one."""
    state = _read_json(store, TRAINER_STATE)
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{store.uri_of(TRAINER_STATE)} holds no 'global_step' (a non-negative integer); "
                              "it is not a Trainer state.", uri=store.uri)
    epoch = state.get("epoch")
    extra = {"epoch": epoch} if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else {}
    return step, extra


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    """One safetensors file of the model: its name, size and checked header."""

    name: str
    size: int
    header: dict[str, TensorLocation]


def read_shard(store: Store, name: str) -> Shard:
    size = store.size(name)
    with store.open_read(name, size=size) as f:
        header = read_header(f, size, store.uri_of(name))
    for tensor, loc in header.items():
        try:
            torch_dtype(loc.dtype)
        except ValueError as exc:
            raise CheckpointError(f"{store.uri_of(name)}: tensor {tensor!r} cannot be read here ({exc}); nothing "
                                  "was loaded.", uri=store.uri) from None
    return Shard(name=name, size=size, header=header)


def _indexed_shards(store: Store, names: frozenset[str]) -> list[Shard]:
    """The shards ``model.safetensors.index.json`` names, each checked to hold exactly what the index says."""
    uri = store.uri_of(SAFETENSORS_INDEX)
    index = _read_json(store, SAFETENSORS_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{uri} has no 'weight_map' of tensor names to shard files; nothing was loaded.",
                              uri=store.uri)
    wanted: dict[str, set[str]] = {}
    for tensor, file in weight_map.items():
        wanted.setdefault(file, set()).add(tensor)
    shards = []
    for file, tensors in wanted.items():
        if "/" in file or "\\" in file or file not in names or not file.endswith(".safetensors"):
            raise CheckpointError(f"{uri} places {sorted(tensors)[0]!r} in {file!r}, which is not a safetensors "
                                  "file of this directory. The index is wrong; nothing was loaded.", uri=store.uri)
        shard = read_shard(store, file)
        if set(shard.header) != tensors:
            extra, missing = sorted(set(shard.header) - tensors), sorted(tensors - set(shard.header))
            why = (f"the index places {missing[0]!r} there, but the shard does not hold it" if missing else
                   f"the shard holds {extra[0]!r}, which the index does not place there")
            raise CheckpointError(f"{uri} does not match shard {file!r}: {why}. The index is wrong; nothing was "
                                  "loaded.", uri=store.uri)
        shards.append(shard)
    return shards


def _tensor_spec(name: str, loc: TensorLocation) -> TensorSpec:
    kind = BUFFER if name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES else PARAMETER
    return TensorSpec(name=name, shape=loc.shape, dtype=loc.dtype, kind=kind)


def _numpy_globals() -> list[Any]:
    """What numpy's RNG state needs from the unpickler: an ndarray rebuilt, and its dtype. Nothing that runs code:
    the array's elements still pass torch's weights-only unpickler."""
    from numpy._core import multiarray

    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _b64(t: Any, what: str) -> str:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise CheckpointError(f"the {what} RNG state is not a byte tensor")
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode()


def _numpy_state(value: Any) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = value
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint32:
        raise CheckpointError("the numpy RNG state's keys are not an array of uint32")
    return {"kind": str(kind), "keys": [int(k) for k in keys.reshape(-1)], "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


HF_RNG_KEYS = {"cpu": "torch", "numpy": "numpy", "python": "python", "cuda": "cuda"}


def load_rng_pickle(file: Store) -> Mapping[str, Any]:
    """A torch.save dict of RNG states, loaded weights-only with numpy's array types allowed and nothing else."""
    if file.size() > MAX_RNG_BYTES:
        raise CheckpointError(f"{file.uri} is larger than {MAX_RNG_BYTES} bytes: not an RNG state.", uri=file.uri)
    with torch.serialization.safe_globals(_numpy_globals()):
        obj = safe_load(file)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file.uri} holds a {type(obj).__name__}, not a dict of RNG states.", uri=file.uri)
    return obj


def parse_rng(obj: Mapping[str, Any], keys: Mapping[str, str], uri: str) -> dict[str, Any]:
    """The RNG states under ``keys`` (the file's key -> torch, numpy, python or cuda), checked by
    ``resumer.formats.rng.parse`` and ready for ``rng.restore``; nothing is applied."""
    state: dict[str, Any] = {}
    try:
        for key, kind in keys.items():
            if key not in obj:
                continue
            value = obj[key]
            if kind == "numpy":
                state[kind] = _numpy_state(value)
            elif kind == "python":
                state[kind] = encode(value, "python RNG state")
            elif kind == "cuda":
                state[kind] = [_b64(s, "CUDA") for s in (value if isinstance(value, (list, tuple)) else [value])]
            else:
                state[kind] = _b64(value, kind)
    except (ResumerError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{uri}: the saved RNG state is malformed ({exc}). Nothing was loaded.",
                              uri=uri) from None
    return rng.parse(state, uri)


def _rng(store: Store, names: frozenset[str], notes: list[str]) -> dict[str, Any] | None:
    """The RNG states of rng_state.pth, parsed and checked (nothing applied), or None with a note saying why."""
    if RNG_STATE not in names:
        per_process = sorted(n for n in names if n.startswith("rng_state_") and n.endswith(".pth"))
        notes.append(f"RNG not restored: {', '.join(per_process)} are per-process states of a multi-process run, "
                     "and a resume cannot tell which belongs to which rank now" if per_process else
                     "RNG not restored: the checkpoint holds no rng_state.pth")
        return None
    obj = load_rng_pickle(store.child(RNG_STATE))
    others = sorted(str(k) for k in obj if k not in HF_RNG_KEYS)
    if others:
        notes.append(f"RNG states of {', '.join(others)} in {RNG_STATE} are not restored (no such device here)")
    notes.append(f"RNG state from {RNG_STATE}, loaded weights-only with numpy's array types as the only additions "
                 "allowed in the unpickler")
    return parse_rng(obj, HF_RNG_KEYS, store.uri_of(RNG_STATE))


def read_state_dict(store: Store, name: str, names: frozenset[str], notes: list[str]) -> Mapping[str, Any] | None:
    """A torch.save dict of the checkpoint (optimizer.pt, scheduler.pt), loaded weights-only, or None."""
    if name not in names:
        notes.append(f"the checkpoint holds no {name}")
        return None
    obj = safe_load(store.child(name))
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{store.uri_of(name)} holds a {type(obj).__name__}, not a state_dict.",
                              uri=store.uri)
    return obj


class HFTrainerSource(TorchSaveSource):
    """A ``checkpoint-N/`` of ``transformers.Trainer``. Optimizer and scheduler state are read as a torch.save
    checkpoint's are (in memory once open); safetensors weights are planned from their headers and read by
    ``load``."""

    format = "hf-trainer"

    def __init__(self, store: Store, *, shards: list[Shard], state_dict: dict[str, torch.Tensor],
                 optimizer: Any, scheduler: Any, step: int, rng_state: dict[str, Any] | None,
                 extra: dict[str, Any], notes: list[str]) -> None:
        super().__init__(store.uri, state_dict, optimizer, scheduler, step, extra, notes)
        self._store = store
        self._shards = shards
        self._rng = rng_state
        sig = replace(self.signature, rng=tuple(rng_state or ()))
        if shards:  # safetensors: the Signature comes from the headers (safetensors stores no tied aliases)
            order = sorted((shard.name, loc.offset, name, loc)
                           for shard in shards for name, loc in shard.header.items())
            sig = replace(sig, tensors=tuple(_tensor_spec(name, loc) for _, _, name, loc in order))
        self.signature = sig

    def load(self, tensors: set[str], optimizer_params: set[str]) -> None:
        """Read the wanted model tensors, one pass per shard, into fresh memory (headers checked again)."""
        for shard in self._shards:
            wanted = sorted((loc.offset, name) for name, loc in shard.header.items()
                            if name in tensors and name not in self._model)
            if not wanted:
                continue
            out: list[torch.Tensor] = []

            def into(i: int, wanted: list[tuple[int, str]] = wanted, shard: Shard = shard,
                     out: list[torch.Tensor] = out) -> memoryview:
                loc = shard.header[wanted[i][1]]
                t = torch.empty(loc.shape, dtype=torch_dtype(loc.dtype))
                out.append(t)
                return tensor_bytes(t)

            furi = self._store.uri_of(shard.name)
            with self._store.open_read(shard.name, size=shard.size) as f:
                read_file(f, shard.size, furi, self.uri, want={n: shard.header[n] for _, n in wanted},
                          regions=[(o, shard.header[n].nbytes) for o, n in wanted], into=into, hashing=False)
            self._model.update(zip((n for _, n in wanted), out, strict=True))

    def rng_state(self) -> dict[str, Any] | None:
        return self._rng

    def details(self) -> dict[str, Any]:
        files = [{"path": name, "size": self._store.size(name), "checksum": "(no checksum recorded)"}
                 for name in sorted(listing(self._store))]
        return {"kind": self.format, "files": files}

    def close(self) -> None:
        super().close()
        self._rng = None


def listing(store: Store) -> frozenset[str]:
    """The names directly inside the checkpoint directory."""
    return frozenset(str(p).rstrip("/").rsplit("/", 1)[-1] for p in store.ls())


def read_model(store: Store, names: frozenset[str], notes: list[str]) -> tuple[list[Shard], dict[str, torch.Tensor]]:
    """The model's safetensors shards (headers only), or the state_dict of pytorch_model.bin."""
    if SAFETENSORS_INDEX in names:
        shards = _indexed_shards(store, names)
        notes.append(f"model weights from {len(shards)} safetensors shard(s) named by {SAFETENSORS_INDEX}")
        return shards, {}
    if SAFETENSORS in names:
        notes.append(f"model weights from {SAFETENSORS}")
        return [read_shard(store, SAFETENSORS)], {}
    sd = safe_load(store.child(TORCH_BIN))
    if not is_state_dict(sd):
        raise CheckpointError(f"{store.uri_of(TORCH_BIN)} is not a model state_dict.", uri=store.uri)
    notes.append(f"model weights from {TORCH_BIN} (torch.save, read with weights_only=True)")
    return [], dict(sd)


class HFTrainerReader:
    """The registry's entry for ``transformers.Trainer`` checkpoint directories: a directory holding
    trainer_state.json and a model file."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind != "directory":
            return False
        names = probe.names()
        return TRAINER_STATE in names and any(m in names for m in MODEL_FILES)

    def open(self, store: Store, options: ReadOptions) -> HFTrainerSource:
        names = listing(store)
        notes = ["a Hugging Face Trainer checkpoint directory"]
        step, extra = _step(store)
        shards, state_dict = read_model(store, names, notes)
        optimizer = read_state_dict(store, OPTIMIZER, names, notes)
        scheduler = read_state_dict(store, SCHEDULER, names, notes)
        rng_state = _rng(store, names, notes)
        notes += [f"{name} is not read: {why}" for name, why in NOT_READ.items() if name in names]
        return HFTrainerSource(store, shards=shards, state_dict=state_dict, optimizer=optimizer,
                               scheduler=scheduler, step=step, rng_state=rng_state, extra=extra, notes=notes)


READER = HFTrainerReader()
