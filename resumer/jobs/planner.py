"""The controller's Planner for a job: select the checkpoint, plan it against the CURRENT code, decide.

The model is built on the meta device (planning allocates no model memory) from the job's factories;
the optimizer and scheduler factories run on it too. The checkpoint is chosen once, here, by URI: every
rank then applies exactly that checkpoint and checks it plans the same (``resumer.jobs.worker.restore``).

Selection checks manifests and file sizes, not checksums: every rank checks the checksums of what it reads
as it reads it (one pass), and a rank that finds the checkpoint corrupt quarantines it, so the next
attempt's selection here passes over it and falls back to the previous one. Checksumming here too would
read the whole checkpoint once more, in this process, before every attempt, recovery included
(``bench/planner_select.py`` measures it).

A job whose spec names ``resume.from`` (any checkpoint a registered format reads: another tool's, or another
job's) starts from it while its own root holds no usable checkpoint: planned like any other, recorded with
where it came from. Once the job has committed a checkpoint of its own, that one is resumed instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from resumer.checkpoints.catalog import select
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.errors import CheckpointError
from resumer.formats.native.source import NativeSource
from resumer.jobs.factories import build
from resumer.jobs.spec import JobSpec
from resumer.runtime.api import _plan_for, open_source
from resumer.runtime.capture import signature
from resumer.runtime.save import code_fingerprint

logger = logging.getLogger(__name__)


class JobPlanner:
    """``checksums``: also verify the chosen checkpoint's checksums here (a full read); off by default."""

    def __init__(self, spec: JobSpec, *, checksums: bool = False) -> None:
        self.spec = spec
        self.checksums = checksums

    def _current(self) -> tuple[Any, Any, Any]:
        with torch.device("meta"):
            return build(self.spec.model, self.spec.optimizer, self.spec.scheduler)

    def decide(self, attempt: int, previous: FailureClass) -> Decision:
        spec = self.spec
        started = time.perf_counter()
        sel = select(spec.root, storage_options=spec.storage_options or None, checksums=self.checksums)
        rejected = tuple(r.to_dict() for r in sel.rejected)
        model, optimizer, scheduler = self._current()
        base: dict[str, Any] = {"job": spec.name, "attempt": attempt, "previous_failure": previous,
                                "policy": spec.policy.value, "world_size_after": spec.workers, "rejected": rejected}
        if sel.chosen is None and spec.start_from:
            return self._start_from(base, model, optimizer, scheduler, started)
        if sel.chosen is None:
            outcome = Outcome.STARTED if attempt == 1 and not rejected else Outcome.FRESH_START
            return Decision(outcome=outcome, metrics={"plan_seconds": time.perf_counter() - started}, **base)
        source = NativeSource(sel.chosen.manifest, spec.storage_options or None, verified=self.checksums)
        plan = _plan_for(source, model, optimizer, scheduler, spec.policy, list(spec.renames) or None,
                         world_size=spec.workers)  # the job's world, not this controller process's
        saved_code = sel.chosen.manifest.code.get("fingerprint")
        current_code = code_fingerprint(model, signature(model, optimizer, scheduler)).get("fingerprint")
        decision = Decision(
            outcome=Outcome.RESUMED if plan.ok else Outcome.REFUSED,
            checkpoint=sel.chosen.uri, step=sel.chosen.step, code_fingerprint=current_code,
            code_changed=saved_code is not None and saved_code != current_code,
            world_size_before=(sel.chosen.manifest.raw.get("world") or {}).get("world_size"),
            plan=plan, message="" if plan.ok else plan.describe_refusal(),
            metrics={"plan_seconds": time.perf_counter() - started, "checkpoint_bytes": sel.chosen.total_bytes},
            **base)
        if decision.code_changed and previous is FailureClass.NONE:
            decision = dataclasses.replace(decision, previous_failure=FailureClass.CODE_CHANGED)
        return decision

    def _start_from(self, base: dict[str, Any], model: Any, optimizer: Any, scheduler: Any,
                    started: float) -> Decision:
        """The decision to start from ``resume.from`` (the job's root holds no usable checkpoint). A location
        that cannot be read is a refusal naming the field: starting fresh instead would silently drop it."""
        spec = self.spec
        why = "the job's root holds no usable checkpoint yet" if not base["rejected"] else (
            f"every checkpoint under the job's root was passed over ({len(base['rejected'])}: see rejected)")
        try:
            source = open_source(spec.start_from or "", spec.storage_options or None, checksums=self.checksums)
        except CheckpointError as exc:
            return Decision(outcome=Outcome.REFUSED, message=f"resume.from {spec.start_from}: {exc}",
                            metrics={"plan_seconds": time.perf_counter() - started}, **base)
        try:
            plan = _plan_for(source, model, optimizer, scheduler, spec.policy, list(spec.renames) or None,
                             world_size=spec.workers)
        finally:
            source.close()
        note = f"Started from resume.from ({source.format}): {source.uri}, because {why}."
        return Decision(
            outcome=Outcome.RESUMED if plan.ok else Outcome.REFUSED, checkpoint=source.uri,
            step=source.signature.step or 0, plan=plan,
            code_fingerprint=code_fingerprint(model, signature(model, optimizer, scheduler)).get("fingerprint"),
            message=note if plan.ok else f"resume.from {source.uri}: {plan.describe_refusal()}",
            metrics={"plan_seconds": time.perf_counter() - started}, **base)
