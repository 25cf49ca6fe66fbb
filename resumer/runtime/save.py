"""save_checkpoint: model, optimizer (by parameter NAME), scheduler, RNG and step -> a committed checkpoint."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resumer.core.errors import AlreadyCommitted, StorageFullError, TransientStorageError, UsageError
from resumer.core.signature import Signature
from resumer.core.version import __version__
from resumer.formats import rng
from resumer.formats.jsonvalue import encode
from resumer.formats.native.entries import state_key
from resumer.formats.native.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_KIND,
    OPTIMIZER_KIND,
    data_file_name,
    dumps,
    step_dir,
)
from resumer.formats.native.safetensors_io import TensorLocation, write_file
from resumer.runtime import sharded, sharded_save
from resumer.runtime.capture import class_path, live_tensors, optimizer_param_names, signature
from resumer.runtime.writing import check_written as _check_written
from resumer.runtime.writing import code_fingerprint, encode_extra, encode_state
from resumer.runtime.writing import discard as _discard
from resumer.storage import retry
from resumer.storage.store import Store

logger = logging.getLogger(__name__)


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
                    scalars.setdefault(name, {})[str(key)] = encode_state(name, str(key), value)
    return tensors, scalars


def _world() -> dict[str, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return {"world_size": torch.distributed.get_world_size(), "rank": torch.distributed.get_rank()}
    return {"world_size": 1, "rank": 0}


def _write(ckpt: Store, name: str, items: list[tuple[str, torch.Tensor]], files: list[dict[str, Any]],
           written: list[str]) -> dict[str, TensorLocation]:
    """Write one safetensors file (rewritten whole on a transient failure); record it in ``files``.

    Its name goes to ``written`` BEFORE the first byte, so a failed save can remove a partial file too.
    """
    written.append(name)
    def put() -> tuple[int, str, dict[str, TensorLocation]]:
        with ckpt.create(name) as f:
            return write_file(f, name, items)

    size, checksum, index = retry.call(put, what="writing", uri=ckpt.uri_of(name))
    files.append({"path": name, "size": size, "checksum": checksum})
    return index


@dataclass(slots=True, kw_only=True)
class Snapshot:
    """Everything one checkpoint holds, captured at one instant; tensors may be copies (async save)."""

    step: int
    model_items: list[tuple[str, torch.Tensor]]
    optimizer_items: list[tuple[str, torch.Tensor]] | None
    scalars: dict[str, dict[str, Any]]
    meta: dict[str, Any]


def _host_copy(name: str, t: torch.Tensor, buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A host copy of ``t``, reusing the buffer kept under ``name`` when it fits (no new pages to fault in)."""
    buf = buffers.get(name) if buffers is not None else None
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
        if buffers is not None:
            buffers[name] = buf
    buf.copy_(t.detach(), non_blocking=t.device.type == "cuda")
    return buf


