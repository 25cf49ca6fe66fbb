"""save_checkpoint: model, optimizer (by parameter NAME), scheduler, RNG and step -> a committed checkpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import logging
import time
import uuid
from typing import Any

import torch
from torch import nn

import resumer
from resumer import rng
from resumer.capture import class_path, live_tensors, optimizer_param_names, signature, unwrap
from resumer.errors import CheckpointError, UsageError
from resumer.jsonvalue import encode
from resumer.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_KIND,
    OPTIMIZER_KIND,
    data_file_name,
    dumps,
    state_key,
)
from resumer.safetensors_io import TensorLocation, write_file
from resumer.signature import Signature
from resumer.store import get_fs, join, step_dir, write_bytes_atomic

logger = logging.getLogger(__name__)


def code_fingerprint(model: nn.Module, sig: Signature) -> dict[str, Any]:
    """What identifies the code: the model class, a hash of its source, a hash of the structure."""
    cls = type(unwrap(model))
    try:
        source = inspect.getsource(inspect.getmodule(cls) or cls)
        source_hash = hashlib.sha256(source.encode()).hexdigest()[:16]
    except (OSError, TypeError):
        source_hash = None
    structure = {"tensors": [t.to_dict() for t in sig.tensors],
                 "optimizer": sig.optimizer.cls if sig.optimizer else None,
                 "groups": [list(g.params) for g in sig.optimizer.groups] if sig.optimizer else None}
    structure_hash = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:16]
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}", "source_sha256": source_hash,
            "structure_sha256": structure_hash, "fingerprint": f"{structure_hash}-{source_hash}"}


def _optimizer_items(optimizer: torch.optim.Optimizer, names: dict[int, str]
                     ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    members = optimizer_param_names(optimizer, names)
    tensors: list[tuple[str, torch.Tensor]] = []
    scalars: dict[str, dict[str, Any]] = {}
    for group, params in zip(optimizer.param_groups, members, strict=True):
        for p, name in zip(group["params"], params, strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors.append((state_key(name, str(key)), value))
                else:
                    scalars.setdefault(name, {})[str(key)] = encode(value, f"optimizer state '{name}' '{key}'")
    return tensors, scalars


def _world() -> dict[str, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return {"world_size": torch.distributed.get_world_size(), "rank": torch.distributed.get_rank()}
    return {"world_size": 1, "rank": 0}


def _write(fs: Any, path: str, name: str, items: list[tuple[str, torch.Tensor]], files: list[dict[str, Any]]
           ) -> dict[str, TensorLocation]:
    """Write one safetensors file, record it in ``files``, return where each tensor lies."""
    with fs.open(join(path, name), "wb") as f:
        size, checksum, index = write_file(f, name, items)
    files.append({"path": name, "size": size, "checksum": checksum})
    return index


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, *, extra: dict[str, Any] | None = None,
                    storage_options: dict[str, Any] | None = None) -> str:
    """Write a checkpoint for ``step`` under ``root`` and commit it; returns its URI.

    Data files are written first and the manifest last: a reader never sees a half-written checkpoint.
    Optimizer state is stored by parameter name, so it survives reordering and renames.
    """
    if not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}.")
    started = time.perf_counter()
    tensors = live_tensors(model)
    on_meta = [lt.name for lt in tensors if lt.tensor.device.type == "meta"]
    if on_meta:
        raise UsageError(f"Cannot save a model on the meta device ({on_meta[0]!r} has no data). Materialize it first.")
    world = _world()
    sig = signature(model, optimizer, scheduler, step=step, world_size=world["world_size"])
    rng_state = rng.capture()
    sig = Signature(tensors=sig.tensors, optimizer=sig.optimizer, scheduler=sig.scheduler, step=step,
                    rng=tuple(rng_state), world_size=world["world_size"])
    extra_json = encode(extra or {}, "extra")
    sched_state = None
    if scheduler is not None:
        sched_state = {"cls": class_path(scheduler), "state": encode(scheduler.state_dict(), "scheduler state")}

    uri = join(root, step_dir(step))
    fs, path = get_fs(uri, storage_options)
    if fs.exists(join(path, MANIFEST)):
        raise CheckpointError(f"{uri} is already committed. Each step is saved once; pick a new step or another root.",
                              uri=uri)
    fs.makedirs(path, exist_ok=True)
    files: list[dict[str, Any]] = []
    token = uuid.uuid4().hex[:12]  # unique per attempt: racing writers never overwrite each other's bytes
    index = _write(fs, path, data_file_name(MODEL_KIND, token), [(lt.name, lt.tensor) for lt in tensors], files)
    opt_index: dict[str, TensorLocation] = {}
    scalars: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        opt_items, scalars = _optimizer_items(optimizer, {id(lt.tensor): lt.name for lt in tensors})
        opt_index = _write(fs, path, data_file_name(OPTIMIZER_KIND, token), opt_items, files)
    raw = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "resumer_version": resumer.__version__, "torch_version": torch.__version__,
        "signature": sig.to_dict(),
        "files": files,
        "tensors": {n: loc.to_dict() for n, loc in index.items()},
        "optimizer": None if optimizer is None else {
            "tensors": {n: loc.to_dict() for n, loc in opt_index.items()}, "scalars": scalars},
        "scheduler": sched_state,
        "rng": rng_state,
        "world": world,
        "code": code_fingerprint(model, sig),
        "extra": extra_json,
    }
    # Commit: the manifest goes last, so a reader sees either no checkpoint or all of it.
    write_bytes_atomic(fs, join(path, MANIFEST), dumps(raw))
    total = sum(int(f["size"]) for f in files)
    logger.info("[save] step=%d %s: %d tensors, %d bytes in %.2fs", step, uri, len(tensors), total,
                time.perf_counter() - started)
    return uri
