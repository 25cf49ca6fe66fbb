"""The collective save of sharded training state (FSDP2 / DTensor): every rank calls ``save_checkpoint``.

The name-keyed state comes from torch's own ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``get_optimizer_state_dict``); each rank writes the pieces it holds (its local shards, by their global offsets) to
its own data files, a piece held by several ranks (replicated tensors, plain tensors such as a step count) once, by
the lowest rank holding it. The signature is the global one (global shapes and dtypes), so planning is unchanged.
The commit is fail-closed: every rank's outcome, files (sizes, checksums) and pieces are gathered (a collective);
rank 0 lists the files, builds the manifest, parses it back (which checks that the chunks tile every tensor exactly
and that every byte range lies in a listed file) and only then commits it; the verdict is broadcast, so every rank
returns the same URI or raises the same CheckpointError, and a save that did not commit removes every rank's files.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from resumer.core.errors import (
    AlreadyCommitted,
    CheckpointError,
    ResumerError,
    UsageError,
)
from resumer.core.version import __version__
from resumer.formats import rng
from resumer.formats.jsonvalue import encode
from resumer.formats.native.entries import chunk_key, state_key
from resumer.formats.native.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_KIND,
    OPTIMIZER_KIND,
    dumps,
    parse,
    rank_file_name,
    step_dir,
)
from resumer.formats.native.safetensors_io import write_file
from resumer.runtime.capture import class_path, signature
from resumer.runtime.sharded import is_dtensor
from resumer.runtime.writing import check_written as _check_written
from resumer.runtime.writing import code_fingerprint, encode_extra, encode_state
from resumer.runtime.writing import discard as _discard
from resumer.storage import retry
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

# (key, global offsets, the local tensor holding exactly those elements, whether it is the whole tensor)
Piece = tuple[str, tuple[int, ...], torch.Tensor, bool]


def local_pieces(key: str, t: Any) -> list[Piece]:
    """The piece of ``t`` this rank holds: a DTensor's local shard at its global offsets, or a plain tensor whole."""
    if not is_dtensor(t):
        return [(key, (0,) * t.dim(), t.detach(), True)]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local().detach()
    if tuple(local.shape) != tuple(shape):
        raise UsageError(f"Cannot save {key!r}: its local shard is {list(local.shape)}, where its placements "
                         f"{t.placements} give {list(shape)} (a padded or uneven layout resumer cannot place).")
    whole = tuple(shape) == tuple(t.shape)
    if math.prod(shape) == 0 and not whole:
        return []  # an empty shard (more ranks than rows) holds nothing to store
    return [(key, tuple(int(o) for o in offsets), local, whole)]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, names: list[str]
           ) -> tuple[list[Piece], list[Piece], dict[str, dict[str, Any]]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd: dict[str, Any] = dict(get_model_state_dict(model))
    missing = [n for n in names if n not in msd]
    if missing:
        raise UsageError(f"torch's get_model_state_dict has no {missing[0]!r}, which the model's parameters name: "
                         "resumer cannot tell which state is which. Save the unwrapped model.")
    model_pieces = [p for n in names for p in local_pieces(n, msd[n])]
    opt_pieces: list[Piece] = []
    scalars: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        osd: Any = get_optimizer_state_dict(model, optimizer)
        for param, st in osd["state"].items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    opt_pieces += local_pieces(state_key(str(param), str(key)), value)
                else:
                    scalars.setdefault(str(param), {})[str(key)] = encode_state(str(param), str(key), value)
    return model_pieces, opt_pieces, scalars


def _loss(extra: Any) -> Any:
    """The recorded loss, as the unsharded save notes it for the health gate."""
    loss = extra.get("loss") if isinstance(extra, dict) else None
    return loss if isinstance(loss, (int, float, dict)) else None


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite (others always are); float8 is widened first."""
    if not t.is_floating_point():
        return True
    try:
        return bool(torch.isfinite(t.to(torch.float32) if t.element_size() == 1 else t).all())
    except NotImplementedError:
        return True


def _owned(pieces: list[Piece], held: list[list[tuple[str, tuple[int, ...]]]], rank: int) -> list[Piece]:
    """The pieces this rank writes: those no lower rank holds too (replicated tensors are stored once)."""
    first: dict[tuple[str, tuple[int, ...]], int] = {}
    for r, keys in enumerate(held):
        for k in keys:
            first.setdefault(k, r)
    return [p for p in pieces if first[(p[0], p[1])] == rank]


def _write_pieces(ckpt: Store, name: str, pieces: list[Piece], written: list[str]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """One data file of this rank's pieces; returns its file entry and each piece's placement."""
    if not pieces:
        return None
    items = [(p[0] if p[3] else chunk_key(p[0], p[1]), p[2]) for p in pieces]
    written.append(name)

    sums: dict[str, str] = {}

    def put() -> tuple[int, str, dict[str, Any]]:
        sums.clear()
        with ckpt.create(name) as f:
            return write_file(f, name, items, pieces=sums)

    size, checksum, index = retry.call(put, what="writing", uri=ckpt.uri_of(name))
    placed = [{"key": p[0], "whole": p[3], "file": name, "offset": index[k].offset, "offsets": list(p[1]),
               "sizes": list(p[2].shape), "checksum": sums[k]} for p, (k, _) in zip(pieces, items, strict=True)]
    return {"path": name, "size": size, "checksum": checksum}, placed


def _locations(placed: list[dict[str, Any]], shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Any]:
    """Long-form locations: a tensor written whole by one rank as itself, any other as its chunks."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for p in placed:
        by_key.setdefault(p["key"], []).append(p)
    out: dict[str, Any] = {}
    for key, pieces in by_key.items():
        shape, dtype = shapes.get(key, ((), "float32"))
        if len(pieces) == 1 and pieces[0]["whole"]:
            p = pieces[0]
            out[key] = {"file": p["file"], "offset": p["offset"], "nbytes": math.prod(p["sizes"]) * _size(dtype),
                        "dtype": dtype, "shape": list(shape), "checksum": p["checksum"]}
        else:
            out[key] = {"dtype": dtype, "shape": list(shape), "chunks": [
                {"file": p["file"], "offset": p["offset"], "offsets": p["offsets"], "sizes": p["sizes"],
                 "checksum": p["checksum"]}
                for p in sorted(pieces, key=lambda p: p["offsets"])]}
    return out


def _size(dtype: str) -> int:
    from resumer.core.signature import dtype_size

    return dtype_size(dtype)


def save(root: str | Store, step: int, model: nn.Module,  # noqa: C901 - same collectives on every rank
         optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None, *, extra: dict[str, Any] | None = None,
         storage_options: dict[str, Any] | None = None) -> str:
    """The collective save of sharded state (see the module's doc); every rank calls it and gets the same URI."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}.")
    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    store = Store.of(root, storage_options)
    ckpt = store.child(step_dir(step))
    token = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    written: list[str] = []
    outcome: dict[str, Any] = {"rank": rank, "error": None, "files": [], "placed": [], "nonfinite": []}
    meta: dict[str, Any] = {}
    model_pieces: list[Piece] = []
    opt_pieces: list[Piece] = []

    def failed(exc: BaseException) -> None:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        logger.warning("[save] rank %d: %s", rank, outcome["error"])

    # Every rank makes the same collective calls in the same order, whatever fails where.
    try:
        sig = signature(model, optimizer, scheduler, step=step, world_size=world)
        rng_state = rng.capture()
        names = [t.name for t in sig.tensors]
        model_pieces, opt_pieces, scalars = _state(model, optimizer, names)
        outcome["nonfinite"] = sorted({p[0] for p in model_pieces if not _finite(p[2])})
        outcome["rng"] = rng_state
        if rank == 0:
            if ckpt.exists(MANIFEST):
                raise AlreadyCommitted(f"{ckpt.uri} is already committed. Each step is saved once; pick a new step "
                                       "or another root.", uri=ckpt.uri)
            sched = None if scheduler is None else {"cls": class_path(scheduler),
                                                   "state": encode(scheduler.state_dict(), "scheduler state")}
            sig_dict = sig.to_dict()
            sig_dict["rng"] = list(rng_state)
            meta = {"signature": sig_dict, "scheduler": sched, "rng": rng_state, "scalars": scalars,
                    "code": code_fingerprint(model, sig), "extra": encode_extra(extra)}
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gathers, or the others hang
        failed(exc)
    held: list[Any] = [None] * world
    dist.all_gather_object(held, None if outcome["error"] else [(p[0], p[1]) for p in model_pieces + opt_pieces])
    if outcome["error"] is None and any(h is None for h in held):
        outcome["error"] = "another rank failed before writing"
    if outcome["error"] is None:
        try:
            ckpt.makedirs()
            for kind, pieces in ((MODEL_KIND, model_pieces), (OPTIMIZER_KIND, opt_pieces)):
                if kind == OPTIMIZER_KIND and optimizer is None:
                    continue
                result = _write_pieces(ckpt, rank_file_name(kind, str(token[0]), rank),
                                       _owned(pieces, held, rank), written)
                if result is not None:
                    outcome["files"].append(result[0])
                    outcome["placed"] += result[1]
        except Exception as exc:  # noqa: BLE001 - as above
            failed(exc)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, outcome)
    verdict: list[Any] = [None]
    if rank == 0:
        verdict[0] = _commit(ckpt, step, gathered, meta, optimizer is not None, world, _check_written)
    dist.broadcast_object_list(verdict, src=0)
    kind, message = verdict[0]
    if kind != "ok":
        if kind != "lost":
            _discard(ckpt, written)
        if kind == "committed-by-other":
            raise AlreadyCommitted(message, uri=ckpt.uri)
        raise CheckpointError(message, uri=ckpt.uri, quarantine=False)
    if store.local:
        ckpt.fsync_dir()
        store.fsync_dir()
    logger.info("[save] step=%d %s: rank %d of %d wrote %d file(s) in %.2fs", step, ckpt.uri, rank, world,
                len(outcome["files"]), time.perf_counter() - started)
    return ckpt.uri


def _commit(ckpt: Store, step: int, gathered: list[dict[str, Any]], meta: dict[str, Any], has_optimizer: bool,
            world: int, check_written: Any) -> tuple[str, str]:
    """Rank 0: commit the manifest only when every rank wrote its files and the pieces tile every tensor.
    Returns ("ok", uri) or (why, message)."""
    failed = [g for g in gathered if g["error"] is not None]
    if failed:
        return "failed", (f"Saving step {step} to {ckpt.uri} failed on rank {failed[0]['rank']} "
                          f"({failed[0]['error']}); {len(failed)} of {world} rank(s) failed. Nothing was committed; "
                          "every rank's files of this save were removed. Save again.")
    files = [f for g in gathered for f in g["files"]]
    placed = [p for g in gathered for p in g["placed"]]
    sig = meta["signature"]
    shapes = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in sig["tensors"]}
    for st in (sig.get("optimizer") or {}).get("state", []):
        for e in st["entries"]:
            if e["shape"] is not None:
                shapes[state_key(st["param"], e["key"])] = (tuple(e["shape"]), e["dtype"])
    model_names = {t["name"] for t in sig["tensors"]}
    raw = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "resumer_version": __version__, "torch_version": torch.__version__,
        "signature": sig, "files": files,
        "tensors": _locations([p for p in placed if p["key"] in model_names], shapes),
        "optimizer": {"tensors": _locations([p for p in placed if p["key"] not in model_names], shapes),
                      "scalars": meta["scalars"]} if has_optimizer else None,
        "scheduler": meta["scheduler"], "rng": meta["rng"],
        "world": {"world_size": world, "rank": 0, "sharded": True,
                  "rng_per_rank": [g.get("rng") or {} for g in gathered]},  # restored per rank at the same world size
        "code": meta["code"],
        "health": {"nonfinite": sorted({n for g in gathered for n in g["nonfinite"]}),
                   "loss": _loss(meta["extra"])}, "extra": meta["extra"],
    }
    try:
        data = dumps(raw)
        parse(data, ckpt.uri)  # the chunks tile every tensor, every byte range lies in a listed file
        check_written(ckpt, files)
    except (CheckpointError, ResumerError, KeyError, ValueError, OSError) as exc:
        return "incomplete", (f"Saving step {step} to {ckpt.uri} did not commit: the ranks' files do not make a "
                              f"whole checkpoint ({exc}). Nothing was committed; every rank's files of this save "
                              "were removed. Save again.")
    try:
        ckpt.commit(MANIFEST, data=data)
    except FileExistsError:
        return "committed-by-other", (f"Cannot commit {ckpt.uri}: another writer committed step {step} first. Its "
                                      "checkpoint stands; this save's data files were removed.")
    except OSError as exc:
        return "lost", f"Committing {ckpt.uri} failed ({exc}); the checkpoint may or may not be committed."
    return "ok", ckpt.uri