def snapshot(step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             *, extra: dict[str, Any] | None = None, copy: bool = False,
             buffers: dict[str, torch.Tensor] | None = None) -> Snapshot:
    """Capture a checkpoint's content. ``copy`` copies tensors to host memory so training may go on,
    into ``buffers`` (name -> host tensor, filled and reused across saves) when given."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}.")
    tensors = live_tensors(model)
    if sharded.is_sharded(model, optimizer):
        raise UsageError("This model's state is sharded (DTensor / FSDP2): save it with save_checkpoint on every rank "
                         "(a collective save); a snapshot of one rank's shards would not be a checkpoint.")
    on_meta = [lt.name for lt in tensors if lt.tensor.device.type == "meta"]
    if on_meta:
        raise UsageError(f"Cannot save a model on the meta device ({on_meta[0]!r} has no data). Materialize it first.")
    world = _world()
    sig = signature(model, optimizer, scheduler, step=step, world_size=world["world_size"])
    rng_state = rng.capture()
    sig = Signature(tensors=sig.tensors, optimizer=sig.optimizer, scheduler=sig.scheduler, step=step,
                    rng=tuple(rng_state), world_size=world["world_size"])
    sched_state = None
    if scheduler is not None:
        sched_state = {"cls": class_path(scheduler), "state": encode(scheduler.state_dict(), "scheduler state")}
    model_items = [(lt.name, lt.tensor) for lt in tensors]
    opt_items: list[tuple[str, torch.Tensor]] | None = None
    scalars: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        opt_items, scalars = _optimizer_items(optimizer, {id(lt.tensor): lt.name for lt in tensors})
    if copy:
        on_gpu = any(t.device.type == "cuda" for _, t in model_items + (opt_items or []))
        model_items = [(n, _host_copy(n, t, buffers)) for n, t in model_items]
        opt_items = None if opt_items is None else [(n, _host_copy(n, t, buffers)) for n, t in opt_items]
        if on_gpu:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
    meta = {"signature": sig.to_dict(), "scheduler": sched_state, "rng": rng_state, "world": world,
            "code": code_fingerprint(model, sig), "extra": encode_extra(extra)}
    return Snapshot(step=step, model_items=model_items, optimizer_items=opt_items, scalars=scalars, meta=meta)


def _finite(t: torch.Tensor) -> bool:
    """Whether every element is finite; float8 kinds have no isfinite kernel, so they are widened first
    (float4 cannot even be widened: it counts as finite)."""
    try:
        return bool(torch.isfinite(t.to(torch.float32) if t.element_size() == 1 else t).all())
    except NotImplementedError:
        return True


def _health(snap: Snapshot) -> dict[str, Any]:
    """Which tensors hold NaN/Inf, and the recorded loss: read later by the health gate from the manifest."""
    bad = [n for n, t in snap.model_items if t.is_floating_point() and not _finite(t)]
    loss = snap.meta["extra"].get("loss") if isinstance(snap.meta["extra"], dict) else None
    return {"nonfinite": bad, "loss": loss if isinstance(loss, (int, float, dict)) else None}


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_snapshot(snap: Snapshot, root: str | Store, storage_options: dict[str, Any] | None = None) -> str:
    """Write a snapshot under ``root`` (a URI, with ``storage_options``, or a Store) and commit it (data first,
    manifest last); returns its URI.

    Raises:
        CheckpointError: the step is already committed, or another writer committed it first.
        StorageFullError: the storage ran out of space; this save's partial files were removed.
    """
    started = time.perf_counter()
    store = Store.of(root, storage_options)
    ckpt = store.child(step_dir(snap.step))
    uri = ckpt.uri
    if ckpt.exists(MANIFEST):
        raise AlreadyCommitted(f"{uri} is already committed. Each step is saved once; pick a new step or another "
                               "root.", uri=uri)
    written: list[str] = []
    try:
        ckpt.makedirs()
        files = _write_and_commit(snap, ckpt, written)
    except BaseException as exc:
        # Nothing was committed: remove what this save wrote (its names carry its own token, so another
        # writer's files are never touched), so no half-save is left behind to fill the disk. Not after a
        # storage outage: a commit PUT may have landed unseen, and its data must then stay.
        if not isinstance(exc, TransientStorageError):
            _discard(ckpt, written)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise StorageFullError(
                f"Saving step {snap.step} to {uri} failed: no space left on the storage ({exc.strerror or exc}). "
                "Nothing was committed and this save's partial files were removed. Free space (e.g. "
                f"`resumer prune {store.uri} --keep-last N` deletes old checkpoints) and save again.",
                uri=uri) from exc
        raise
    # Durable before returning (local disks): data files and manifest were fsynced; now the entries naming them.
    ckpt.fsync_dir()
    store.fsync_dir()
    total = sum(int(f["size"]) for f in files)
    logger.info("[save] step=%d %s: %d tensors, %d bytes in %.2fs", snap.step, uri, len(snap.model_items), total,
                time.perf_counter() - started)
    return uri


def _write_and_commit(snap: Snapshot, ckpt: Store, written: list[str]) -> list[dict[str, Any]]:
    """Data files (each named in ``written`` before it is opened), then the manifest as the commit."""
    token = uuid.uuid4().hex[:12]  # unique per attempt: racing writers never overwrite each other's bytes
    files: list[dict[str, Any]] = []
    index = _write(ckpt, data_file_name(MODEL_KIND, token), snap.model_items, files, written)
    opt_index: dict[str, TensorLocation] = {}
    if snap.optimizer_items is not None:
        opt_index = _write(ckpt, data_file_name(OPTIMIZER_KIND, token), snap.optimizer_items, files, written)
    raw = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": snap.step,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "resumer_version": __version__, "torch_version": torch.__version__,
        "signature": snap.meta["signature"],
        "files": files,
        "tensors": {n: loc.to_dict() for n, loc in index.items()},
        "optimizer": None if snap.optimizer_items is None else {
            "tensors": {n: loc.to_dict() for n, loc in opt_index.items()}, "scalars": snap.scalars},
        "scheduler": snap.meta["scheduler"],
        "rng": snap.meta["rng"],
        "world": snap.meta["world"],
        "code": snap.meta["code"],
        "health": _health(snap),
        "extra": snap.meta["extra"],
    }
    _check_written(ckpt, files)
    # Commit: the manifest goes last, so a reader sees either no checkpoint or all of it. It is an
    # exclusive create, so of two writers racing for one step exactly one commits.
    try:
        ckpt.commit(MANIFEST, data=dumps(raw))
        written.clear()  # committed: from here on these files belong to a checkpoint and are never discarded
    except FileExistsError:
        raise AlreadyCommitted(f"Cannot commit {ckpt.uri}: another writer committed step {snap.step} first (two saves "
                               "of one step ran at once). Its checkpoint stands; this save's data files were removed. "
                               "Save each step from one writer, or use another root.", uri=ckpt.uri) from None
    return files


def save_checkpoint(root: str | Store, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, *, extra: dict[str, Any] | None = None,
                    storage_options: dict[str, Any] | None = None) -> str:
    """Write a checkpoint for ``step`` under ``root`` (a URI, with ``storage_options``, or a Store) and commit
    it; returns its URI.

    Data files are written first and the manifest last: a reader never sees a half-written checkpoint.
    Optimizer state is stored by parameter name, so it survives reordering and renames.
    Sharded state (an FSDP2 / DTensor model) is saved collectively: every rank calls this, writes its own shards,
    and gets the same URI once all of them are committed (resumer.runtime.sharded_save). Replicated (DDP) state is the
    same on every rank: save it from one rank (rank 0); called on several, each writes it and all but one fail
    with AlreadyCommitted.
    """
    if sharded.is_sharded(model, optimizer):
        return sharded_save.save(root, step, model, optimizer, scheduler, extra=extra, storage_options=storage_options)
    return write_snapshot(snapshot(step, model, optimizer, scheduler, extra=extra), root, storage_options)
