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

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from resumer.core.errors import CheckpointError
from resumer.core.signature import Signature, dtype_size, known_dtype
from resumer.formats.jsonvalue import MAX_DEPTH, JSONRefused, strict_loads, too_deep
from resumer.formats.native.safetensors_io import TensorLocation

FORMAT = "resumer-checkpoint"
FORMAT_VERSION = 1
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


def data_file_name(kind: str, token: str) -> str:
    return f"{kind}.{token}.safetensors"


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


def _locations(raw: Any, files: dict[str, FileEntry], what: str) -> dict[str, TensorLocation]:
    out = {}
    for name, d in _obj(raw, f"{what} locations").items():
        where = f"{what} '{name}'"
        d = _obj(d, where)
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
    spans = sorted((loc.file, loc.offset, loc.offset + loc.nbytes, name) for name, loc in out.items() if loc.nbytes)
    for (f1, _b1, e1, n1), (f2, b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if f1 == f2 and b2 < e1:
            raise _Bad(f"{what} '{n1}' and '{n2}' overlap in {f1}")
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
    health = raw.get("health") or {}
    _strs(health.get("nonfinite") or [], "health 'nonfinite'")
    opt = _obj(raw.get("optimizer") or {}, "'optimizer'")
    for param, scalars in _obj(opt.get("scalars", {}), "optimizer 'scalars'").items():
        _obj(scalars, f"optimizer scalars of {param!r}")


def _check_agrees(sig: Signature, tensors: dict[str, TensorLocation]) -> None:
    """Each tensor the signature names has stored bytes of exactly its shape and dtype."""
    missing = [t.name for t in sig.tensors if t.name not in tensors]
    if missing:
        raise _Bad(f"signature names {len(missing)} tensor(s) with no stored bytes, e.g. {missing[0]!r}")
    for t in sig.tensors:
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
    def bad(why: str) -> CheckpointError:
        return malformed(uri, why)

    if len(data) > MAX_MANIFEST_BYTES:
        raise oversized(uri, len(data))
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
    tensors = _locations(_get(raw, "tensors", "the manifest"), files, "tensor")
    del raw["tensors"]
    _check_agrees(sig, tensors)
    opt = raw.pop("optimizer", None) or {}
    return Manifest(
        uri=uri, step=step, time=raw.get("time") or "", signature=sig, files=tuple(files.values()), tensors=tensors,
        optimizer_tensors=_locations(opt.get("tensors", {}), files, "optimizer state"),
        optimizer_scalars=dict(opt.get("scalars", {})), scheduler_state=(raw.get("scheduler") or {}).get("state"),
        rng=raw.get("rng"), code=dict(raw.get("code") or {}), extra=dict(raw.get("extra") or {}), raw=raw)


def dumps(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw, indent=1, sort_keys=False, allow_nan=False).encode()
