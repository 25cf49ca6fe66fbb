"""The checks of a manifest's sections: its data files, its signature, its tensors' byte ranges (the long form's
locations; no two tensors on one byte range), and the free-form sections (container types and nesting depth). The
long form is checked by all of them; the compact form (``resumer.formats.native.compact``) by those it shares.
"""

from __future__ import annotations

import math
import re
from typing import Any

from resumer.core.signature import Signature, dtype_size
from resumer.formats.jsonvalue import MAX_DEPTH, too_deep
from resumer.formats.native.chunks import make_chunks
from resumer.formats.native.entries import Chunk, FileEntry, chunk_key
from resumer.formats.native.fields import (
    _Bad,
    _dtype,
    _get,
    _int,
    _list,
    _obj,
    _opt,
    _piece_sum,
    _shape,
    _str,
    _strs,
)
from resumer.formats.native.safetensors_io import TensorLocation

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def safe_file_name(name: Any) -> bool:
    """A plain file name inside the checkpoint directory: no separators, no '..', not absolute."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


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


def _no_overlap(locs: dict[str, TensorLocation], what: str) -> None:
    spans = sorted((loc.file, loc.offset, loc.offset + loc.nbytes, name) for name, loc in locs.items() if loc.nbytes)
    for (f1, _b1, e1, n1), (f2, b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if f1 == f2 and b2 < e1:
            raise _Bad(f"{what} '{n1}' and '{n2}' overlap in {f1}")
