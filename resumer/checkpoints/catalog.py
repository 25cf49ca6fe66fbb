"""Which checkpoints exist under a root, and which one to resume from.

One listing pass finds every checkpoint directory with its files and sizes. ``latest_checkpoint`` then
walks newest first and reads only the manifests it examines: committed (manifest present), not
quarantined, sizes as listed, checksums (by default), healthy (when asked). A checkpoint that fails
verification is quarantined — a ``quarantine.json`` with the reason is written beside it — and never
deleted; the walk falls back to the next older one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from resumer.core.errors import CheckpointError, TransientStorageError
from resumer.formats.jsonvalue import strict_loads
from resumer.formats.native.entries import Manifest
from resumer.formats.native.manifest import MANIFEST, QUARANTINE, STEP_DIR
from resumer.formats.native.verify import read_manifest, verify
from resumer.storage.fs import basename
from resumer.storage.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A step directory as listed: its files with sizes, whether committed, and a quarantine mark."""

    step: int
    uri: str
    sizes: dict[str, int]

    @property
    def name(self) -> str:
        """The directory's name under the root (``step-0000001200``)."""
        return basename(self.uri)

    @property
    def committed(self) -> bool:
        return MANIFEST in self.sizes

    @property
    def quarantined(self) -> bool:
        return QUARANTINE in self.sizes


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: its URI, step and parsed manifest (``quarantine`` says why it is not used; a
    checkpoint quarantined for an unreadable manifest is listed with ``manifest=None``)."""

    uri: str
    step: int
    manifest: Manifest
    quarantine: str | None = None

    @property
    def time(self) -> str:
        return self.manifest.time if self.manifest is not None else ""

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest is not None else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A checkpoint passed over during selection, and why (for logs and the audit record)."""

    uri: str
    step: int
    reason: str
    manifest_step: int | None = None  # set when the manifest names another step than the directory (a copy)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "step": self.step, "reason": self.reason, "manifest_step": self.manifest_step}


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    chosen: CheckpointInfo | None
    rejected: tuple[Rejected, ...] = field(default=())
    manifests_read: int = 0


def scan(root: str | Store, storage_options: dict[str, Any] | None = None) -> list[Candidate]:
    """Every ``step-N`` directory under ``root``, newest first, from ONE recursive listing."""
    store = Store.of(root, storage_options)
    base = store.path.rstrip("/")
    try:
        found = store.find()
    except FileNotFoundError:
        return []
    by_dir: dict[str, dict[str, int]] = {}
    for full, info in found.items():
        rel = str(full)[len(base):].lstrip("/")
        parts = rel.split("/")
        if len(parts) == 2 and STEP_DIR.match(parts[0]) and info.get("type", "file") != "directory":
            by_dir.setdefault(parts[0], {})[parts[1]] = int(info.get("size") or 0)
    out = [Candidate(step=int(STEP_DIR.match(d).group(1)), uri=store.uri_of(d), sizes=sizes)  # type: ignore[union-attr]
           for d, sizes in by_dir.items()]
    return sorted(out, key=lambda c: c.step, reverse=True)


MAX_QUARANTINE_BYTES = 64 * 1024


def misplaced(uri: str, dir_step: int, manifest_step: int) -> str:
    """Why a step directory whose manifest names another step is not used (a copy or a rename: not corrupt)."""
    return (f"{uri}: its manifest says step {manifest_step}, its directory name says step {dir_step} (copied or "
            "renamed?). It is not used and not marked; move it back to its step's directory name to use it.")


def quarantine_reason(checkpoint: Store) -> str:
    """The reason recorded in a checkpoint's quarantine mark; "unknown" when it cannot be read or makes no sense
    (the mark lies in storage like everything else: read a bounded amount, parse it strictly)."""
    try:
        data = checkpoint.read(QUARANTINE, limit=MAX_QUARANTINE_BYTES)
        record = strict_loads(data, max_cost=64 * MAX_QUARANTINE_BYTES)
    except (FileNotFoundError, ValueError):
        return "unknown"
    reason = record.get("reason") if isinstance(record, dict) else None
    return reason if isinstance(reason, str) else "unknown"


def read_listed_manifest(root: Store, c: Candidate) -> Manifest:
    """The manifest of a listed checkpoint under ``root``, held to its listed size."""
    return read_manifest(root.child(c.name), size=c.sizes[MANIFEST])


