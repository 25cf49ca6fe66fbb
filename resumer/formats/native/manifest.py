"""The checkpoint manifest: the commit marker, written last, validated strictly on read.

A checkpoint is a directory::

    step-0000001200/
      model.<token>.safetensors        model tensors by canonical name
      optimizer.<token>.safetensors    optimizer tensor state, keys "<param name>/<state key>" (by NAME)
      manifest.json                    everything else; its presence commits the checkpoint
      quarantine.json                  (only if a reader found it corrupt: the reason; nothing is deleted)

``<token>`` is unique per save attempt, so two writers racing on one step never mix their bytes: each
manifest names its own files, and the last manifest written wins whole.

A save writes ``manifest.json`` in the compact form (format v2: ``resumer.formats.native.compact``); the long form
(format v1: keyed objects, each location with its dtype and shape) is still read, under either version number. This
module holds the format's names and limits, ``parse`` (bytes to a checked ``Manifest``, defined in ``entries``),
``dumps`` and ``long_form``; the checks ``parse`` reads through are in ``fields`` (typed values), ``chunks`` (chunk
tiling) and ``sections`` (each section of the manifest).

Pure: parses bytes into a ``Manifest``; storage lives in ``resumer.storage.store``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterator
from typing import Any

from resumer.core.errors import CheckpointError
from resumer.core.signature import Signature
from resumer.formats.jsonvalue import JSONRefused, strict_loads
from resumer.formats.native.compact import (
    EXPANDED_PER_BYTE,
    MAX_EXPANDED,
    MIN_EXPANDED,
    _build_compact,
    _NotCompact,
    compact,
)
from resumer.formats.native.entries import Chunk, Manifest, chunk_key, state_key
from resumer.formats.native.fields import _Bad, _get, _int
from resumer.formats.native.safetensors_io import TensorLocation
from resumer.formats.native.sections import (
    _check_agrees,
    _check_plain,
    _check_signature,
    _files,
    _locations,
    _no_overlap,
)

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


def data_file_name(kind: str, token: str) -> str:
    return f"{kind}.{token}.safetensors"


def rank_file_name(kind: str, token: str, rank: int) -> str:
    """A rank's own data file in a sharded save."""
    return f"{kind}.{token}.rank{rank}.safetensors"


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
