"""An attempt's configuration: what the launcher tells every worker of one attempt, as one typed value.

The controller decides an attempt (a checkpoint, the plan's digest, the policy); the launcher builds an
``AttemptConfig`` from the job spec and that decision and posts it on the job's progress board; each worker
takes it there and hands it to the user's entrypoint in the environment (``ENV``, JSON), where
``resumer.jobs.worker`` parses it once, validating every field, and reads it as this type.

Why the environment and not Ray Train's ``train_loop_config``: that dict is fixed for one ``fit()``, while Ray
Train restarts the worker group inside the same ``fit()`` and the restarted group must run the NEXT attempt,
which exists only once the controller has planned and recorded it (so it comes from the board); and
``train_loop_config`` is the user's own ``config``, passed to their entrypoint untouched. The variable is set
in the worker process before the entrypoint runs, so ``restore`` and ``save`` find it there, as does a run
outside Ray (a test, a manual run) that sets it by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from resumer.core.errors import UsageError
from resumer.core.plan import Policy
from resumer.core.renames import parse_renames
from resumer.jobs.fields import SHARDING, Fields

if TYPE_CHECKING:
    from resumer.core.decision import Decision
    from resumer.jobs.spec import JobSpec

ENV = "RESUMER_ATTEMPT"


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptConfig:
    """One attempt of a job, as every one of its workers runs it.

    ``checkpoint`` is the URI the controller chose (None: start fresh) and ``plan_hash`` the ``Plan.digest()``
    it recorded for it: each rank plans once and refuses a plan with another digest before reading anything.
    ``model``, ``optimizer`` and ``scheduler`` are the job's ``MODULE:FACTORY`` names (``worker.build``).
    """

    job: str
    attempt: int
    root: str
    model: str
    optimizer: str | None = None
    scheduler: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    plan_hash: str | None = None
    policy: Policy = Policy.STRICT
    renames: tuple[str, ...] = ()
    every: int = 10
    grace_s: float = 30.0
    keep_last: int | None = None
    keep_every: int | None = None
    sharding: str = "none"

    def __post_init__(self) -> None:
        if (self.checkpoint is None) != (self.plan_hash is None):
            raise _err("plan_hash", "is set exactly when 'checkpoint' is (a resumed attempt checks the plan it "
                                    f"was given); got checkpoint={self.checkpoint!r}, plan_hash={self.plan_hash!r}")

    @classmethod
    def for_decision(cls, spec: JobSpec, decision: Decision) -> AttemptConfig:
        """The config of ``decision``'s attempt of ``spec`` (the launcher's, after the decision was recorded)."""
        checkpoint = decision.checkpoint if decision.step is not None else None
        # A checkpoint without a plan cannot be checked by the ranks: __post_init__ refuses it.
        plan_hash = decision.plan.digest() if checkpoint is not None and decision.plan is not None else None
        return cls(job=spec.name, attempt=decision.attempt, root=spec.root, model=spec.model,
                   optimizer=spec.optimizer, scheduler=spec.scheduler, storage_options=dict(spec.storage_options),
                   checkpoint=checkpoint, plan_hash=plan_hash,
                   policy=Policy.parse(decision.policy), renames=tuple(spec.renames), every=spec.every,
                   grace_s=spec.grace_s, keep_last=spec.keep_last, keep_every=spec.keep_every,
                   sharding=spec.sharding)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (it holds the storage options: never log or record it)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> AttemptConfig:
        """Parse and validate; every error names its field."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"The attempt config (${ENV}) is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> AttemptConfig:
        """Validate ``data`` (from ``to_dict``) field by field; every error names its field."""
        if not isinstance(data, Mapping):
            raise UsageError(f"The attempt config must be a mapping, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _err(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
        for name in ("job", "attempt", "root", "model"):
            if name not in data:
                raise _err(name, "is required")
        d = dict(data)
        return cls(
            job=_text(d["job"], "job"), attempt=_FIELDS.integer(d["attempt"], "attempt"), root=_text(d["root"], "root"),
            model=_text(d["model"], "model"), optimizer=_text(d.get("optimizer"), "optimizer", optional=True),
            scheduler=_text(d.get("scheduler"), "scheduler", optional=True),
            storage_options=_mapping(d.get("storage_options"), "storage_options"),
            checkpoint=_text(d.get("checkpoint"), "checkpoint", optional=True),
            plan_hash=_text(d.get("plan_hash"), "plan_hash", optional=True), policy=_policy(d.get("policy")),
            renames=_renames(d.get("renames")), every=_FIELDS.integer(d.get("every", 10), "every"),
            grace_s=_FIELDS.number(d.get("grace_s", 30.0), "grace_s", unit="seconds"),
            keep_last=_FIELDS.optional_integer(d.get("keep_last"), "keep_last"),
            keep_every=_FIELDS.optional_integer(d.get("keep_every"), "keep_every"),
            sharding=_FIELDS.choice(d.get("sharding", "none"), "sharding", SHARDING))


_FIELDS = Fields("Attempt config")
_err = _FIELDS.error


def _plain(value: Any) -> Any:
    if isinstance(value, Policy):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _text(value: Any, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _err(name, f"must be a non-empty string{' or null' if optional else ''}, got {value!r}")
    return value


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _err(name, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def _policy(value: Any) -> Policy:
    if value is None:
        return Policy.STRICT
    try:
        return Policy.parse(value)
    except UsageError as exc:
        raise _err("policy", str(exc)) from None


def _renames(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _err("renames", f"must be a list of strings ('auto' or 'OLD=NEW'), got {value!r}")
    try:
        parse_renames(value)
    except UsageError as exc:
        raise _err("renames", str(exc)) from None
    return tuple(value)
