"""Watch a checkpoint root: report new, invalid, torn and quarantined checkpoints, and stalls in progress.

The watcher only observes and reports; it never writes (no quarantine marks, no deletes), so any number of
watchers may look at one root next to the trainer and ``resumer.latest_checkpoint``.

Each ``Watcher.poll()`` makes ONE listing (``resumer.checkpoints.catalog.scan``) and reads only the manifests of
committed checkpoints it has not judged yet, so a steady poll costs one listing. Every directory is judged
once, when first seen committed: a valid one is ``new``, one that fails verification is ``invalid``. A
directory that stays without a manifest longer than the grace period is reported ``invalid`` (torn) once;
a ``quarantine.json`` is reported ``quarantined`` once. ``stall`` fires once when no new valid checkpoint
has appeared for ``stall_after_s`` (counted from the watcher's start or the last new one), and
``resumed-progress`` when one finally does. A directory that disappears from the listing is forgotten, so a
step deleted and written again is judged again.

``watch()`` is the loop around it for people and scripts; the orchestrator drives ``poll()`` itself.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from resumer.checkpoints.catalog import Candidate, quarantine_reason, read_listed_manifest, scan
from resumer.core.errors import CheckpointError, TransientStorageError, UsageError
from resumer.formats.native.verify import verify
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

DEFAULT_TORN_AFTER_S = 60.0


class EventKind(str, enum.Enum):
    """What a watcher saw. Compares equal to its value: ``event.kind == "new"``."""

    NEW = "new"
    INVALID = "invalid"
    QUARANTINED = "quarantined"
    STALL = "stall"
    RESUMED_PROGRESS = "resumed-progress"


def _secs(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    """One thing a watcher saw. ``uri`` is the checkpoint's (the root's for stall / resumed-progress)."""

    kind: EventKind
    step: int | None
    uri: str
    reason: str
    at: str = field(default_factory=_utc_now)  # wall-clock UTC, ISO 8601

    def describe(self) -> str:
        """One greppable line: ``invalid step=1200 s3://runs/a/step-0000001200: <reason>``."""
        step = "-" if self.step is None else str(self.step)
        return f"{self.kind.value} step={step} {self.uri}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "step": self.step, "uri": self.uri, "reason": self.reason, "at": self.at}


