"""Asynchronous checkpointing: the training loop waits only while tensors are copied to host memory.

The write and the commit run on a background thread. At most one save is in flight: the next save
waits for it first. A failure is never lost: it is raised by the next ``save``, by ``wait``/``close``,
and, if nobody asked, logged as an error at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

import torch
from torch import nn

from resumer.runtime.save import snapshot, write_snapshot
from resumer.storage.store import Store

logger = logging.getLogger(__name__)


class AsyncSaver:
    """``saver.save(step, model, opt, sched)`` returns after a host copy; ``saver.wait()`` returns the URI."""

    def __init__(self, root: str | Store, *, storage_options: dict[str, Any] | None = None) -> None:
        self.store = Store.of(root, storage_options)
        self.root = self.store.uri
        self.storage_options = self.store.options
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_uri: str | None = None
        self.last_stall_s = 0.0
        # Host copies reused from one save to the next (only one save is in flight): after the first save
        # the stall is a memory copy, with no new pages to fault in.
        self._buffers: dict[str, torch.Tensor] = {}
        _live.add(self)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, *, extra: dict[str, Any] | None = None) -> None:
        """Snapshot now (blocking only for the copy), write and commit in the background."""
        self.wait()  # one in flight; also raises the previous save's failure here
        started = time.perf_counter()
        snap = snapshot(step, model, optimizer, scheduler, extra=extra, copy=True, buffers=self._buffers)
        self.last_stall_s = time.perf_counter() - started
        self._thread = threading.Thread(target=self._run, args=(snap,), name=f"resumer-save-{step}", daemon=True)
        self._thread.start()

    def _run(self, snap: Any) -> None:
        try:
            self._last_uri = write_snapshot(snap, self.store)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised in the training thread
            self._error = exc

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> str | None:
        """Wait for the save in flight; raise its failure (once); return the last committed URI."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._last_uri

    def close(self) -> str | None:
        _live.discard(self)
        return self.wait()

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for saver in list(_live):
        try:
            saver.wait()
        except BaseException as exc:  # noqa: BLE001 - the process is ending: say it loudly, do not lose it
            logger.error("[save] a background checkpoint save under %s failed: %s: %s", saver.root,
                         type(exc).__name__, exc)
