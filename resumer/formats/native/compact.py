"""The compact form of a manifest (format v2): writing it (``compact``) and reading it (``_build_compact``).

The long form (v1, and what the code builds) names every tensor's file, offset, length, dtype and shape, and every
optimizer state entry's key, shape and dtype, in objects with their keys spelled out: about 420 bytes per tensor.
The compact form says each thing once:
  "dtypes":    the dtype names, referred to by index;
  signature "tensors": rows [name, shape, dtype index] (+ kind when not "parameter", + aliases);
  optimizer "groups" params, and "state" params: an index into those rows (a name when the parameter is none);
  optimizer "layouts": the distinct lists of state entries [key, shape, dtype index], where shape 0 means "the
    parameter's shape" and null "not a tensor"; each "state" row is [param, layout index];
  "tensors": [file index, offset] per signature row, in order (length, dtype and shape are the row's);
  optimizer "tensors": [file index, offset] per tensor state entry, in state order.
Reading builds the typed Manifest from it directly, every index and type checked once. Writing it out long again
is ``resumer.formats.native.manifest.long_form``, beside the ``parse`` it reads through.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

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
)
from resumer.formats.native.chunks import make_chunks
from resumer.formats.native.entries import Chunk, FileEntry, Manifest, chunk_key, state_key
from resumer.formats.native.fields import (
    MAX_COUNT,
    _Bad,
    _dtype,
    _fast_shape,
    _get,
    _int,
    _kind,
    _list,
    _obj,
    _opt,
    _piece_sum,
    _shape,
    _str,
    _strs,
    _w,
)
from resumer.formats.native.safetensors_io import TensorLocation
from resumer.formats.native.sections import _check_plain, _check_signature_rest, _files, _no_overlap

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
