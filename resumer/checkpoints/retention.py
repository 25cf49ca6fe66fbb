"""Retention: remove old checkpoints, never one that a resume or a reader still needs.

``decide`` is pure (a listing, a policy, the newest valid step and the leases in; a decision with its
reason per step directory out). It deletes only committed, non-quarantined checkpoints OLDER than the
newest checkpoint that is committed AND verified, never that one, never a leased one, never a
directory without a manifest (a save may be in progress), never a quarantined one (kept for
inspection) and never a suspicious one (its manifest names another step than its directory: a copy
or a rename; such a directory is never taken as the newest either, so a copy of an old checkpoint
under a new name cannot make the real newest look old). What it keeps beyond that is the policy: the
newest ``keep_last`` valid checkpoints (the newest valid one counts as the first) and every step
divisible by ``keep_every``.

Before anything is deleted, ``prune`` takes a second look at each doomed checkpoint: its manifest must
parse and name the step of its directory, and (on a local disk) no symlink in a kept checkpoint may
lead into it. Then, per checkpoint, in this order, and why:

1. look at the leases again: a reader may have arrived since the decision;
2. rename ``manifest.json`` to ``retiring.json`` (the tombstone): the checkpoint is un-committed, so
   no new reader can pick it, and if we crash from here on the next prune recognises the directory
   as an unfinished deletion rather than a save in progress, and finishes it. A rename writes no
   bytes, so a prune on a FULL disk can still free it;
3. look at the leases once more: a reader that leased it before step 2 may hold the manifest already.
   If one is there, the tombstone is renamed back (re-commit, the same bytes) and nothing is deleted.
   A reader that leases after this look finds no manifest, so it never reads vanishing data;
4. remove the data files (a symlink is removed, never what it points to), then the tombstone, then
   the empty directory.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from resumer.checkpoints.catalog import Candidate, CheckpointInfo, scan, select
from resumer.checkpoints.lease import Lease, active_leases, sweep_expired
from resumer.core.errors import CheckpointError, TransientStorageError, UsageError
from resumer.formats.native.manifest import MANIFEST, MAX_MANIFEST_BYTES, QUARANTINE, parse
from resumer.storage.fs import basename, join
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

RETIRING = "retiring.json"


class PruneAction(str, enum.Enum):
    """What prune does with one step directory."""

    KEEP = "keep"
    DELETE = "delete"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """What to keep besides what is always kept: the newest ``keep_last`` valid checkpoints and every
    step divisible by ``keep_every``. At least one of the two is required (``keep_last=1`` keeps only
    the newest valid checkpoint)."""

    keep_last: int | None = None
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"RetentionPolicy.{name} must be a positive int or None, got {value!r}.")
        if self.keep_last is None and self.keep_every is None:
            raise UsageError("RetentionPolicy needs keep_last or keep_every (or both); to keep only the newest "
                             "valid checkpoint, use keep_last=1.")

    def describe(self) -> str:
        parts = [f"keep-last {self.keep_last}" if self.keep_last else "",
                 f"keep-every {self.keep_every}" if self.keep_every else ""]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneDecision:
    """Keep or delete one step directory, and why."""

    step: int
    uri: str
    action: PruneAction
    reason: str
    bytes: int = 0

    @property
    def delete(self) -> bool:
        return self.action is PruneAction.DELETE

    def describe(self) -> str:
        return f"{self.action.value} step={self.step} {self.uri}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri, "action": self.action.value, "reason": self.reason,
                "bytes": self.bytes}


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    """What a prune decided and did. In a dry run nothing is deleted and ``deleted`` is empty."""

    root: str
    policy: RetentionPolicy
    dry_run: bool
    newest_valid: str | None
    decisions: tuple[PruneDecision, ...]
    deleted: tuple[str, ...] = ()
    bytes_freed: int = 0
    failed: tuple[str, ...] = ()
    note: str | None = None

    def summary(self) -> str:
        doomed = [d for d in self.decisions if d.delete]
        if self.dry_run:
            return (f"dry run: would delete {len(doomed)} of {len(self.decisions)} step directories "
                    f"({sum(d.bytes for d in doomed)} bytes) under {self.root}; nothing was deleted")
        text = (f"deleted {len(self.deleted)} of {len(self.decisions)} step directories, {self.bytes_freed} "
                f"bytes freed under {self.root}")
        return text + (f"; {len(self.failed)} deletion(s) failed" if self.failed else "")

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "policy": {"keep_last": self.policy.keep_last,
                                              "keep_every": self.policy.keep_every},
                "dry_run": self.dry_run, "newest_valid": self.newest_valid,
                "deleted": list(self.deleted), "bytes_freed": self.bytes_freed, "failed": list(self.failed),
                "note": self.note, "decisions": [d.to_dict() for d in self.decisions]}


def describe_leases(leases: Sequence[Lease]) -> str:
    last = max(leases, key=lambda lease: lease.expires_at)
    more = f" (and {len(leases) - 1} more)" if len(leases) > 1 else ""
    return last.describe() + more


def decide(candidates: Sequence[Candidate], policy: RetentionPolicy, newest_valid_step: int | None,
           leased_dirs: Mapping[str, Sequence[Lease]], suspicious: Mapping[str, str] | None = None
           ) -> list[PruneDecision]:
    """Keep or delete each step directory, newest first. Pure: no IO, no clock.

    Args:
        candidates: the step directories as listed (``catalog.scan``).
        policy: what to keep beyond what is always kept.
        newest_valid_step: the step (of its directory name) of the newest committed AND verified
            checkpoint whose manifest names that same step, or None when there is none (then nothing
            is deleted).
        leased_dirs: step-dir name -> its ACTIVE leases (``lease.active_leases``).
        suspicious: URI -> why, for committed directories whose manifest names another step (a copy
            or a rename): kept, and not counted among the valid ones.
    """
    suspicious = suspicious or {}
    ordered = sorted(candidates, key=lambda c: c.step, reverse=True)
    valid = [c for c in ordered if c.committed and not c.quarantined and c.uri not in suspicious
             and newest_valid_step is not None and c.step <= newest_valid_step]
    rank = {c.uri: i for i, c in enumerate(valid, start=1)}
    out = []
    for c in ordered:
        if c.committed and c.uri in suspicious:
            out.append(PruneDecision(step=c.step, uri=c.uri, action=PruneAction.KEEP, reason=suspicious[c.uri],
                                bytes=sum(c.sizes.values())))
            continue
        action, reason = _judge(c, policy, newest_valid_step, leased_dirs.get(c.name) or (), rank)
        out.append(PruneDecision(step=c.step, uri=c.uri, action=action, reason=reason, bytes=sum(c.sizes.values())))
    return out


def _judge(c: Candidate, policy: RetentionPolicy, newest: int | None, leases: Sequence[Lease],
           rank: Mapping[str, int]) -> tuple[PruneAction, str]:
    keep = PruneAction.KEEP
    if not c.committed:
        if RETIRING in c.sizes and newest is not None and c.step < newest and not leases:
            return PruneAction.DELETE, "unfinished deletion (retiring.json, no manifest): finishing it"
        return keep, "not committed (may be a save in progress)"
    if c.quarantined:
        return keep, "quarantined: kept for inspection"
    if newest is None:
        return keep, "no valid checkpoint under the root: nothing is deleted"
    if c.step == newest:
        return keep, "newest valid checkpoint"
    if c.step > newest:
        return keep, "newer than the newest valid checkpoint"
    if policy.keep_last is not None and rank[c.uri] <= policy.keep_last:
        return keep, f"within keep-last {policy.keep_last}"
    if policy.keep_every is not None and c.step % policy.keep_every == 0:
        return keep, f"step is a multiple of keep-every {policy.keep_every}"
    if leases:
        return keep, describe_leases(leases)
    return PruneAction.DELETE, "outside the policy"


def prune(root: str | Store, policy: RetentionPolicy, *, storage_options: dict[str, Any] | None = None,
          dry_run: bool = False, checksums: bool = True) -> PruneResult:
    """Delete the checkpoints under ``root`` that ``policy`` does not keep, safely (see the module doc).

    Args:
        root: the checkpoint root (any fsspec URI), or its Store.
        policy: what to keep.
        storage_options: fsspec options (with a URI).
        dry_run: decide and report only; write and delete nothing (no quarantine marks either).
        checksums: verify the newest checkpoint's checksums (a full read) when finding the newest valid
            one; without, sizes only.

    Returns:
        every decision, the URIs deleted, the bytes freed and the deletions that failed.
    """
    if not isinstance(policy, RetentionPolicy):
        raise UsageError(f"policy must be a RetentionPolicy, got {type(policy).__name__}.")
    store = Store.of(root, storage_options)
    # Select first: checkpoints it finds corrupt are quarantined, and the listing below shows them so.
    chosen, suspicious = _newest_valid(store, checksums=checksums, mark=not dry_run)
    store.invalidate_cache()
    candidates = scan(store)
    newest = next((c for c in candidates if chosen is not None and c.uri == chosen.uri), None)
    note = None
    if newest is None:
        note = f"no committed, verified checkpoint under {store.uri}: nothing was deleted"
        logger.warning("[retention] %s", note)
    by_uri = {c.uri: c for c in candidates}
    decisions = decide(candidates, policy, newest.step if newest else None, active_leases(store), suspicious)
    decisions = _second_look(decisions, by_uri, store)
    final, deleted, failed = [], [], []
    for d in decisions:
        if d.delete and not dry_run:
            try:
                d = _delete(by_uri[d.uri], d, store)
            except (OSError, TransientStorageError) as exc:
                logger.warning("[retention] could not delete %s (the next prune finishes it): %s", d.uri, exc)
                d = replace(d, action=PruneAction.KEEP, reason=f"deletion failed: {exc}")
                failed.append(d.uri)
            if d.delete:
                deleted.append(d.uri)
        final.append(d)
    if not dry_run:
        try:
            sweep_expired(store)
        except (OSError, TransientStorageError) as exc:  # tidying only: the deletions above stand
            logger.warning("[retention] could not sweep expired leases under %s: %s", store.uri, exc)
    result = PruneResult(root=store.uri, policy=policy, dry_run=dry_run, newest_valid=newest.uri if newest else None,
                         decisions=tuple(final), deleted=tuple(deleted),
                         bytes_freed=sum(d.bytes for d in final if d.delete and not dry_run), failed=tuple(failed),
                         note=note)
    logger.info("[retention] %s (%s)", result.summary(), policy.describe())
    return result


def _newest_valid(store: Store, *, checksums: bool, mark: bool) -> tuple[CheckpointInfo | None, dict[str, str]]:
    """The newest committed, verified checkpoint whose manifest names the step of its directory, and the
    suspicious ones passed over on the way (URI -> why). A copy of step 10 named step-99 is not newer."""
    selection = select(store, checksums=checksums, mark=mark)
    suspicious = {r.uri: _mismatch(r.uri, r.manifest_step) for r in selection.rejected
                  if r.manifest_step is not None}  # selection passes such copies over, never marking them
    for uri, why in suspicious.items():
        logger.warning("[retention] %s: %s", uri, why)
    return selection.chosen, suspicious


def _mismatch(uri: str, manifest_step: int) -> str:
    return (f"suspicious: its manifest says step {manifest_step} but the directory is {basename(uri)} (copied or "
            "renamed?); never deleted by prune and never taken as the newest")


def _second_look(decisions: list[PruneDecision], by_uri: Mapping[str, Candidate], store: Store
                 ) -> list[PruneDecision]:
    """Keep a doomed checkpoint whose manifest cannot be read or names another step, or (local disks) into
    which a symlink of a kept checkpoint leads. Repeated until stable: a newly kept one may hold links too."""
    out = [_check_manifest(d, store.child(by_uri[d.uri].name)) if d.delete and by_uri[d.uri].committed else d
           for d in decisions]
    if not out or not store.local:
        return out  # symlinks exist on local disks only
    changed = True
    while changed:
        changed = False
        targets = _link_targets([by_uri[d.uri] for d in out if not d.delete], store)
        for i, d in enumerate(out):
            hit = _linked_into(by_uri[d.uri], targets, store) if d.delete else None
            if hit:
                out[i] = replace(d, action=PruneAction.KEEP,
                                 reason=f"the kept {hit[0]} is a symlink leading to its {hit[1]}: deleting it would "
                                        "break that checkpoint")
                changed = True
    return out


def _check_manifest(d: PruneDecision, checkpoint: Store) -> PruneDecision:
    try:
        # At most one byte over the limit is read: parse refuses a longer manifest before parsing it.
        step = parse(checkpoint.read(MANIFEST, limit=MAX_MANIFEST_BYTES + 1), checkpoint.uri).step
    except FileNotFoundError:
        return d  # un-committed since the listing: the deletion handles it
    except CheckpointError as exc:
        return replace(d, action=PruneAction.KEEP, reason=f"its manifest cannot be read, so it is kept: {exc}")
    return d if step == d.step else replace(d, action=PruneAction.KEEP, reason=_mismatch(checkpoint.uri, step))


def _canonical(path: str) -> str:
    """``path`` with its directory resolved (symlinks, ``..``) but not its last component."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _link_targets(kept: Sequence[Candidate], store: Store) -> dict[str, str]:
    """Every path that a symlink chain starting in a kept checkpoint passes through -> that kept file's URI."""
    out: dict[str, str] = {}
    for c in kept:
        path = store.path_of(c.name)
        for name in c.sizes:
            p = os.path.join(path, name)
            for _ in range(40):  # the kernel's own bound on a symlink chain
                if not os.path.islink(p):
                    break
                p = os.path.join(os.path.dirname(p), os.readlink(p))
                out.setdefault(_canonical(p), join(c.uri, name))
    return out


