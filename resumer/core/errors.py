"""Every error resumer raises on purpose.

    ResumerError                  base: catch this to catch everything below
    ├── UsageError                bad input from a user: an unknown policy, a bad MODULE:FACTORY, a bad rule
    ├── CheckpointError           a checkpoint that is missing, torn, corrupt or unsafe (has .uri)
    │   ├── CheckpointMismatch    a sound checkpoint that does not go into these live objects (the code differs)
    │   │   └── RanksDiverged     the ranks of one collective resume planned differently (nothing loaded)
    │   └── AlreadyCommitted      a save of a step that is committed already (its checkpoint stands)
    ├── PlanRefused               resume() was asked to apply a plan that is not ok (has .plan)
    ├── TransientStorageError     storage failed in a way that may succeed on retry (has .uri)
    ├── StorageFullError          a save ran out of space (disk full, quota); nothing was committed (has .uri)
    └── Preempted                 a worker got a preemption notice and stopped at a step boundary (.step, .uri)

Errors keep their data as attributes and survive pickling (Ray moves them between processes).
"""

from __future__ import annotations

from typing import Any


class ResumerError(Exception):
    """Base of every error the package raises on purpose."""


class UsageError(ResumerError):
    """A user asked for something that cannot work as given; the message says what to change."""


class CheckpointError(ResumerError):
    """A checkpoint is missing, torn, corrupt or unsafe. Nothing was loaded from it.

    ``quarantine`` is False when the checkpoint is fine for someone else (written in a newer format than this
    version reads): selection passes it over but must not mark it corrupt for every reader.
    """

    def __init__(self, message: str, *, uri: str | None = None, quarantine: bool = True) -> None:
        super().__init__(message)
        self.uri = uri
        self.quarantine = quarantine

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_checkpoint_error, (str(self), self.uri, self.quarantine))


class CheckpointMismatch(CheckpointError):
    """What the checkpoint holds does not go into THESE live objects (a hyperparameter of another kind, a scheduler
    state this scheduler cannot take): the code's doing as likely as damage. Never quarantined (a mark would hide
    the checkpoint from code that can take it), and a resume from a root does not fall back to an older
    checkpoint over it (that would silently lose the newest progress): it stops and says why."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message, uri=uri, quarantine=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_mismatch, (str(self), self.uri))


class RanksDiverged(CheckpointMismatch):
    """The ranks of one collective resume planned differently: from a root, a checkpoint was committed, marked or
    removed between their listings, so they chose different ones; or their models differ. No rank loaded
    anything. A resume from a root chooses again; given one checkpoint, it stops and says which rank planned
    what."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_diverged, (str(self), self.uri))


class AlreadyCommitted(CheckpointError):
    """The step was committed already (by an earlier save, or another writer racing this one). Its checkpoint
    stands; this save wrote nothing that remains."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_already_committed, (str(self), self.uri))


class TransientStorageError(ResumerError):
    """Storage failed in a way that may succeed later (connection reset, 5xx, throttling)."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transient_error, (str(self), self.uri))


class StorageFullError(ResumerError):
    """A save ran out of space (ENOSPC, EDQUOT). Nothing was committed and its partial files were removed."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_storage_full_error, (str(self), self.uri))


class PlanRefused(ResumerError):
    """resume() refused to apply a plan that is not ok; ``.plan`` says every difference."""

    def __init__(self, plan: Any) -> None:
        super().__init__(plan.describe_refusal())
        self.plan = plan

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlanRefused, (self.plan,))


class Preempted(ResumerError):
    """A worker received a preemption notice (SIGTERM); ``.uri`` is its emergency checkpoint, if written."""

    def __init__(self, step: int, uri: str | None) -> None:
        where = f"emergency checkpoint {uri}" if uri else "no emergency checkpoint from this rank"
        super().__init__(f"Preempted after step {step}: {where}.")
        self.step, self.uri = step, uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (Preempted, (self.step, self.uri))


def _rebuild_checkpoint_error(message: str, uri: str | None, quarantine: bool = True) -> CheckpointError:
    return CheckpointError(message, uri=uri, quarantine=quarantine)


def _rebuild_transient_error(message: str, uri: str | None) -> TransientStorageError:
    return TransientStorageError(message, uri=uri)


def _rebuild_storage_full_error(message: str, uri: str | None) -> StorageFullError:
    return StorageFullError(message, uri=uri)


def _rebuild_already_committed(message: str, uri: str | None) -> AlreadyCommitted:
    return AlreadyCommitted(message, uri=uri)


def _rebuild_mismatch(message: str, uri: str | None) -> CheckpointMismatch:
    return CheckpointMismatch(message, uri=uri)


def _rebuild_diverged(message: str, uri: str | None) -> RanksDiverged:
    return RanksDiverged(message, uri=uri)
