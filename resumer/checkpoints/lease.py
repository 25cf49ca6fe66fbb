"""Reader leases: "I am reading this checkpoint until T", so retention never deletes it under a reader.

A reader holds a lease while it reads a checkpoint::

    with lease.hold("s3://runs/a/step-0000001200"):
        resumer.resume("s3://runs/a/step-0000001200", model, optimizer)

The lease is a small JSON file ``ROOT/.leases/<step-dir>.<uuid>.json`` holding ``holder``
(``hostname:pid``), ``checkpoint``, ``created`` and ``expires`` (UTC ISO 8601). A daemon thread
renews it every ``ttl_s / 3`` while it is held; leaving the block removes it. A reader that dies
stops renewing, so its lease simply expires: ``active_leases`` ignores expired leases (never trusts
them), and ``sweep_expired`` removes long-expired files.

Take the lease BEFORE reading the manifest. Retention un-commits a checkpoint (removes its manifest)
and only then takes its final look at the leases, so a reader either is seen there or finds no
manifest; it never reads a checkpoint while its data files go away.

Expiry compares the holder's clock (``expires``) with the reader of the lease's clock: keep clocks
within a small fraction of ``ttl_s`` (NTP does far better than the default 600 s).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from resumer.core.errors import CheckpointError, TransientStorageError, UsageError
from resumer.formats.native.manifest import MANIFEST, STEP_DIR
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

LEASES = ".leases"
DEFAULT_TTL_S = 600.0
_LEASE_FILE = re.compile(r"^(step-\d{1,19})\.([0-9a-f]{32})\.json$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """One reader's claim on one checkpoint, as stored in its lease file."""

    step_dir: str
    holder: str
    checkpoint: str
    created: str
    expires: str
    uri: str = ""  # of the lease file itself

    @property
    def expires_at(self) -> dt.datetime:
        return _parse_time(self.expires)

    def active(self, now: dt.datetime | None = None) -> bool:
        return self.expires_at > (now or utcnow())

    def describe(self) -> str:
        return f"leased by {self.holder} until {self.expires}"

    def to_dict(self) -> dict[str, Any]:
        return {"holder": self.holder, "checkpoint": self.checkpoint, "expires": self.expires,
                "created": self.created}


