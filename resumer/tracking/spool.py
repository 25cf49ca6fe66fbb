"""An ordered on-disk spool and the background thread that ships records through it.

Every record the recorder makes (run creation, tags, params, metrics, artifacts, run ending) is an *op*:
a JSON-serialisable dict with an ``id``. ``Shipper.submit(op)`` returns at once; one background thread
applies ops in submission order. While the tracking server answers, ops go straight to it. When applying
one fails transiently (server down, timeout, 5xx), that op and every later one are appended to the spool
instead, in order, and a retry loop with exponential backoff replays the spool head first, so the server
sees the records in the order they were made, however long it was away.

On disk (``spool_dir``)::

    journal.jsonl   one op per line, in order; ``seq`` numbers them
    applied.json    {"seq": N, "id": ...}: ops up to N were applied (rewritten atomically after each)
    blobs/SEQ/NAME  files an op uploads (artifacts), removed once applied
    rejected.jsonl  ops the server refused for good (a bad request), with the error: kept, never dropped
    lock            held (flock) by the one process that owns this spool

Nothing lost: an op is acknowledged as durable only once it is applied or on disk, and ``close()`` writes
whatever is still in memory to the spool. Nothing duplicated: ops are applied in order and the watermark
says how far; the one op that may be replayed after a crash (applied, watermark not yet written) is
idempotent by construction (runs are found by a client-side key before being created, metrics carry their
own timestamps, tags and params are set to the same value). A spool left by a process that died is
flushed by the next recorder that opens it. One safety valve: past ``max_bytes`` of journal, ops marked
``bulk`` (training points) are dropped, counted and warned about, so a days-long outage cannot fill the disk;
every other record is always kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

logger = logging.getLogger(__name__)

Op = dict[str, Any]


def new_op(kind: str, **fields: Any) -> Op:
    """An op with a unique id (``seq`` is given when it is spooled)."""
    return {"id": uuid.uuid4().hex, "op": kind, **fields}


class SpoolLocked(RuntimeError):
    """Another live process owns this spool directory."""


class Spool:
    """The journal on disk. Not thread-safe: only the shipper thread touches it after ``open``."""

    def __init__(self, spool_dir: str, *, max_bytes: int = 2**30) -> None:
        self.dir = spool_dir
        self.max_bytes = max_bytes
        self.journal_path = os.path.join(spool_dir, "journal.jsonl")
        self.applied_path = os.path.join(spool_dir, "applied.json")
        self.rejected_path = os.path.join(spool_dir, "rejected.jsonl")
        self.blob_root = os.path.join(spool_dir, "blobs")
        os.makedirs(self.blob_root, exist_ok=True)
        self._lock_file: TextIO | None = open(os.path.join(spool_dir, "lock"), "a+")  # noqa: SIM115 - held open
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise SpoolLocked(f"spool {spool_dir} is in use by another process") from None
        self.applied_seq = self._read_applied()
        self._pending: deque[Op] = deque(op for op in self._read_journal() if op["seq"] > self.applied_seq)
        self._next_seq = max([self.applied_seq, *(op["seq"] for op in self._pending)]) + 1
        self.bytes = os.path.getsize(self.journal_path) if os.path.exists(self.journal_path) else 0
        if self._pending:
            logger.info("spool %s: %d records left by an earlier run will be flushed", spool_dir, len(self._pending))

    # -- reading back -------------------------------------------------------------------------------

    def _read_applied(self) -> int:
        try:
            with open(self.applied_path, encoding="utf-8") as f:
                return int(json.load(f)["seq"])
        except (OSError, ValueError, KeyError):
            return 0

    def _read_journal(self) -> list[Op]:
        ops: list[Op] = []
        try:
            with open(self.journal_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return ops
        for n, line in enumerate(lines):
            try:
                ops.append(json.loads(line))
            except ValueError:
                # Only the last line can be torn (a crash mid-append); it was never acknowledged.
                logger.warning("spool %s: skipping unreadable line %d of %d", self.dir, n + 1, len(lines))
        return ops

    # -- the shipper's side -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._pending)

    def head(self) -> Op | None:
        return self._pending[0] if self._pending else None

    def blob_dir(self, op_id: str) -> str:
        """Where an op's files live until it is applied (the recorder writes them before submitting)."""
        path = os.path.join(self.blob_root, op_id)
        os.makedirs(path, exist_ok=True)
        return path

    def append(self, op: Op) -> None:
        """Append ``op`` durably (fsync) at the end of the journal."""
        op["seq"] = self._next_seq
        self._next_seq += 1
        line = json.dumps(op, separators=(",", ":")) + "\n"
        with open(self.journal_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.bytes += len(line)
        self._pending.append(op)

    def mark_applied(self, op: Op, *, drop_blobs: bool = True) -> None:
        """Advance the watermark past ``op`` (the head, or an op that never needed spooling)."""
        if self._pending and self._pending[0]["id"] == op["id"]:
            self._pending.popleft()
            self.applied_seq = op["seq"]
            self._write_applied(op)
        if drop_blobs:
            self._drop_blobs(op)
        if not self._pending and os.path.exists(self.journal_path):
            os.remove(self.journal_path)  # everything applied: start the next outage with an empty journal
            self.bytes = 0

    def reject(self, op: Op, error: str) -> None:
        """An op the server refused for good: keep it in ``rejected.jsonl`` (never silently lost), move on."""
        with open(self.rejected_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"error": error, "op": op}, separators=(",", ":")) + "\n")
        self.mark_applied(op, drop_blobs=False)  # a rejected artifact keeps its file next to the record

    def _write_applied(self, op: Op) -> None:
        tmp = self.applied_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seq": op["seq"], "id": op["id"]}, f)
        os.replace(tmp, self.applied_path)

    def _drop_blobs(self, op: Op) -> None:
        if op.get("blob_dir"):
            shutil.rmtree(os.path.join(self.blob_root, op["blob_dir"]), ignore_errors=True)

    def close(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


class Ticket:
    """Tells a caller when its op is durable (applied, or safely in the spool) and when it is applied."""

    __slots__ = ("durable", "applied")

    def __init__(self) -> None:
        self.durable = threading.Event()
        self.applied = threading.Event()


_STOP = object()
UNREACHABLE, TRANSIENT, PERMANENT = "unreachable", "transient", "permanent"


class Shipper:
    """Applies ops in order on one background thread; spools them while the server is unreachable.

    Args:
        spool: the journal (owned by this shipper from now on).
        apply: applies one op; raises on failure.
        classify: a failure's kind: ``UNREACHABLE`` (no answer: spool and retry for as long as it takes),
            ``TRANSIENT`` (an error answer that may pass, e.g. a 503: retried ``max_tries`` times, then
            rejected, so one poisonous record cannot hold back the rest forever) or ``PERMANENT`` (rejected).
        tick: called on the shipper thread every ``tick_interval_s`` (the recorder drains training points).
        backoff: first and longest wait between retries while the server is away.
    """

    def __init__(self, spool: Spool, apply: Callable[[Op], None], *, classify: Callable[[BaseException], str],
                 tick: Callable[[], None] | None = None, tick_interval_s: float = 1.0,
                 backoff: tuple[float, float] = (0.5, 30.0), max_tries: int = 10,
                 name: str = "resumer-recorder") -> None:
        self.spool = spool
        self._apply, self._classify, self._tick = apply, classify, tick
        self._max_tries = max_tries
        self._tries: dict[str, int] = {}  # op id -> failed tries with an error answer
        self._tick_interval_s = tick_interval_s
        self._backoff_first, self._backoff_max = backoff
        self._backoff = self._backoff_first
        self._next_retry = 0.0  # a spool left from before is retried at once
        self._queue: queue.Queue[Any] = queue.Queue()
        self._busy = threading.Lock()  # held while an item or a replay is in progress
        self.online = True
        self.applied = 0
        self.spooled = 0
        self.rejected = 0
        self.dropped = 0  # bulk ops (training points) not spooled because the spool was over its cap
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    # -- caller side (any thread; never blocks for long) -----------------------------------------------

    def submit(self, op: Op) -> Ticket:
        ticket = Ticket()
        if self._closed:
            logger.warning("recorder closed: %s record %s not recorded", op.get("op"), op.get("id"))
            return ticket
        self._queue.put((op, ticket))
        return ticket

    def pending(self) -> int:
        """Ops not yet applied: queued in memory plus spooled on disk."""
        return self._queue.qsize() + len(self.spool)

    def retry_now(self) -> None:
        self._next_retry = 0.0
        self._queue.put(None)  # wake the thread

    def flush(self, timeout_s: float) -> bool:
        """Wait until every op submitted so far is applied (True), or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        self.retry_now()
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and not len(self.spool) and not self._busy.locked():
                return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return self._queue.unfinished_tasks == 0 and not len(self.spool)

    def close(self, timeout_s: float) -> bool:
        """Flush for up to ``timeout_s``, then write what is left to the spool and stop. True if all applied."""
        if self._closed:
            return not self.pending()
        done = self.flush(timeout_s)
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=max(5.0, timeout_s))
        if self._thread.is_alive():  # stuck in a request: it still owns the spool; the lock goes with the process
            logger.warning("recorder: the shipper is still busy at close; %d records may be left to the next run",
                           self.pending())
        else:
            self.spool.close()
        return done

    # -- the shipper thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self._tick_interval_s
        while True:
            now = time.monotonic()
            if self._tick is not None and now >= next_tick:
                self._safe_tick()
                next_tick = now + self._tick_interval_s
            if len(self.spool) and now >= self._next_retry:
                with self._busy:
                    self._replay()
            wait = next_tick - time.monotonic()
            if len(self.spool):
                wait = min(wait, self._next_retry - time.monotonic())
            try:
                item = self._queue.get(timeout=max(0.001, wait))
            except queue.Empty:
                continue
            try:
                if item is _STOP:
                    self._spool_rest()
                    return
                if item is not None:
                    with self._busy:
                        self._handle(*item)
            finally:
                self._queue.task_done()

    def _safe_tick(self) -> None:
        try:
            self._tick()  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - the recorder must never stop recording over one bad batch
            logger.exception("recorder: draining training metrics failed")

    def _handle(self, op: Op, ticket: Ticket) -> None:
        if len(self.spool):  # an outage is in progress: keep the order, queue behind the spool
            self._to_spool(op, ticket)
            return
        if self._try(op):
            ticket.applied.set()
        else:
            self._to_spool(op, ticket)
        ticket.durable.set()

    def _try(self, op: Op) -> bool:
        """Apply ``op``: True when applied or rejected for good, False when it must wait in the spool."""
        try:
            self._apply(op)
        except Exception as exc:  # noqa: BLE001 - classified: spooled and retried, or rejected and kept
            kind = self._classify(exc)
            if kind == PERMANENT:
                self._reject(op, exc)
                return True
            if kind == TRANSIENT:
                tries = self._tries[op["id"]] = self._tries.get(op["id"], 0) + 1
                if tries >= self._max_tries:
                    self._reject(op, exc)
                    return True
            self._went_offline(exc)
            return False
        self._tries.pop(op["id"], None)
        self.applied += 1
        self.spool.mark_applied(op)  # drops its blobs
        return True

    def _to_spool(self, op: Op, ticket: Ticket) -> None:
        if op.get("bulk") and self.spool.bytes > self.spool.max_bytes:
            # A days-long outage must not fill the disk: past the cap, training points are dropped (counted,
            # warned); decisions, run creation and ending, params and artifacts are always kept.
            if not self.dropped:
                logger.warning("spool %s is over %d bytes: training points are dropped until the server is back",
                               self.spool.dir, self.spool.max_bytes)
            self.dropped += 1
            ticket.durable.set()
            return
        try:
            self.spool.append(op)
            self.spooled += 1
        except OSError:
            logger.exception("recorder: could not write to the spool %s; record %s lost", self.spool.dir, op["op"])
        ticket.durable.set()

    def _replay(self) -> None:
        while (op := self.spool.head()) is not None:
            if not self._try(op):
                return
        if not self.online:
            logger.warning("tracking server reachable again: spooled records flushed")
        self.online = True
        self._backoff = self._backoff_first

    def _went_offline(self, exc: BaseException) -> None:
        if self.online:
            logger.warning("tracking server unreachable (%s): spooling records to %s", _short(exc), self.spool.dir)
        self.online = False
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _reject(self, op: Op, exc: BaseException) -> None:
        logger.error("tracking server refused a %s record (kept in %s): %s", op.get("op"), self.spool.rejected_path,
                     _short(exc))
        self.rejected += 1
        self._tries.pop(op["id"], None)
        op.setdefault("seq", -1)
        self.spool.reject(op, _short(exc, 2000))

    def _spool_rest(self) -> None:
        """On close: whatever is still queued goes to disk, to be flushed by the next recorder on this spool."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                if item is not None and item is not _STOP:
                    self._to_spool(*item)
            finally:
                self._queue.task_done()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
