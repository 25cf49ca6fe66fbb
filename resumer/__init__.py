"""resumer: resume PyTorch training safely through preemptions and code changes.

See the README for a tour; DESIGN.md for the architecture. The public contract::

    uri   = resumer.save_checkpoint(root, step, model, optimizer, scheduler, extra=..., storage_options=...)
    infos = resumer.list_checkpoints(root)          # committed only, newest first
    info  = resumer.latest_checkpoint(root)         # newest committed AND verified, or None
    plan  = resumer.plan(checkpoint, model, optimizer, scheduler, policy="strict", renames=None)
    res   = resumer.resume(checkpoint_or_root, model, optimizer, scheduler, policy="strict", renames=None)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from resumer.core.version import __version__ as __version__

# Each public name and the module it lives in, imported on first use (PEP 562): ``import resumer`` alone costs no
# torch, so what only needs a few pure modules (the job board's actor, ``resumer status``/``logs``/``stop``) starts
# without the seconds torch takes to import. ``from resumer import plan`` and ``resumer.plan`` work as before.
_FROM: dict[str, tuple[str, ...]] = {
    "resumer.checkpoints.catalog": ("CheckpointInfo", "latest_checkpoint", "list_checkpoints", "select"),
    "resumer.checkpoints.watch": ("Watcher", "WatchEvent"),
    "resumer.core.decision": ("Decision", "FailureClass", "Outcome"),
    "resumer.core.errors": ("CheckpointError", "CheckpointMismatch", "PlanRefused", "RanksDiverged", "ResumerError",
                            "StorageFullError", "TransientStorageError", "UsageError"),
    "resumer.core.plan": ("Action", "Plan", "PlanEntry", "Policy", "Refusal", "Rename", "Section"),
    "resumer.core.reconcile": ("reconcile",),
    "resumer.core.signature": ("Signature", "TensorSpec"),
    "resumer.formats.native.verify": ("read_manifest", "verify"),
    "resumer.runtime.api": ("open_source", "plan", "resume"),
    "resumer.runtime.apply": ("ResumeResult",),
    "resumer.runtime.async_save": ("AsyncSaver",),
    "resumer.runtime.capture": ("signature",),
    "resumer.runtime.save": ("save_checkpoint",),
    "resumer.tracking.base": ("Recorder", "RunStatus"),
    "resumer.tracking.recorder": ("MlflowRecorder",),
}
_EXPORTS = {name: module for module, names in _FROM.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resumer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from resumer.checkpoints.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints, select
    from resumer.checkpoints.watch import Watcher, WatchEvent
    from resumer.core.decision import Decision, FailureClass, Outcome
    from resumer.core.errors import (
        CheckpointError,
        CheckpointMismatch,
        PlanRefused,
        RanksDiverged,
        ResumerError,
        StorageFullError,
        TransientStorageError,
        UsageError,
    )
    from resumer.core.plan import Action, Plan, PlanEntry, Policy, Refusal, Rename, Section
    from resumer.core.reconcile import reconcile
    from resumer.core.signature import Signature, TensorSpec
    from resumer.formats.native.verify import read_manifest, verify
    from resumer.runtime.api import open_source, plan, resume
    from resumer.runtime.apply import ResumeResult
    from resumer.runtime.async_save import AsyncSaver
    from resumer.runtime.capture import signature
    from resumer.runtime.save import save_checkpoint
    from resumer.tracking.base import Recorder, RunStatus
    from resumer.tracking.recorder import MlflowRecorder

__all__ = [
    "Action", "AsyncSaver", "CheckpointError", "CheckpointInfo", "CheckpointMismatch", "Decision", "FailureClass",
    "MlflowRecorder", "Outcome", "Plan", "PlanEntry", "PlanRefused", "Policy", "Recorder", "Refusal", "Rename",
    "RanksDiverged", "ResumeResult", "ResumerError", "RunStatus", "Section", "Signature", "StorageFullError",
    "TensorSpec", "TransientStorageError", "UsageError",
    "latest_checkpoint", "list_checkpoints", "open_source", "plan", "read_manifest", "reconcile", "resume",
    "save_checkpoint", "select", "signature", "verify", "WatchEvent", "Watcher",
]