class Held:
    """What ``hold`` yields: the lease as last written, and the last renewal failure (if any)."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.renewals = 0
        self.error: BaseException | None = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def split_checkpoint(checkpoint_uri: str) -> tuple[str, str]:
    """(root, step-dir) of a checkpoint URI; anything else is a UsageError."""
    uri = str(checkpoint_uri).rstrip("/")
    if uri.endswith(f"/{MANIFEST}"):
        uri = uri[: -len(MANIFEST) - 1]
    root, _, name = uri.rpartition("/")
    if not root or not STEP_DIR.match(name):
        raise _not_a_checkpoint(checkpoint_uri)
    return root, name


def _not_a_checkpoint(uri: str) -> UsageError:
    return UsageError(f"Cannot lease {uri}: a lease names one checkpoint directory (ROOT/step-NNNNNNNNNN), not a "
                      "root or a file. Lease the checkpoint you are about to read.")


def _locate(checkpoint: str | Store, storage_options: dict[str, Any] | None) -> tuple[Store, str]:
    """(root store, step-dir name) of the checkpoint to lease; anything but a checkpoint directory is a UsageError."""
    if not isinstance(checkpoint, Store):
        root, name = split_checkpoint(checkpoint)
        return Store.open(root, storage_options), name
    store = Store.of(checkpoint, storage_options)
    if not STEP_DIR.match(store.name):
        raise _not_a_checkpoint(store.uri)
    return store.parent(), store.name


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def hold(checkpoint_uri: str | Store, storage_options: dict[str, Any] | None = None, *,
         ttl_s: float = DEFAULT_TTL_S, holder: str | None = None) -> Iterator[Held]:
    """Hold a lease on ``checkpoint_uri`` for the duration of the block, renewed every ``ttl_s / 3``.

    Args:
        checkpoint_uri: the checkpoint directory (``ROOT/step-N``) about to be read, or its Store.
        storage_options: fsspec options for the root (with a URI).
        ttl_s: how long the lease lasts without renewal (how long a dead reader blocks retention).
        holder: who holds it, for humans; ``hostname:pid`` by default.

    Yields:
        a ``Held`` whose ``lease`` is the lease as last written.

    Raises:
        UsageError: ``checkpoint_uri`` is not a checkpoint directory, or ``ttl_s`` is not positive.
        TransientStorageError: the lease could not be written (the block does not run: reading
            without a lease would be unsafe).
    """
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise UsageError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}.")
    root, name = _locate(checkpoint_uri, storage_options)
    leases = root.child(LEASES)
    file = f"{name}.{uuid.uuid4().hex}.json"
    created = utcnow()
    held = Held(Lease(step_dir=name, holder=holder or default_holder(), checkpoint=root.uri_of(name),
                      created=_iso(created), expires=_iso(created + dt.timedelta(seconds=ttl_s)),
                      uri=leases.uri_of(file)))
    leases.makedirs()
    leases.write_atomic(file, data=json.dumps(held.lease.to_dict()).encode())
    logger.debug("[lease] took %s: %s", held.lease.uri, held.lease.describe())
    stop = threading.Event()
    thread = threading.Thread(target=_renew_loop, args=(leases, file, held, ttl_s, stop), daemon=True,
                              name=f"resumer-lease-{name}")
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join()  # a renewal in flight must land before the removal, or it would re-create the file
        try:
            leases.rm(file)
            logger.debug("[lease] released %s", held.lease.uri)
        except FileNotFoundError:
            pass
        except (OSError, TransientStorageError) as exc:
            logger.warning("[lease] could not remove %s (it expires at %s): %s", held.lease.uri,
                           held.lease.expires, exc)


@contextlib.contextmanager
def reading(checkpoint_uri: str | Store, storage_options: dict[str, Any] | None = None, *,
            ttl_s: float = DEFAULT_TTL_S) -> Iterator[Held | None]:
    """Lease a checkpoint whose manifest was already read, for the rest of the read (``resume`` uses it).

    A resume from a root reads manifests while it selects, before it knows which checkpoint to lease.
    So: lease, THEN check the manifest is still there. A prune that un-committed it before the lease
    is caught by the check (CheckpointError: nothing was loaded, resume again); a prune that un-commits
    it after the lease sees the lease and puts the manifest back. Best effort: a directory not named
    ``step-N`` is not managed by retention and is not leased, and when the lease cannot be written
    (read-only credentials) the read goes on with a warning.

    Yields:
        the ``Held`` lease, or None when none is held.
    """
    uri = checkpoint_uri.uri if isinstance(checkpoint_uri, Store) else str(checkpoint_uri)
    root, name = uri.rstrip("/").rpartition("/")[::2]
    if not root or not STEP_DIR.match(name):
        yield None
        return
    checkpoint = Store.of(checkpoint_uri, storage_options)
    with contextlib.ExitStack() as stack:
        try:
            held: Held | None = stack.enter_context(hold(checkpoint, ttl_s=ttl_s))
        except (OSError, TransientStorageError) as exc:
            logger.warning("[lease] reading %s without a lease (%s): a concurrent prune could remove it", uri, exc)
            held = None
        if held is not None and not checkpoint.exists(MANIFEST):
            raise CheckpointError(f"{uri} was removed by retention while it was being opened. "
                                  "Nothing was loaded; resume again to pick the newest valid checkpoint.", uri=uri)
        yield held


def _renew_loop(leases: Store, file: str, held: Held, ttl_s: float, stop: threading.Event) -> None:
    while not stop.wait(ttl_s / 3):
        lease = replace(held.lease, expires=_iso(utcnow() + dt.timedelta(seconds=ttl_s)))
        try:
            leases.write_atomic(file, data=json.dumps(lease.to_dict()).encode())
        except (OSError, TransientStorageError) as exc:
            held.error = exc
            logger.warning("[lease] could not renew %s (valid until %s): %s", lease.uri, held.lease.expires, exc)
            continue
        held.lease = lease
        held.renewals += 1


def read_leases(root: str | Store, storage_options: dict[str, Any] | None = None) -> list[Lease]:
    """Every readable lease file under ``root``, expired or not (fresh listing, no cache)."""
    leases = Store.of(root, storage_options).child(LEASES)
    leases.invalidate_cache()  # a cached listing would hide a lease taken a moment ago
    try:
        names = leases.ls()
    except FileNotFoundError:
        return []
    out = []
    for full in names:
        file = str(full).rstrip("/").rsplit("/", 1)[-1]
        m = _LEASE_FILE.match(file)
        if not m:
            continue  # temporary files of an atomic write, or foreign files
        lease_uri = leases.uri_of(file)
        try:
            raw = json.loads(leases.read(file))
            lease = Lease(step_dir=m.group(1), holder=str(raw["holder"]), checkpoint=str(raw["checkpoint"]),
                          created=str(raw.get("created", "")), expires=str(raw["expires"]), uri=lease_uri)
            _parse_time(lease.expires)  # a bad time is found here, not later in a comparison
        except FileNotFoundError:
            continue  # released between the listing and the read
        except (ValueError, KeyError, TypeError) as exc:
            # Lease files are written atomically, so a malformed one is no live reader's: ignore it, loudly.
            logger.warning("[lease] ignoring malformed lease %s: %s", lease_uri, exc)
            continue
        out.append(lease)
    return out


def active_leases(root: str | Store, storage_options: dict[str, Any] | None = None,
                  now: dt.datetime | None = None) -> dict[str, list[Lease]]:
    """Step-dir name -> its unexpired leases under ``root``. Expired leases are ignored."""
    now = now or utcnow()
    out: dict[str, list[Lease]] = {}
    for lease in read_leases(root, storage_options):
        if lease.active(now):
            out.setdefault(lease.step_dir, []).append(lease)
    return out


def sweep_expired(root: str | Store, storage_options: dict[str, Any] | None = None, *, now: dt.datetime | None = None,
                  older_than_s: float = 3600.0) -> list[str]:
    """Remove lease files that expired more than ``older_than_s`` ago (crashed readers); returns their URIs.

    The margin keeps a lease whose holder's clock runs behind from being swept while still renewed.
    """
    now = now or utcnow()
    store = Store.of(root, storage_options)
    leases = store.child(LEASES)
    removed = []
    for lease in read_leases(store):
        if lease.expires_at + dt.timedelta(seconds=older_than_s) < now:
            try:
                leases.rm(lease.uri.rsplit("/", 1)[-1])
            except FileNotFoundError:
                continue
            except (OSError, TransientStorageError) as exc:
                logger.warning("[lease] could not remove expired lease %s: %s", lease.uri, exc)
                continue
            removed.append(lease.uri)
    return removed
