"""The checkpoint manifest (format v1): the commit marker, written last, validated strictly on read.

A checkpoint is a directory::

    step-0000001200/
      model.<token>.safetensors        model tensors by canonical name
      optimizer.<token>.safetensors    optimizer tensor state, keys "<param name>/<state key>" (by NAME)
      manifest.json                    everything else; its presence commits the checkpoint
      quarantine.json                  (only if a reader found it corrupt: the reason; nothing is deleted)

``<token>`` is unique per save attempt, so two writers racing on one step never mix their bytes: each
manifest names its own files, and the last manifest written wins whole.

Pure: parses bytes into a ``Manifest``; storage lives in ``resumer.storage.store``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from resumer.core.errors import CheckpointError
from resumer.core.signature import (
    PARAMETER,
    OptimizerSpec,
    ParamGroupSpec,
    ParamState,
    SchedulerSpec,
    Signature,
    StateEntry,
    TensorSpec,
    dtype_size,
    known_dtype,
)
from resumer.formats.jsonvalue import MAX_DEPTH, JSONRefused, strict_loads, too_deep
from resumer.formats.native.safetensors_io import TensorLocation

FORMAT = "resumer-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# A root of checkpoints holds one directory per step: step-0000001200/
STEP_DIR = re.compile(r"^step-(\d{1,19})$")
QUARANTINE = "quarantine.json"
MODEL_KIND = "model"
OPTIMIZER_KIND = "optimizer"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Memory json.loads may take for a manifest, as estimated from its bytes before parsing (see
# resumer.formats.jsonvalue.parse_cost): our own manifests estimate at about 11x their size.
PARSE_BUDGET_PER_BYTE = 16
MIN_PARSE_BUDGET = 64 * 1024 * 1024
MAX_COUNT = 2**62  # sizes, offsets, steps and element counts above this are absurd, whatever the type says
MAX_DIMS = 64
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_PIECE_SUM = re.compile(r"^[0-9a-f]{16}$")


def _piece_sum(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _PIECE_SUM.match(value):
        raise _Bad(f"{where} checksum is {str(value)[:40]!r}, not 16 hex digits")
    return value


def data_file_name(kind: str, token: str) -> str:
    return f"{kind}.{token}.safetensors"


def chunk_key(name: str, offsets: tuple[int, ...]) -> str:
    """The safetensors key of one chunk of a sharded tensor (or optimizer state): its name and global offsets."""
    return f"{name}#{','.join(map(str, offsets))}"


def rank_file_name(kind: str, token: str, rank: int) -> str:
    """A rank's own data file in a sharded save."""
    return f"{kind}.{token}.rank{rank}.safetensors"


