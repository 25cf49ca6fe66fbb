"""What a checkpoint format provides: a reader (recognise and open) and the source it opens.

``CheckpointSource`` is the whole surface that planning and ``resumer.runtime.apply`` use, whatever the
format: the checkpoint's ``Signature`` (reconcile plans from it alone) and the reads a plan needs. A reader
of a new format subclasses it and implements what it reads; the rest keeps the defaults below (no RNG, no
scheduler, nothing more to verify, everything already in memory). How a format reads fast (the native
reader's one pass per file, checksummed as it is read, with the optimizer's memory faulted in alongside)
stays inside that format's ``load``.

``FormatReader`` is what the registry (``resumer.formats.registry``) holds per format: ``detect`` looks at a
``Probe`` (one stat, one listing, one small read from the start of a file, each made once and shared by
every format tried) and never unpickles or parses a whole file; ``open`` reads what planning needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from resumer.core.errors import ResumerError
from resumer.core.signature import Signature
from resumer.storage import retry
from resumer.storage.store import Store

HEAD_BYTES = 512  # what detection may read from the start of a file


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadOptions:
    """How a source reads. ``checksums``: check every byte read against the checkpoint's checksums, where
    the format has them. ``progress``: called with each count of bytes read (any thread), or None."""

    checksums: bool = True
    progress: Any = None


class CheckpointSource(Protocol):
    """A checkpoint opened for planning and resuming. Subclass it to inherit the defaults.

    Order of use: ``signature`` for the plan; then ``prepare`` (checks that need no tensor bytes), ``load``
    (reads what the plan copies into fresh memory: every storage or checksum failure happens here, before
    anything live is written); then the accessors, which only hand out memory and cannot fail on storage;
    ``close`` at the end. Names are the checkpoint's (saved) names, as in ``signature``.
    """

    format: str  # its name in resumer.formats.registry
    uri: str
    signature: Signature
    bytes_read: int = 0

    def prepare(self) -> None:
        """Check everything that needs no tensor bytes (the values the plan will apply decode), before any
        tensor is read. Default: nothing to check."""
        return

    def load(self, tensors: set[str], optimizer_params: set[str]) -> None:
        """Read model ``tensors`` and the optimizer state of ``optimizer_params`` into fresh memory; nothing
        live is touched. Default: everything is in memory already."""
        return

    def tensor(self, name: str) -> torch.Tensor:
        """Model tensor ``name`` (loaded); the caller copies from it and never writes to it."""
        ...

    def optimizer_state(self, param: str) -> dict[str, Any]:
        """The saved optimizer state of ``param`` (loaded): tensors and plain values, the caller's to keep."""
        raise ResumerError(f"{self.uri} holds no optimizer state.")

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        """Saved param group ``index``'s hyperparameters (without ``params``)."""
        raise ResumerError(f"{self.uri} holds no optimizer param groups.")

    def scheduler_state(self) -> Any:
        """The saved scheduler ``state_dict``, or None."""
        return None

    def rng_state(self) -> dict[str, Any] | None:
        """RNG states as ``resumer.formats.rng.parse`` returns them, or None when the format keeps none."""
        return None

    def extra(self) -> dict[str, Any]:
        """User metadata saved beside the state (JSON-ready values)."""
        return {}

    def verify(self) -> bool:
        """Check every byte against the checkpoint's own checksums (for ``resumer inspect --verify``);
        CheckpointError names the first problem. False when the format keeps no checksums (the default)."""
        return False

    def details(self) -> dict[str, Any]:
        """Format-specific facts for ``resumer inspect`` (``kind``, files, times), JSON-ready."""
        return {"kind": self.format}

    def close(self) -> None:
        """Release files and memory."""
        return


class FormatReader(Protocol):
    """One checkpoint format, as the registry knows it."""

    def detect(self, probe: Probe) -> bool:
        """Whether ``probe.store`` is a checkpoint of this format: cheap, and never unpickles anything."""
        ...

    def open(self, store: Store, options: ReadOptions) -> CheckpointSource:
        """The checkpoint at ``store``, read far enough to plan (its Signature); CheckpointError when it is
        not readable or unsafe."""
        ...


class Probe:
    """What detection looks at, each fetched at most once and shared by every format tried: what the location
    is (``kind``), the names in a directory (``names``), and the first bytes of a file (``head``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._kind: str | None = None
        self._names: frozenset[str] | None = None
        self._head: bytes | None = None
        self._stated = False

    @property
    def kind(self) -> str | None:
        """``"file"``, ``"directory"``, or None when nothing is there."""
        if not self._stated:
            try:
                info = retry.call(lambda: self.store.fs.info(self.store.path), what="stat", uri=self.store.uri)
            except FileNotFoundError:
                info = None
            self._kind = None if info is None else str(info.get("type"))
            self._stated = True
        return self._kind

    @property
    def name(self) -> str:
        """The last part of the location (a file's or directory's own name)."""
        return self.store.path.rstrip("/").rsplit("/", 1)[-1]

    def names(self) -> frozenset[str]:
        """The names directly inside a directory (empty for a file or nothing)."""
        if self._names is None:
            listed = self.store.ls() if self.kind == "directory" else []
            self._names = frozenset(str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return self._names

    def head(self) -> bytes:
        """The first ``HEAD_BYTES`` bytes of a file (empty for a directory or nothing)."""
        if self._head is None:
            self._head = self.store.read(limit=HEAD_BYTES) if self.kind == "file" else b""
        return self._head