def list_checkpoints(root: str | Store, *, storage_options: dict[str, Any] | None = None,
                     include_quarantined: bool = False) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root``, newest first; directories without a valid manifest are skipped.

    Quarantined ones are left out unless ``include_quarantined`` (then ``.quarantine`` holds the reason).
    """
    store = Store.of(root, storage_options)
    candidates = [c for c in scan(store) if c.committed and (include_quarantined or not c.quarantined)]

    def load(c: Candidate) -> CheckpointInfo | None:
        reason = quarantine_reason(store.child(c.name)) if c.quarantined else None
        try:
            m = read_listed_manifest(store, c)
            if m.step != c.step:
                raise CheckpointError(misplaced(c.uri, c.step, m.step), uri=c.uri, quarantine=False)
        except CheckpointError as exc:
            if reason is None:
                logger.warning("[list] skipping %s: %s", c.uri, exc)
                return None
            # Quarantined for its manifest: still listed (with the reason), so people can find it.
            return CheckpointInfo(uri=c.uri, step=c.step, manifest=None, quarantine=reason)  # type: ignore[arg-type]
        return CheckpointInfo(uri=c.uri, step=m.step, manifest=m, quarantine=reason)

    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = list(pool.map(load, candidates))
    return [i for i in infos if i is not None]


def health_problem(manifest: Manifest) -> str | None:
    """Why a checkpoint is unhealthy (non-finite tensors or loss recorded at save time), or None."""
    health = manifest.raw.get("health") or {}
    bad = health.get("nonfinite") or []
    if bad:
        return f"{len(bad)} tensor(s) hold NaN/Inf at save time, e.g. {bad[0]!r}"
    loss = health.get("loss", manifest.extra.get("loss"))
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        return f"the recorded loss is {loss}"
    if isinstance(loss, dict) and loss.get("__resumer__") == "float":
        return f"the recorded loss is {loss.get('v')}"
    return None


def quarantine(checkpoint: str | Store, reason: str, storage_options: dict[str, Any] | None = None) -> None:
    """Mark a checkpoint as bad, with the reason. Never deletes anything; failures to mark are logged."""
    store = Store.of(checkpoint, storage_options)
    record = {"reason": reason, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        store.write_atomic(QUARANTINE, data=json.dumps(record).encode())
        logger.warning("[quarantine] %s: %s", store.uri, reason)
    except (OSError, TransientStorageError) as exc:
        logger.warning("[quarantine] could not mark %s (%s): %s", store.uri, exc, reason)


def select(root: str | Store, *, storage_options: dict[str, Any] | None = None, checksums: bool = True,
           healthy: bool = False, mark: bool = True, progress: Any = None,
           exclude: Mapping[str, str] | None = None) -> Selection:
    """The newest committed, verified (and, if asked, healthy) checkpoint, with everything passed over.

    ``exclude`` maps URIs the caller already found bad to why; they are passed over with that reason.
    """
    store = Store.of(root, storage_options)
    rejected: list[Rejected] = []
    reads = 0
    for c in scan(store):
        if exclude and c.uri in exclude:
            rejected.append(Rejected(uri=c.uri, step=c.step, reason=exclude[c.uri]))
            continue
        if not c.committed:
            rejected.append(Rejected(uri=c.uri, step=c.step, reason="torn: no manifest.json (never committed)"))
            continue
        if c.quarantined:
            rejected.append(Rejected(uri=c.uri, step=c.step, reason="quarantined earlier"))
            continue
        try:
            reads += 1
            m = read_listed_manifest(store, c)
            if m.step != c.step:  # never the newest on the strength of its name alone; a copy is not corrupt
                rejected.append(Rejected(uri=c.uri, step=c.step, reason=misplaced(c.uri, c.step, m.step),
                                         manifest_step=m.step))
                continue
            verify(m, store=store.child(c.name), checksums=checksums, progress=progress, sizes=c.sizes)
        except CheckpointError as exc:
            rejected.append(Rejected(uri=c.uri, step=c.step, reason=str(exc)))
            if mark and exc.quarantine:  # a newer format is fine for a newer resumer: never marked corrupt
                quarantine(store.child(c.name), str(exc))
            continue
        problem = health_problem(m) if healthy else None
        if problem:
            rejected.append(Rejected(uri=c.uri, step=c.step, reason=f"unhealthy: {problem}"))
            continue
        for r in rejected:
            logger.warning("[select] passed over %s: %s", r.uri, r.reason)
        return Selection(chosen=CheckpointInfo(uri=c.uri, step=m.step, manifest=m), rejected=tuple(rejected),
                         manifests_read=reads)
    return Selection(chosen=None, rejected=tuple(rejected), manifests_read=reads)


def latest_checkpoint(root: str | Store, *, storage_options: dict[str, Any] | None = None, checksums: bool = True,
                      healthy: bool = False, progress: Any = None) -> CheckpointInfo | None:
    """The newest checkpoint under ``root`` that is committed AND verifies; falls back past bad ones."""
    return select(root, storage_options=storage_options, checksums=checksums, healthy=healthy,
                  progress=progress).chosen
