"""The checkpoint manifest (format v1): the commit marker, written last, validated strictly on read.

A checkpoint is a directory::

    step-0000001200/
      model.<token>.safetensors        model tensors by canonical name
      optimizer.<token>.safetensors    optimizer tensor state, keys "<param name>/<state key>" (by NAME)
      manifest.json                    everything else; its presence commits the checkpoint
      quarantine.json                  (only if a reader found it corrupt: the reason; nothing is deleted)

``<token>`` is unique per save attempt, so two writers racing on one step never mix their bytes: each
manifest names its own files, and the last manifest written wins whole.

Pure: parses bytes into a ``Manifest``; storage lives in ``resumer.store``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from resumer.errors import CheckpointError
from resumer.safetensors_io import TensorLocation
from resumer.signature import Signature, dtype_size, known_dtype

FORMAT = "resumer-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.json"
MODEL_KIND = "model"
OPTIMIZER_KIND = "optimizer"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
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
    """A parsed, validated manifest. ``raw`` is the JSON object it came from."""

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


def _locations(raw: Any, files: dict[str, FileEntry], what: str) -> dict[str, TensorLocation]:
    if not isinstance(raw, dict):
        raise ValueError(f"'{what}' is not an object")
    out = {}
    for name, d in raw.items():
        loc = TensorLocation(file=str(d["file"]), offset=int(d["offset"]), nbytes=int(d["nbytes"]),
                             dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"]))
        entry = files.get(loc.file)
        if entry is None:
            raise ValueError(f"{what} '{name}' lies in {loc.file!r}, which the manifest does not list")
        numel = 1
        for x in loc.shape:
            numel *= x
        if not known_dtype(loc.dtype) or loc.nbytes != numel * dtype_size(loc.dtype):
            raise ValueError(f"{what} '{name}': {loc.nbytes} bytes do not hold {loc.dtype}{list(loc.shape)}")
        if loc.offset < 0 or loc.offset + loc.nbytes > entry.size:
            raise ValueError(f"{what} '{name}' lies outside {loc.file} ({entry.size} bytes)")
        out[str(name)] = loc
    spans = sorted((loc.file, loc.offset, loc.offset + loc.nbytes, name) for name, loc in out.items() if loc.nbytes)
    for (f1, _b1, e1, n1), (f2, b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if f1 == f2 and b2 < e1:
            raise ValueError(f"{what} '{n1}' and '{n2}' overlap in {f1}")
    return out


def parse(data: bytes, uri: str) -> Manifest:
    """Validate and parse manifest bytes; any problem is a CheckpointError that names it."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{uri}/{MANIFEST} is malformed: {why}. The checkpoint is not used; nothing was "
                               "loaded or deleted.", uri=uri)

    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"{len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    version = raw.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(f"format version {version!r}; this resumer reads up to {FORMAT_VERSION} (upgrade resumer)")
    try:
        files = {}
        for f in raw["files"]:
            entry = FileEntry(path=f["path"], size=int(f["size"]), checksum=str(f["checksum"]))
            if not safe_file_name(entry.path):
                raise ValueError(f"file name {entry.path!r} is not a plain name inside the checkpoint "
                                 "(path traversal refused)")
            if entry.size < 0:
                raise ValueError(f"file {entry.path!r} has a negative size")
            files[entry.path] = entry
        sig = Signature.from_dict(raw["signature"])
        step = int(raw["step"])
        opt = raw.get("optimizer") or {}
        manifest = Manifest(
            uri=uri, step=step, time=str(raw.get("time", "")), signature=sig, files=tuple(files.values()),
            tensors=_locations(raw["tensors"], files, "tensor"),
            optimizer_tensors=_locations(opt.get("tensors", {}), files, "optimizer state"),
            optimizer_scalars=dict(opt.get("scalars", {})),
            scheduler_state=(raw.get("scheduler") or {}).get("state"),
            rng=raw.get("rng"), code=dict(raw.get("code") or {}), extra=dict(raw.get("extra") or {}), raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise bad(str(exc) if isinstance(exc, ValueError) else f"missing or wrong field ({exc!r})") from None
    missing = [t.name for t in sig.tensors if t.name not in manifest.tensors]
    if missing:
        raise bad(f"signature names {len(missing)} tensor(s) with no stored bytes, e.g. {missing[0]!r}")
    if step < 0:
        raise bad(f"negative step {step}")
    return manifest


def dumps(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw, indent=1, sort_keys=False, allow_nan=False).encode()