def state_key(param: str, key: str) -> str:
    """The safetensors key of one piece of optimizer state, by parameter name."""
    return f"{param}/{key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    path: str
    size: int
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "checksum": self.checksum}


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One piece of a sharded tensor: where it starts in the global tensor, and its bytes (``loc.shape`` is the
    piece's size in every dimension)."""

    offsets: tuple[int, ...]
    loc: TensorLocation

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.loc.shape

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.loc.file, "offset": self.loc.offset, "offsets": list(self.offsets),
                "sizes": list(self.loc.shape)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A parsed, validated manifest. ``raw`` is the JSON object it came from, less the sections held here typed
    (``signature``, ``tensors``, ``optimizer``)."""

    uri: str
    step: int
    time: str
    signature: Signature
    files: tuple[FileEntry, ...]
    tensors: dict[str, TensorLocation]
    optimizer_tensors: dict[str, TensorLocation]
    optimizer_scalars: dict[str, dict[str, Any]]
    scheduler_state: Any
    rng: dict[str, Any] | None
    code: dict[str, Any]
    extra: dict[str, Any]
    raw: dict[str, Any]
    # Tensors (by name) and optimizer state (by state key) stored in pieces, one or more per rank that held a
    # shard; they are absent from ``tensors`` / ``optimizer_tensors``. Their pieces tile them exactly.
    chunks: dict[str, tuple[Chunk, ...]] = field(default_factory=dict)
    # A sharded checkpoint's checksum of each piece (whole tensor or chunk) by its safetensors key: a rank that
    # reads only the pieces it needs checks each of them, not whole files.
    piece_checksums: dict[str, str] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return bool(self.chunks)

    def pieces(self, key: str) -> list[tuple[str, TensorLocation]]:
        """The byte ranges holding tensor or optimizer state ``key``: itself, or its chunks (by chunk key)."""
        whole = self.tensors.get(key) or self.optimizer_tensors.get(key)
        if whole is not None:
            return [(key, whole)]
        return [(chunk_key(key, c.offsets), c.loc) for c in self.chunks.get(key, ())]

    def in_file(self, file: str) -> dict[str, TensorLocation]:
        """Every byte range the manifest places in ``file``, by its safetensors key."""
        out = {k: loc for k, loc in (*self.tensors.items(), *self.optimizer_tensors.items()) if loc.file == file}
        for key, chunks in self.chunks.items():
            out.update({chunk_key(key, c.offsets): c.loc for c in chunks if c.loc.file == file})
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def data_file(self, kind: str) -> str:
        """The name of this checkpoint's ``model`` or ``optimizer`` data file."""
        for f in self.files:
            if f.path.split(".", 1)[0] == kind:
                return f.path
        raise KeyError(kind)


def safe_file_name(name: Any) -> bool:
    """A plain file name inside the checkpoint directory: no separators, no '..', not absolute."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


class _Bad(ValueError):
    """One wrong field; ``parse`` turns it into a CheckpointError naming the checkpoint."""


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _Bad(f"missing or wrong field ({key!r} missing in {where})")
    return obj[key]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {_kind(value)}, not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{where} is {_kind(value)}, not a list")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is {_kind(value)}, not a string")
    return value


def _int(value: Any, where: str, *, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{where} is {_kind(value)}, not an integer")
    if not low <= value <= high:
        raise _Bad(f"{where} is {value}, outside {low}..{high}")
    return value


def _opt(value: Any, check: Any, where: str) -> Any:
    return None if value is None else check(value, where)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    dims = _list(value, where)
    if len(dims) > MAX_DIMS:
        raise _Bad(f"{where} has {len(dims)} dimensions (at most {MAX_DIMS})")
    shape = tuple(_int(d, f"{where}[{i}]") for i, d in enumerate(dims))
    if math.prod(shape) > MAX_COUNT:
        raise _Bad(f"{where} {list(shape)} holds more than {MAX_COUNT} elements")
    return shape


def _dtype(value: Any, where: str) -> str:
    if not isinstance(value, str) or not known_dtype(value):
        raise _Bad(f"{where} is {str(value)[:40]!r}, not a known dtype")
    return value


def _strs(value: Any, where: str) -> tuple[str, ...]:
    return tuple(_str(x, f"{where}[{i}]") for i, x in enumerate(_list(value, where)))


def _check_signature(sig: Any) -> None:
    """Every field ``Signature.from_dict`` reads has the type it needs (it converts without asking)."""
    sig = _obj(sig, "'signature'")
    for i, t in enumerate(_list(_get(sig, "tensors", "'signature'"), "signature 'tensors'")):
        where = f"signature tensor {i}"
        t = _obj(t, where)
        _str(_get(t, "name", where), f"{where} 'name'")
        _shape(_get(t, "shape", where), f"{where} 'shape'")
        _dtype(_get(t, "dtype", where), f"{where} 'dtype'")
        _str(t.get("kind", ""), f"{where} 'kind'")
        _strs(t.get("aliases", []), f"{where} 'aliases'")
    opt = sig.get("optimizer")
    if opt is not None:
        opt = _obj(opt, "signature 'optimizer'")
        _str(_get(opt, "cls", "signature 'optimizer'"), "optimizer 'cls'")
        for key in ("inferred", "unmapped"):
            _opt(opt.get(key), _str, f"optimizer {key!r}")
        for i, g in enumerate(_list(_get(opt, "groups", "signature 'optimizer'"), "optimizer 'groups'")):
            g = _obj(g, f"optimizer group {i}")
            _strs(_get(g, "params", f"optimizer group {i}"), f"optimizer group {i} 'params'")
            _obj(g.get("hyperparams", {}), f"optimizer group {i} 'hyperparams'")
        for i, st in enumerate(_list(opt.get("state", []), "optimizer 'state'")):
            st = _obj(st, f"optimizer state {i}")
            _str(_get(st, "param", f"optimizer state {i}"), f"optimizer state {i} 'param'")
            for j, e in enumerate(_list(_get(st, "entries", f"optimizer state {i}"), f"optimizer state {i}")):
                e = _obj(e, f"optimizer state {i} entry {j}")
                _str(_get(e, "key", f"optimizer state {i} entry {j}"), f"optimizer state {i} entry {j} 'key'")
                _opt(e.get("shape"), _shape, f"optimizer state {i} entry {j} 'shape'")
                _opt(e.get("dtype"), _dtype, f"optimizer state {i} entry {j} 'dtype'")
    _check_signature_rest(sig)


def _check_signature_rest(sig: dict[str, Any]) -> None:
    """The signature's fields besides its tensors and optimizer."""
    sched = sig.get("scheduler")
    if sched is not None:
        sched = _obj(sched, "signature 'scheduler'")
        _str(_get(sched, "cls", "signature 'scheduler'"), "scheduler 'cls'")
        _opt(sched.get("num_groups"), _int, "scheduler 'num_groups'")
    _opt(sig.get("step"), _int, "signature 'step'")
    _opt(sig.get("world_size"), _int, "signature 'world_size'")
    _strs(sig.get("rng", []), "signature 'rng'")
    _strs(sig.get("notes", []), "signature 'notes'")


def _files(raw: Any) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for i, f in enumerate(_list(raw, "'files'")):
        f = _obj(f, f"file {i}")
        path = _get(f, "path", f"file {i}")
        if not safe_file_name(path):
            raise _Bad(f"file name {str(path)[:300]!r} is not a plain name inside the checkpoint (path traversal "
                       "refused)")
        files[path] = FileEntry(path=path, size=_int(_get(f, "size", f"file {path!r}"), f"file {path!r} 'size'"),
                                checksum=_str(_get(f, "checksum", f"file {path!r}"), f"file {path!r} 'checksum'"))
    return files


def _locations(raw: Any, files: dict[str, FileEntry], what: str, chunks: dict[str, tuple[Chunk, ...]] | None = None,
               sums: dict[str, str] | None = None) -> dict[str, TensorLocation]:
    out = {}
    sums = {} if sums is None else sums
    for name, d in _obj(raw, f"{what} locations").items():
        where = f"{what} '{name}'"
        d = _obj(d, where)
        if "chunks" in d and chunks is not None:
            shape, dtype = _shape(_get(d, "shape", where), f"{where} 'shape'"), _dtype(_get(d, "dtype", where),
                                                                                      f"{where} 'dtype'")
            items = []
            for i, c in enumerate(_list(d["chunks"], f"{where} chunks")):
                c = _obj(c, f"{where} chunk {i}")
                file = _str(_get(c, "file", f"{where} chunk {i}"), f"{where} chunk {i} 'file'")
                if file not in files:
                    raise _Bad(f"{where} chunk {i} lies in {file[:300]!r}, which the manifest does not list")
                items.append((files[file], _get(c, "offset", where), _get(c, "offsets", where),
                              _get(c, "sizes", where)))
            chunks[name] = made = make_chunks(name, shape, dtype, items, what)
            for c, ch in zip(d["chunks"], made, strict=True):
                if "checksum" in c:
                    sums[chunk_key(name, ch.offsets)] = _piece_sum(c["checksum"], f"{where} chunk")
            continue
        if "checksum" in d:
            sums[name] = _piece_sum(d["checksum"], where)
        file = _str(_get(d, "file", where), f"{where} 'file'")
        entry = files.get(file)
        if entry is None:
            raise _Bad(f"{what} '{name}' lies in {file[:300]!r}, which the manifest does not list")
        loc = TensorLocation(file=entry.path, offset=_int(_get(d, "offset", where), f"{where} 'offset'"),
                             nbytes=_int(_get(d, "nbytes", where), f"{where} 'nbytes'"),
                             dtype=_dtype(_get(d, "dtype", where), f"{where} 'dtype'"),
                             shape=_shape(_get(d, "shape", where), f"{where} 'shape'"))
        if loc.nbytes != math.prod(loc.shape) * dtype_size(loc.dtype):
            raise _Bad(f"{what} '{name}': {loc.nbytes} bytes do not hold {loc.dtype}{list(loc.shape)}")
        if loc.offset + loc.nbytes > entry.size:
            raise _Bad(f"{what} '{name}' lies outside {loc.file} ({entry.size} bytes)")
        out[name] = loc
    _no_overlap(out, what)
    return out


MAX_PAIRWISE_CHUNKS = 1024  # chunks of one tensor checked pair by pair (when not all cut along dimension 0)


def make_chunks(name: str, shape: tuple[int, ...], dtype: str, items: list[tuple[FileEntry, Any, Any, Any]],
                what: str = "tensor") -> tuple[Chunk, ...]:
    """Checked chunks of tensor ``name`` (global ``shape``, ``dtype``) from (file, byte offset, global offsets,
    sizes): each inside the tensor and inside its file, and together tiling the tensor exactly (no gap, no overlap).
    Raises _Bad (a ValueError) naming what is wrong."""
    where = f"{what} '{name}'"
    out = []
    for i, (entry, offset, offsets, sizes) in enumerate(items):
        offsets = _fast_shape(offsets, _w("{} chunk {} offsets", where, i))
        sizes = _fast_shape(sizes, _w("{} chunk {} sizes", where, i))
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
            raise _Bad(f"{where} chunk {i} at {list(offsets)} of size {list(sizes)} does not lie inside "
                       f"{dtype}{list(shape)}")
        if type(offset) is not int or not 0 <= offset <= MAX_COUNT:
            _int(offset, f"{where} chunk {i} offset")
        nbytes = math.prod(sizes) * dtype_size(dtype)
        if offset + nbytes > entry.size:
            raise _Bad(f"{where} chunk {i} lies outside {entry.path} ({entry.size} bytes)")
        out.append(Chunk(offsets=offsets, loc=TensorLocation(file=entry.path, offset=offset, nbytes=nbytes,
                                                             dtype=dtype, shape=sizes)))
    _check_tiling(where, shape, out)
    return tuple(out)


def _check_tiling(where: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    covered = sum(math.prod(c.sizes) for c in chunks)
    if not chunks or covered != math.prod(shape):
        raise _Bad(f"the chunks of {where} cover {covered} of its {math.prod(shape)} elements: they do not tile it")
    if all(c.offsets[1:] == (0,) * (len(shape) - 1) and c.sizes[1:] == shape[1:] for c in chunks) and shape:
        rows = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in chunks)
        overlap = any(b < e for (_, e), (b, _) in zip(rows, rows[1:], strict=False))
    elif len(chunks) > MAX_PAIRWISE_CHUNKS:
        raise _Bad(f"{where} has {len(chunks)} chunks not all cut along dimension 0 (at most "
                   f"{MAX_PAIRWISE_CHUNKS} are checked)")
    else:
        overlap = any(all(a.offsets[d] < b.offsets[d] + b.sizes[d] and b.offsets[d] < a.offsets[d] + a.sizes[d]
                          for d in range(len(shape))) and math.prod(a.sizes) and math.prod(b.sizes)
                      for i, a in enumerate(chunks) for b in chunks[i + 1:])
    if overlap:
        raise _Bad(f"the chunks of {where} overlap: they do not tile it")


def _check_plain(raw: dict[str, Any]) -> None:
    """The free-form sections have the container type their readers expect, and are shallow enough for the
    recursive code that reads them (decoding, comparing, rendering)."""
    _opt(raw.get("time"), _str, "'time'")
    for key in ("code", "extra", "world", "health", "rng"):
        _opt(raw.get(key), _obj, repr(key))
    opt_sig = (raw.get("signature") or {}).get("optimizer") or {}
    free = {key: raw.get(key) for key in ("code", "extra", "world", "health", "rng", "scheduler")}
    free["optimizer scalars"] = (raw.get("optimizer") or {}).get("scalars")
    free["optimizer hyperparameters"] = [g.get("hyperparams") for g in opt_sig.get("groups", [])]
    for key, value in free.items():
        if too_deep(value, MAX_DEPTH - 1):
            raise _Bad(f"{key} is nested more than {MAX_DEPTH} levels deep")
    _obj(raw.get("scheduler") or {}, "'scheduler'")
    per_rank = (raw.get("world") or {}).get("rng_per_rank")
    for i, state in enumerate(_opt(per_rank, _list, "world 'rng_per_rank'") or []):
        _obj(state, f"world 'rng_per_rank' {i}")
    health = raw.get("health") or {}
    _strs(health.get("nonfinite") or [], "health 'nonfinite'")
    opt = _obj(raw.get("optimizer") or {}, "'optimizer'")
    for param, scalars in _obj(opt.get("scalars", {}), "optimizer 'scalars'").items():
        _obj(scalars, f"optimizer scalars of {param!r}")


def _check_agrees(sig: Signature, tensors: dict[str, TensorLocation],
                  chunks: dict[str, tuple[Chunk, ...]] | None = None) -> None:
    """Each tensor the signature names has stored bytes of exactly its shape and dtype."""
    chunks = chunks or {}
    for t in sig.tensors:
        for c in chunks.get(t.name, ()):
            if c.loc.dtype != t.dtype:
                raise _Bad(f"tensor {t.name!r} is {t.dtype} in the signature but its chunks are {c.loc.dtype}")
    missing = [t.name for t in sig.tensors if t.name not in tensors and t.name not in chunks]
    if missing:
        raise _Bad(f"signature names {len(missing)} tensor(s) with no stored bytes, e.g. {missing[0]!r}")
    for t in sig.tensors:
        if t.name not in tensors:
            continue
        loc = tensors[t.name]
        if (loc.shape, loc.dtype) != (t.shape, t.dtype):
            raise _Bad(f"tensor {t.name!r} is {t.dtype}{list(t.shape)} in the signature but its stored bytes are "
                       f"{loc.dtype}{list(loc.shape)}")


def newer_format(uri: str, version: int) -> CheckpointError:
    """A checkpoint this version cannot read; it is fine for a newer resumer, so it is never quarantined."""
    return CheckpointError(f"{uri} is not readable by this version of resumer (format {version}, this version "
                           f"reads up to {FORMAT_VERSION}): upgrade resumer. The checkpoint is not used, and not "
                           "marked or deleted.", uri=uri, quarantine=False)


def malformed(uri: str, why: str) -> CheckpointError:
    return CheckpointError(f"{uri}/{MANIFEST} is malformed: {why}. The checkpoint is not used; nothing was loaded or "
                           "deleted.", uri=uri)


def step_dir(step: int) -> str:
    """The directory of ``step``'s checkpoint under a root."""
    return f"step-{step:010d}"


def oversized(uri: str, size: int) -> CheckpointError:
    """A manifest over the size limit: refused before it is read (or parsed)."""
    return malformed(uri, f"{size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")


def parse(data: bytes, uri: str) -> Manifest:
    """Validate and parse manifest bytes; any problem is a CheckpointError that names it.

    ``raw`` of the result is the JSON object less its large sections (``signature``, ``tensors``,
    ``optimizer``), which live on in the typed fields: a big manifest is not held twice.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise oversized(uri, len(data))
    with _no_gc():  # it makes many objects and no garbage: a collection pass would only walk them (2x the time)
        return _parse(data, uri)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _parse(data: bytes, uri: str) -> Manifest:
    def bad(why: str) -> CheckpointError:
        return malformed(uri, why)

    try:
        raw = strict_loads(data, max_cost=max(MIN_PARSE_BUDGET, PARSE_BUDGET_PER_BYTE * len(data)))
    except JSONRefused as exc:
        raise bad(str(exc)) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"format version {str(version)[:40]!r} is not a version number")
    if version > FORMAT_VERSION:
        raise newer_format(uri, version)
    try:
        if version >= 2 and "dtypes" in raw:  # the compact form; without its table, the long form
            return _build_compact(raw, uri, min(MAX_EXPANDED, MIN_EXPANDED + len(data) // EXPANDED_PER_BYTE))
        return _build(raw, uri)
    except _Bad as exc:
        raise bad(str(exc)) from None


def _build(raw: dict[str, Any], uri: str) -> Manifest:
    files = _files(_get(raw, "files", "the manifest"))
    _check_signature(_get(raw, "signature", "the manifest"))
    _check_plain(raw)
    sig = Signature.from_dict(raw.pop("signature"))
    if sig.optimizer is not None and sig.optimizer.positional:
        raise _Bad("its optimizer signature claims position-keyed state; a resumer checkpoint keys it by name")
    step = _int(_get(raw, "step", "the manifest"), "'step'")
    chunks: dict[str, tuple[Chunk, ...]] = {}
    sums: dict[str, str] = {}
    tensors = _locations(_get(raw, "tensors", "the manifest"), files, "tensor", chunks, sums)
    del raw["tensors"]
    _check_agrees(sig, tensors, chunks)
    opt = raw.pop("optimizer", None) or {}
    opt_tensors = _locations(opt.get("tensors", {}), files, "optimizer state", chunks, sums)
    _no_overlap({**tensors, **opt_tensors, **{chunk_key(k, c.offsets): c.loc for k, cs in chunks.items() for c in cs}},
                "tensor")
    return Manifest(
        uri=uri, step=step, time=raw.get("time") or "", signature=sig, files=tuple(files.values()), tensors=tensors,
        chunks=chunks, piece_checksums=sums, optimizer_tensors=opt_tensors,
        optimizer_scalars=dict(opt.get("scalars", {})), scheduler_state=(raw.get("scheduler") or {}).get("state"),
        rng=raw.get("rng"), code=dict(raw.get("code") or {}), extra=dict(raw.get("extra") or {}), raw=raw)


def dumps(raw: dict[str, Any]) -> bytes:
    """The manifest's bytes: the compact form (v2) of a long-form ``raw``, when its version is 2 or more and its
    tensors are exactly the signature's (always so for a save); otherwise ``raw`` as it is. No indentation."""
    if isinstance(raw.get("version"), int) and raw["version"] >= 2 and isinstance(raw.get("tensors"), dict):
        with contextlib.suppress(_NotCompact):
            raw = compact(raw)
    return json.dumps(raw, separators=(",", ":"), sort_keys=False, allow_nan=False).encode()


# --- the compact form (format v2) ---------------------------------------------------------------------------------
#
# The long form (v1, and what the code builds) names every tensor's file, offset, length, dtype and shape, and every
# optimizer state entry's key, shape and dtype, in objects with their keys spelled out: about 420 bytes per tensor.
# The compact form says each thing once:
#   "dtypes":    the dtype names, referred to by index;
#   signature "tensors": rows [name, shape, dtype index] (+ kind when not "parameter", + aliases);
#   optimizer "groups" params, and "state" params: an index into those rows (a name when the parameter is none);
#   optimizer "layouts": the distinct lists of state entries [key, shape, dtype index], where shape 0 means "the
#     parameter's shape" and null "not a tensor"; each "state" row is [param, layout index];
#   "tensors": [file index, offset] per signature row, in order (length, dtype and shape are the row's);
#   optimizer "tensors": [file index, offset] per tensor state entry, in state order.
# Reading builds the typed Manifest from it directly, every index and type checked once.

# Entries (signature tensors and optimizer state entries) a compact manifest may expand to: a few times what its
# bytes hold (a save's cost over 20 bytes per entry), at most MAX_EXPANDED (about 2 GB of objects).
EXPANDED_PER_BYTE = 8
MIN_EXPANDED = 256 * 1024
MAX_EXPANDED = 4_000_000


class _NotCompact(ValueError):
    """A long form the compact form cannot hold (tensors that are not exactly the signature's)."""


def compact(raw: dict[str, Any]) -> dict[str, Any]:  # noqa: C901 - one branch per section
    """The compact form (v2) of a long-form manifest ``raw``; raises _NotCompact when it cannot hold it."""
    sig = raw["signature"]
    dtypes: dict[str, int] = {}

    def dt(name: Any) -> int | None:
        return None if name is None else dtypes.setdefault(name, len(dtypes))

    rows: list[list[Any]] = []
    index: dict[str, int] = {}
    for t in sig["tensors"]:
        row: list[Any] = [t["name"], t["shape"], dt(t["dtype"])]
        aliases = t.get("aliases") or []
        if t.get("kind", "parameter") != "parameter" or aliases:
            row.append(t.get("kind", "parameter"))
        if aliases:
            row.append(aliases)
        index[t["name"]] = len(rows)
        rows.append(row)
    file_index = {f["path"]: i for i, f in enumerate(raw["files"])}

    def place(loc: dict[str, Any], shape: Any, dtype: Any) -> list[Any]:
        if list(loc["shape"]) != list(shape) or loc["dtype"] != dtype:
            raise _NotCompact("a location that differs from its signature")
        if "chunks" in loc:
            return [[file_index[c["file"]], c["offset"], list(c["offsets"]), list(c["sizes"])]
                    + ([c["checksum"]] if "checksum" in c else []) for c in loc["chunks"]]
        return [file_index[loc["file"]], loc["offset"]] + ([loc["checksum"]] if "checksum" in loc else [])

    if set(raw["tensors"]) != set(index) or len(index) != len(rows):
        raise _NotCompact("tensors that are not the signature's")
    out_sig = dict(sig)
    out_sig["tensors"] = rows
    tensors = [place(raw["tensors"][t["name"]], t["shape"], t["dtype"]) for t in sig["tensors"]]
    out = {k: v for k, v in raw.items() if k not in ("signature", "tensors", "optimizer")}
    opt_sig, opt = sig.get("optimizer"), raw.get("optimizer")
    if opt_sig is not None:
        stored = (opt or {}).get("tensors", {})
        layouts: dict[str, int] = {}
        layout_rows: list[list[Any]] = []
        state_rows: list[list[Any]] = []
        opt_tensors: list[list[int]] = []
        for st in opt_sig.get("state", []):
            param = st["param"]
            ref = index.get(param, param)
            pshape = rows[ref][1] if isinstance(ref, int) else None
            entries = []
            for e in st["entries"]:
                shape = e["shape"]
                entries.append([e["key"], 0 if shape is not None and shape == pshape else shape, dt(e["dtype"])])
                if shape is not None:
                    key = state_key(param, e["key"])
                    if key not in stored:
                        raise _NotCompact("optimizer state the signature names but nothing stores")
                    opt_tensors.append(place(stored[key], shape, e["dtype"]))
            text = json.dumps(entries)
            li = layouts.setdefault(text, len(layout_rows))
            if li == len(layout_rows):
                layout_rows.append(entries)
            state_rows.append([ref, li])
        if len(opt_tensors) != len(stored):
            raise _NotCompact("optimizer tensors the signature does not name")
        out_sig["optimizer"] = {**opt_sig, "groups": [{**g, "params": [index.get(p, p) for p in g["params"]]}
                                                      for g in opt_sig["groups"]],
                                "layouts": layout_rows, "state": state_rows}
        out["optimizer"] = None if opt is None else {**opt, "tensors": opt_tensors}
    elif opt is not None:
        if opt.get("tensors"):
            raise _NotCompact("optimizer tensors without an optimizer signature")
        out["optimizer"] = {**opt, "tensors": []}
    else:
        out["optimizer"] = None
    out["dtypes"] = list(dtypes)
    out["signature"] = out_sig
    out["tensors"] = tensors
    return out


def long_form(raw: dict[str, Any]) -> dict[str, Any]:
    """The long form of a manifest's JSON (a compact one is parsed, checked and written out long; a long one is
    returned as it is): what a tool or a test may read and edit. CheckpointError when the compact form is bad."""
    if "dtypes" not in raw:
        return raw
    m = parse(json.dumps(raw).encode(), "<manifest>")
    out = dict(m.raw)
    out["signature"] = m.signature.to_dict()
    def located(key: str, loc: TensorLocation | None, shape: Any, dtype: Any) -> dict[str, Any]:
        sums = m.piece_checksums
        if loc is not None:
            return {**loc.to_dict(), **({"checksum": sums[key]} if key in sums else {})}
        return {"dtype": dtype, "shape": list(shape), "chunks": [
            {**c.to_dict(), **({"checksum": sums[k]} if (k := chunk_key(key, c.offsets)) in sums else {})}
            for c in m.chunks[key]]}

    out["tensors"] = {t.name: located(t.name, m.tensors.get(t.name), t.shape, t.dtype) for t in m.signature.tensors}
    opt_tensors = {}
    for st in m.signature.optimizer.state if m.signature.optimizer else ():
        for e in st.entries:
            key = state_key(st.param, e.key)
            if e.shape is not None:
                opt_tensors[key] = located(key, m.optimizer_tensors.get(key), e.shape, e.dtype)
    if out.get("optimizer", raw.get("optimizer")) is not None or opt_tensors:
        out["optimizer"] = {"tensors": opt_tensors, "scalars": m.optimizer_scalars}
    else:
        out["optimizer"] = None
    return out


def _fast_shape(value: Any, where: Callable[[], str]) -> tuple[int, ...]:
    """``_shape``, with the common case checked without building a message."""
    if type(value) is list and len(value) <= MAX_DIMS and all(type(d) is int and 0 <= d <= MAX_COUNT for d in value):
        shape = tuple(value)
        if math.prod(shape) <= MAX_COUNT:
            return shape
    return _shape(value, where())


def _w(fmt: str, *args: Any) -> Callable[[], str]:
    """A message made only when it is needed (a callable in ``args`` is called first)."""
    return lambda: fmt.format(*(a() if callable(a) else a for a in args))


def _index(value: Any, size: int, where: Callable[[], str]) -> int:
    if type(value) is int and 0 <= value < size:
        return value
    if size == 0:
        raise _Bad(f"{where()} is {str(value)[:40]}, but the table it indexes is empty")
    return _int(value, where(), high=size - 1)


class _Compact:
    """Builds a Manifest straight from the compact form, every index and type checked once (raises _Bad)."""

    def __init__(self, raw: dict[str, Any], files: dict[str, FileEntry], max_entries: int) -> None:
        self.raw, self.max_entries = raw, max_entries
        self.sums: dict[str, str] = {}
        self.dtypes = [_dtype(d, f"dtypes[{i}]") for i, d in enumerate(_list(_get(raw, "dtypes", "the manifest"),
                                                                            "'dtypes'"))]
        self.files = list(files.values())
        self.sizes = [dtype_size(d) for d in self.dtypes]

    def dtype(self, value: Any, where: Callable[[], str]) -> int:
        return _index(value, len(self.dtypes), where)

    def tensors(self, rows: Any) -> tuple[TensorSpec, ...]:
        specs = []
        for i, row in enumerate(_list(rows, "signature 'tensors'")):
            if type(row) is not list or not 3 <= len(row) <= 5:
                raise _Bad(f"signature tensor {i} is {_kind(row)}, not a list of 3 to 5 fields")
            name = row[0]
            if type(name) is not str:
                _str(name, f"signature tensor {i} name")
            shape = _fast_shape(row[1], _w("signature tensor {} shape", i))
            dtype = self.dtypes[self.dtype(row[2], _w("signature tensor {} dtype", i))]
            kind = _str(row[3], f"signature tensor {i} kind") if len(row) > 3 else PARAMETER
            aliases = _strs(row[4], f"signature tensor {i} aliases") if len(row) > 4 else ()
            specs.append(TensorSpec(name=name, shape=shape, dtype=dtype, kind=kind, aliases=aliases))
            if len(specs) > self.max_entries:
                raise _Bad(f"its signature holds more than {self.max_entries} tensors")
        return tuple(specs)

    def locate(self, key: str, value: Any, shape: tuple[int, ...], dti: int, where: Callable[[], str],
               whole: dict[str, TensorLocation], chunks: dict[str, tuple[Chunk, ...]]) -> None:
        """A location: [file, offset], or a list of chunks [file, offset, global offsets, sizes]."""
        if type(value) is list and value and type(value[0]) is list:
            items = []
            for i, row in enumerate(value):
                if type(row) is not list or len(row) not in (4, 5):
                    raise _Bad(f"{where()} chunk {i} is {_kind(row)}, not a list of 4 or 5 fields (file, offset, "
                               "offsets, sizes, checksum)")
                entry = self.files[_index(row[0], len(self.files), _w("{} chunk {} file", where, i))]
                items.append((entry, row[1], row[2], row[3]))
            chunks[key] = made = make_chunks(key, shape, self.dtypes[dti], items)
            for row, c in zip(value, made, strict=True):
                if len(row) == 5:
                    self.sums[chunk_key(key, c.offsets)] = _piece_sum(row[4], f"{where()} chunk")
        else:
            if type(value) is list and len(value) == 3:
                self.sums[key] = _piece_sum(value[2], where())
                value = value[:2]
            whole[key] = self.place(value, shape, dti, where)

    def place(self, value: Any, shape: tuple[int, ...], dti: int, where: Callable[[], str]) -> TensorLocation:
        if type(value) is not list or len(value) != 2:
            raise _Bad(f"{where()} is {_kind(value)}, not a list of 2 fields (file, offset)")
        entry = self.files[_index(value[0], len(self.files), _w("{} file", where))]
        offset = value[1]
        if type(offset) is not int or not 0 <= offset <= MAX_COUNT:
            _int(offset, f"{where()} offset")
        nbytes = math.prod(shape) * self.sizes[dti]
        if offset + nbytes > entry.size:
            raise _Bad(f"{where()} lies outside {entry.path} ({entry.size} bytes)")
        return TensorLocation(file=entry.path, offset=offset, nbytes=nbytes, dtype=self.dtypes[dti], shape=shape)

    def optimizer(self, d: Any, specs: tuple[TensorSpec, ...], stored: list[Any],  # noqa: C901 - one per field
                  chunks: dict[str, tuple[Chunk, ...]]) -> tuple[OptimizerSpec, dict[str, TensorLocation]]:
        d = _obj(d, "signature 'optimizer'")
        names = [s.name for s in specs]
        cls = _str(_get(d, "cls", "signature 'optimizer'"), "optimizer 'cls'")

        def ref(value: Any, where: Callable[[], str]) -> str:
            return value if type(value) is str else names[_index(value, len(names), where)]

        groups = []
        for gi, g in enumerate(_list(_get(d, "groups", "signature 'optimizer'"), "optimizer 'groups'")):
            g = _obj(g, f"optimizer group {gi}")
            params = _list(_get(g, "params", f"optimizer group {gi}"), f"optimizer group {gi} 'params'")
            hyper = _obj(g.get("hyperparams", {}), f"optimizer group {gi} 'hyperparams'")
            groups.append(ParamGroupSpec(params=tuple(ref(p, _w("optimizer group {} param {}", gi, j))
                                                      for j, p in enumerate(params)),
                                         hyperparams=tuple(sorted(hyper.items()))))
        layouts = []
        for li, lay in enumerate(_list(d.get("layouts", []), "optimizer 'layouts'")):
            entries = []
            for j, e in enumerate(_list(lay, f"optimizer layout {li}")):
                where = f"optimizer layout {li} entry {j}"
                e = _list(e, where)
                if len(e) != 3:
                    raise _Bad(f"{where} has {len(e)} fields, not 3 (key, shape, dtype)")
                shape = e[1]
                if not (shape is None or (shape == 0 and type(shape) is int)):
                    shape = _shape(shape, f"{where} shape")
                dti = None if e[2] is None else self.dtype(e[2], _w("{} dtype", where))
                if shape is not None and dti is None:
                    raise _Bad(f"{where} is a tensor without a dtype")
                entries.append((_str(e[0], f"{where} key"), shape, dti))
            layouts.append(entries)
        state = []
        placed: dict[str, TensorLocation] = {}
        made: dict[tuple[int, tuple[int, ...] | None], tuple[StateEntry, ...]] = {}
        produced = len(specs)
        it = iter(stored)
        for si, row in enumerate(_list(d.get("state", []), "optimizer 'state'")):
            if type(row) is not list or len(row) != 2:
                raise _Bad(f"optimizer state {si} is {_kind(row)}, not a list of 2 fields (param, layout)")
            if type(row[0]) is str:
                param, pshape = row[0], None
            else:
                spec = specs[_index(row[0], len(specs), _w("optimizer state {} param", si))]
                param, pshape = spec.name, spec.shape
            li = _index(row[1], len(layouts), _w("optimizer state {} layout", si))
            layout = layouts[li]
            produced += len(layout) + 1
            if produced > self.max_entries:
                raise _Bad(f"its optimizer state expands to more than {self.max_entries} entries")
            entries_t = made.get((li, pshape))
            if entries_t is None:
                if pshape is None and any(shape == 0 for _, shape, _ in layout):
                    raise _Bad(f"optimizer state {si} takes its parameter's shape, but names no signature tensor")
                entries_t = made[(li, pshape)] = tuple(
                    StateEntry(key=key, shape=pshape if shape == 0 else (None if shape is None else tuple(shape)),
                               dtype=None if dti is None else self.dtypes[dti]) for key, shape, dti in layout)
            for (_, _, dti), e in zip(layout, entries_t, strict=True):
                if e.shape is None:
                    continue
                value = next(it, None)
                if value is None:
                    raise _Bad("optimizer 'tensors' has fewer locations than the state has tensors")
                key = state_key(param, e.key)
                assert dti is not None
                self.locate(key, value, e.shape, dti, _w("optimizer state '{}'", key), placed, chunks)
            state.append(ParamState(param=param, entries=entries_t))
        if next(it, None) is not None:
            raise _Bad("optimizer 'tensors' has more locations than the state has tensors")
        for key in ("inferred", "unmapped"):
            _opt(d.get(key), _str, f"optimizer {key!r}")
        return OptimizerSpec(cls=cls, groups=tuple(groups), state=tuple(state), inferred=d.get("inferred"),
                             unmapped=d.get("unmapped"), positional=bool(d.get("positional", False))), placed


def _no_overlap(locs: dict[str, TensorLocation], what: str) -> None:
    spans = sorted((loc.file, loc.offset, loc.offset + loc.nbytes, name) for name, loc in locs.items() if loc.nbytes)
    for (f1, _b1, e1, n1), (f2, b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if f1 == f2 and b2 < e1:
            raise _Bad(f"{what} '{n1}' and '{n2}' overlap in {f1}")


def _build_compact(raw: dict[str, Any], uri: str, max_entries: int) -> Manifest:
    files = _files(_get(raw, "files", "the manifest"))
    c = _Compact(raw, files, max_entries)
    sig_raw = _obj(_get(raw, "signature", "the manifest"), "'signature'")
    _check_signature_rest(sig_raw)
    _check_plain(raw)
    specs = c.tensors(_get(sig_raw, "tensors", "'signature'"))
    step = _int(_get(raw, "step", "the manifest"), "'step'")
    rows = _list(_get(raw, "tensors", "the manifest"), "'tensors'")
    if len(rows) != len(specs):
        raise _Bad(f"'tensors' has {len(rows)} locations for {len(specs)} signature tensors")
    tensors: dict[str, TensorLocation] = {}
    chunks: dict[str, tuple[Chunk, ...]] = {}
    dti = {d: i for i, d in enumerate(c.dtypes)}
    for spec, value in zip(specs, rows, strict=True):
        c.locate(spec.name, value, spec.shape, dti[spec.dtype], _w("tensor '{}'", spec.name), tensors, chunks)
    opt = _opt(raw.pop("optimizer", None), _obj, "'optimizer'") or {}
    stored = _list(opt.get("tensors", []), "optimizer 'tensors'")
    optimizer: OptimizerSpec | None = None
    opt_tensors: dict[str, TensorLocation] = {}
    if sig_raw.get("optimizer") is not None:
        optimizer, opt_tensors = c.optimizer(sig_raw["optimizer"], specs, stored, chunks)
        if optimizer.positional:
            raise _Bad("its optimizer signature claims position-keyed state; a resumer checkpoint keys it by name")
    elif stored:
        raise _Bad("optimizer 'tensors' holds locations but the signature has no optimizer")
    _no_overlap({**tensors, **opt_tensors, **{chunk_key(k, ch.offsets): ch.loc for k, cs in chunks.items()
                                                for ch in cs}}, "tensor")
    sched = sig_raw.get("scheduler")
    sig = Signature(tensors=specs, optimizer=optimizer,
                    scheduler=None if sched is None else SchedulerSpec.from_dict(sched),
                    step=sig_raw.get("step"), rng=tuple(sig_raw.get("rng", ())), world_size=sig_raw.get("world_size"),
                    notes=tuple(sig_raw.get("notes", ())),
                    rng_ranks=len((raw.get("world") or {}).get("rng_per_rank") or ()) or None)
    for key in ("signature", "tensors", "dtypes"):
        raw.pop(key)
    return Manifest(
        uri=uri, step=step, time=raw.get("time") or "", signature=sig, files=tuple(files.values()), tensors=tensors,
        chunks=chunks, piece_checksums=c.sums, optimizer_tensors=opt_tensors,
        optimizer_scalars=dict(opt.get("scalars", {})),
        scheduler_state=(raw.get("scheduler") or {}).get("state"), rng=raw.get("rng"),
        code=dict(raw.get("code") or {}), extra=dict(raw.get("extra") or {}), raw=raw)
