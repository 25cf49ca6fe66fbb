"""resumer: resume PyTorch training safely through preemptions and code changes.

See the README for a tour; DESIGN.md for the architecture. The public contract::

    uri   = resumer.save_checkpoint(root, step, model, optimizer, scheduler, extra=..., storage_options=...)
    infos = resumer.list_checkpoints(root)          # committed only, newest first
    info  = resumer.latest_checkpoint(root)         # newest committed AND verified, or None
    plan  = resumer.plan(checkpoint, model, optimizer, scheduler, policy="strict", renames=None)
    res   = resumer.resume(checkpoint_or_root, model, optimizer, scheduler, policy="strict", renames=None)
"""

from __future__ import annotations

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
from resumer.core.version import __version__ as __version__
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