class Watcher:
    """Polls one checkpoint root and reports what changed since the last poll.

    Args:
        root: the checkpoint root URI (local path or any fsspec URI), or its Store.
        storage_options: fsspec options for ``root`` (with a URI).
        stall_after_s: report ``stall`` when no new valid checkpoint appeared for this long (None: never).
        checksums: verify every byte of each new checkpoint (a full read); sizes are always checked.
        torn_after_s: how long a directory may stay without a manifest before it is reported torn. Give
            the writer time to finish: ``watch()`` uses ``max(2 * interval_s, 60)``.
        report_existing: on the first poll, report what is already there; False makes it the baseline
            (only later changes are reported; a directory committed later is still reported).
        clock: monotonic seconds; tests pass a fake.
    """

    def __init__(self, root: str | Store, *, storage_options: dict[str, Any] | None = None,
                 stall_after_s: float | None = None, checksums: bool = False,
                 torn_after_s: float = DEFAULT_TORN_AFTER_S, report_existing: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stall_after_s is not None and not stall_after_s > 0:
            raise UsageError(f"stall_after_s must be a positive number of seconds, got {stall_after_s!r}.")
        if not torn_after_s >= 0:
            raise UsageError(f"torn_after_s must be a non-negative number of seconds, got {torn_after_s!r}.")
        self.store = Store.of(root, storage_options)
        self.root = self.store.uri
        self.storage_options = self.store.options
        self.stall_after_s = stall_after_s
        self.checksums = checksums
        self.torn_after_s = torn_after_s
        self.report_existing = report_existing
        self._clock = clock
        self._primed = False
        self._judged: set[str] = set()  # committed directories already reported new / invalid (or baseline)
        self._quarantine_seen: set[str] = set()
        self._uncommitted_since: dict[str, float] = {}
        self._torn_seen: set[str] = set()
        self._last_progress = clock()
        self._stalled = False
        self.latest_valid: WatchEvent | None = None  # the "new" event of the newest valid checkpoint seen
        self.newest_committed: Candidate | None = None  # from the last listing

    def poll(self) -> list[WatchEvent]:
        """One listing; the events since the last poll, oldest checkpoint first.

        Raises:
            TransientStorageError: the listing failed after retries (nothing changed; poll again later).
                A transient failure reading one checkpoint is only logged: it is looked at again next poll.
        """
        candidates = scan(self.store)
        now = self._clock()
        self._forget_missing({c.uri for c in candidates})
        self.newest_committed = next((c for c in candidates if c.committed), None)
        events: list[WatchEvent] = []
        if self._primed or self.report_existing:
            for c in reversed(candidates):  # oldest first: events in the order the checkpoints were made
                events.extend(self._observe(c, now))
        else:
            self._baseline(candidates, now)
        self._primed = True
        events.extend(self._progress(events, now))
        for e in events:
            logger.info("[watch] %s", e.describe())
        return events

    def _forget_missing(self, listed: set[str]) -> None:
        self._judged &= listed
        self._quarantine_seen &= listed
        self._torn_seen &= listed
        self._uncommitted_since = {u: t for u, t in self._uncommitted_since.items() if u in listed}

    def _baseline(self, candidates: list[Candidate], now: float) -> None:
        for c in candidates:
            if c.committed:
                self._judged.add(c.uri)
            else:
                self._uncommitted_since[c.uri] = now
                self._torn_seen.add(c.uri)
            if c.quarantined:
                self._quarantine_seen.add(c.uri)

    def _observe(self, c: Candidate, now: float) -> list[WatchEvent]:
        try:
            if c.quarantined:
                return self._quarantined(c)
            if c.committed:
                return self._judge(c)
            return self._torn(c, now)
        except TransientStorageError as exc:
            logger.warning("[watch] %s: %s; looking again next poll", c.uri, exc)
        except FileNotFoundError:
            # deleted between the listing and the read (retention): the next listing will not show it
            logger.info("[watch] %s disappeared while being read", c.uri)
        return []

    def _quarantined(self, c: Candidate) -> list[WatchEvent]:
        # a quarantined directory is known bad: report the mark, never verify it
        self._judged.add(c.uri)
        self._uncommitted_since.pop(c.uri, None)
        if c.uri in self._quarantine_seen:
            return []
        reason = quarantine_reason(self.store.child(c.name))
        self._quarantine_seen.add(c.uri)
        return [WatchEvent(kind=EventKind.QUARANTINED, step=c.step, uri=c.uri, reason=reason)]

    def _judge(self, c: Candidate) -> list[WatchEvent]:
        self._uncommitted_since.pop(c.uri, None)
        if c.uri in self._judged:
            return []
        try:
            m = read_listed_manifest(self.store, c)
            verify(m, store=self.store.child(c.name), checksums=self.checksums, sizes=c.sizes)
        except CheckpointError as exc:
            self._judged.add(c.uri)
            return [WatchEvent(kind=EventKind.INVALID, step=c.step, uri=c.uri, reason=str(exc))]
        self._judged.add(c.uri)
        how = "checksums" if self.checksums else "sizes"
        event = WatchEvent(kind=EventKind.NEW, step=c.step, uri=c.uri,
                           reason=f"committed at {m.time}, {m.total_bytes} bytes, verified ({how})")
        if self.latest_valid is None or (self.latest_valid.step or 0) <= c.step:
            self.latest_valid = event
        return [event]

    def _torn(self, c: Candidate, now: float) -> list[WatchEvent]:
        since = self._uncommitted_since.setdefault(c.uri, now)
        age = now - since
        if c.uri in self._torn_seen or age <= self.torn_after_s:
            return []
        self._torn_seen.add(c.uri)
        return [WatchEvent(kind=EventKind.INVALID, step=c.step, uri=c.uri,
                           reason=f"torn: no manifest after {_secs(age)} s (the writer stopped before committing, "
                                  "or is very slow); it is not used and nothing was deleted")]

    def _progress(self, events: list[WatchEvent], now: float) -> list[WatchEvent]:
        new = [e for e in events if e.kind is EventKind.NEW]
        idle = now - self._last_progress
        if new:
            self._last_progress = now
            if self._stalled:
                self._stalled = False
                return [WatchEvent(kind=EventKind.RESUMED_PROGRESS, step=new[-1].step, uri=self.root,
                                   reason=f"new checkpoint step {new[-1].step} after {_secs(idle)} s without one")]
            return []
        if self.stall_after_s is None or self._stalled or idle <= self.stall_after_s:
            return []
        self._stalled = True
        last = f"step {self.latest_valid.step}" if self.latest_valid else "none seen"
        return [WatchEvent(kind=EventKind.STALL, step=self.latest_valid.step if self.latest_valid else None,
                           uri=self.root, reason=f"no new valid checkpoint for {_secs(idle)} s (stall after "
                                                 f"{self.stall_after_s:g} s); newest valid: {last}")]


def watch(root: str | Store, *, interval_s: float = 5.0, timeout_s: float | None = None, max_polls: int | None = None,
          storage_options: dict[str, Any] | None = None, stall_after_s: float | None = None,
          checksums: bool = False, torn_after_s: float | None = None, report_existing: bool = True,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[WatchEvent]:
    """Poll ``root`` every ``interval_s`` and yield events, until ``timeout_s`` or ``max_polls`` (or forever).

    A poll whose listing fails transiently is logged and counts as a poll; the loop goes on. The last poll
    happens at the timeout, not before it. ``torn_after_s`` defaults to ``max(2 * interval_s, 60)``.
    """
    if not interval_s > 0:
        raise UsageError(f"interval_s must be a positive number of seconds, got {interval_s!r}.")
    if max_polls is not None and max_polls < 1:
        raise UsageError(f"max_polls must be at least 1, got {max_polls!r}.")
    torn = max(2 * interval_s, DEFAULT_TORN_AFTER_S) if torn_after_s is None else torn_after_s
    watcher = Watcher(root, storage_options=storage_options, stall_after_s=stall_after_s, checksums=checksums,
                      torn_after_s=torn, report_existing=report_existing, clock=clock)
    started = clock()
    polls = 0
    while True:
        try:
            yield from watcher.poll()
        except TransientStorageError as exc:
            logger.warning("[watch] listing %s failed: %s; polling again in %gs", watcher.root, exc, interval_s)
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return
        wait = interval_s
        if timeout_s is not None:
            left = timeout_s - (clock() - started)
            if left <= 0:
                return
            wait = min(wait, left)
        sleep(wait)