def _linked_into(c: Candidate, targets: Mapping[str, str], store: Store) -> tuple[str, str] | None:
    """(kept file URI, this file's name) when deleting one of ``c``'s files would break a kept symlink."""
    path = store.path_of(c.name)
    for name in sorted(c.sizes):
        kept = targets.get(_canonical(os.path.join(path, name)))
        if kept is not None:
            return kept, name
    return None


def _leases_now(root: Store, name: str) -> list[Lease]:
    return active_leases(root).get(name, [])


def _delete(c: Candidate, d: PruneDecision, root: Store) -> PruneDecision:
    """Delete one checkpoint in the safe order (module doc); returns the decision as it finally stands."""
    ckpt = root.child(c.name)
    leases = _leases_now(root, c.name)
    if leases:
        return replace(d, action=PruneAction.KEEP, reason=f"{describe_leases(leases)} (taken during prune)")
    if ckpt.exists(QUARANTINE):
        return replace(d, action=PruneAction.KEEP, reason="quarantined: kept for inspection (marked during prune)")
    if c.committed:
        try:
            # Un-commit first (no new reader can pick it from here on) by a rename: no bytes written, so a
            # full disk cannot stop it, and the tombstone left behind is the manifest itself.
            ckpt.move(MANIFEST, RETIRING, what="un-committing")
        except FileNotFoundError:
            return replace(d, action=PruneAction.KEEP, reason="its manifest vanished during prune: left alone")
        try:
            leases = _leases_now(root, c.name)
        except BaseException:
            ckpt.move(RETIRING, MANIFEST, what="re-committing")  # cannot tell: keep it
            raise
        if leases:
            ckpt.move(RETIRING, MANIFEST, what="re-committing")  # the same bytes
            logger.info("[retention] kept step=%d uri=%s: a reader leased it during prune", c.step, c.uri)
            return replace(d, action=PruneAction.KEEP, reason=f"{describe_leases(leases)} (taken during prune)")
    # Already gone is fine (a re-run, or another pruner). A symlink is removed, never what it points to.
    for file in sorted(set(c.sizes) - {MANIFEST, RETIRING}):
        ckpt.rm(file, missing_ok=True, what="deleting")
    # The tombstone last: until here a crash leaves a recognisable unfinished deletion.
    ckpt.rm(RETIRING, missing_ok=True, what="deleting")
    try:
        ckpt.rmdir_if_empty()
    except OSError as exc:
        logger.debug("[retention] left the directory %s: %s", c.uri, exc)
    logger.info("[retention] deleted step=%d uri=%s (%s)", c.step, c.uri, d.reason)
    return d
