"""Plan: what resuming will do to every tensor, optimizer state, scheduler, RNG stream and the step.

Pure values. ``reconcile`` builds a Plan; ``apply`` executes one; ``render`` draws one. ``to_dict`` is
the stable, versioned JSON form (``PLAN_FORMAT_VERSION``); ``Plan.from_dict`` reads it back.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from resumer.core.errors import UsageError

PLAN_FORMAT_VERSION = 1
MAX_LISTED = 25  # refusals shown in a message; the plan itself keeps all


class Policy(str, enum.Enum):
    """How differences between checkpoint and code are handled (see DESIGN.md, Policies)."""

    STRICT = "strict"
    PARTIAL = "partial"
    RESET_OPTIMIZER = "reset-optimizer"

    @classmethod
    def parse(cls, value: Policy | str) -> Policy:
        if isinstance(value, Policy):
            return value
        try:
            return cls(str(value).strip().lower().replace("_", "-"))
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise UsageError(f"Unknown policy {value!r}. Choose one of: {choices}.") from None


class Section(str, enum.Enum):
    MODEL = "model"
    OPTIMIZER = "optimizer"
    OPTIMIZER_GROUP = "optimizer-group"
    OPTIMIZER_STATE = "optimizer-state"
    SCHEDULER = "scheduler"
    RNG = "rng"
    STEP = "step"


class Action(str, enum.Enum):
    # model tensors
    LOAD = "load"
    LOAD_RENAMED = "load-renamed"
    CAST = "cast"
    INIT_FRESH = "init-fresh"
    DROP = "drop"
    SHAPE_MISMATCH = "shape-mismatch"
    TIED = "tied"  # another name of a tensor listed on its own: shares its storage, so shares its fate
    # optimizer / scheduler
    CARRY = "carry"
    FRESH = "fresh"
    RESET = "reset"
    UNUSED = "unused"
    # scheduler, rng, step
    RESTORE = "restore"
    SKIP = "skip"
    KEEP = "keep"


# Model actions whose tensor is copied from the checkpoint into the model.
COPY_ACTIONS = frozenset({Action.LOAD, Action.LOAD_RENAMED, Action.CAST})


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanEntry:
    """One decision: ``name`` is the current name (saved name for a drop); ``source`` the saved name."""

    section: Section
    name: str
    action: Action
    source: str | None = None
    reason: str = ""
    saved: str | None = None  # e.g. "float32[64, 32]"
    current: str | None = None
    refused: bool = False

    @property
    def copies(self) -> bool:
        return self.section is Section.MODEL and self.action in COPY_ACTIONS

    def describe(self) -> str:
        head = f"{self.section.value} '{self.name}': {self.action.value}"
        if self.source and self.source != self.name:
            head += f" from '{self.source}'"
        return f"{head} ({self.reason})" if self.reason else head

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section.value, "name": self.name, "action": self.action.value,
                "source": self.source, "reason": self.reason, "saved": self.saved,
                "current": self.current, "refused": self.refused}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanEntry:
        return cls(section=Section(d["section"]), name=d["name"], action=Action(d["action"]),
                   source=d.get("source"), reason=d.get("reason", ""), saved=d.get("saved"),
                   current=d.get("current"), refused=bool(d.get("refused", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Rename:
    """A saved name mapped to a new one, by which rule, with the evidence for it."""

    source: str
    target: str
    rule: str
    evidence: str
    auto: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "rule": self.rule,
                "evidence": self.evidence, "auto": self.auto}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rename:
        return cls(source=d["source"], target=d["target"], rule=d["rule"], evidence=d["evidence"],
                   auto=bool(d.get("auto", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """One reason the plan cannot be applied under its policy; ``str()`` reads as a sentence."""

    subject: str
    problem: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "problem": self.problem, "text": str(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Refusal:
        return cls(subject=d["subject"], problem=d["problem"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The whole decision for one checkpoint against the current code under one policy."""

    policy: Policy
    checkpoint: str | None
    step: int | None
    entries: tuple[PlanEntry, ...]
    renames: tuple[Rename, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    notes: tuple[str, ...] = ()
    suggestion: str | None = None  # the options that would resume, when refused
    # Position-keyed optimizer state (plain torch.save): saved name -> the position key its state is under.
    positions: tuple[tuple[str, str], ...] = ()

    def state_key(self, saved_name: str) -> str:
        """Where the checkpoint keeps ``saved_name``'s optimizer state (its name, or its saved position)."""
        return dict(self.positions).get(saved_name, saved_name)

    @property
    def ok(self) -> bool:
        return not self.refusals

    def section(self, section: Section) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.section is section)

    def entry(self, section: Section, name: str) -> PlanEntry:
        for e in self.entries:
            if e.section is section and e.name == name:
                return e
        raise KeyError(f"no {section.value} entry named {name!r}")

    def counts(self) -> dict[str, int]:
        model = Counter(e.action for e in self.section(Section.MODEL))
        opt = Counter(e.action for e in self.section(Section.OPTIMIZER_STATE))
        return {
            "loaded": model[Action.LOAD] + model[Action.CAST],
            "renamed": model[Action.LOAD_RENAMED],
            "cast": model[Action.CAST],
            "fresh": model[Action.INIT_FRESH] + model[Action.SHAPE_MISMATCH],
            "dropped": model[Action.DROP],
            "tied": model[Action.TIED],
            "optimizer_carried": opt[Action.CARRY],
            "optimizer_fresh": opt[Action.FRESH],
            "optimizer_dropped": opt[Action.DROP],
        }

    def optimizer_action(self) -> Action | None:
        entries = self.section(Section.OPTIMIZER)
        return entries[0].action if entries else None

    def summary(self) -> str:
        """One greppable line, e.g. ``[plan] partial step=1200: load 412, renamed 4, ...``."""
        c = self.counts()
        opt_total = c["optimizer_carried"] + c["optimizer_fresh"]
        opt = self.optimizer_action()
        opt_text = (f"optimizer carried {c['optimizer_carried']}/{opt_total}" if opt is Action.CARRY
                    else f"optimizer {opt.value}" if opt else "no optimizer")
        verdict = "ok" if self.ok else f"REFUSED ({len(self.refusals)})"
        return (f"[plan] {self.policy.value} step={self.step}: load {c['loaded']}, renamed {c['renamed']}, "
                f"fresh {c['fresh']}, dropped {c['dropped']}, {opt_text}: {verdict}")

    def describe_refusal(self) -> str:
        where = self.checkpoint or "the checkpoint"
        n = len(self.refusals)
        lines = [f"Cannot resume {where} under policy '{self.policy.value}': "
                 f"{n} difference{'s' if n != 1 else ''}"]
        lines += [f"  - {r}" for r in self.refusals[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more (see the full plan: --json)")
        if self.suggestion:
            lines.append(f"To resume: {self.suggestion}")
        else:
            lines.append("No policy or rename resumes this as is: fix the code or pass explicit --rename rules.")
        return "\n".join(lines)

    def digest(self) -> str:
        """What every rank must agree on before it loads: entries, renames, refusals and where position-keyed
        optimizer state goes (notes may differ per rank). 16 hex digits of a SHA-256."""
        d = self.to_dict()
        core = {k: d[k] for k in ("policy", "checkpoint", "step", "entries", "renames", "refusals",
                                  "optimizer_positions")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return self.summary() if self.ok else self.summary() + "\n" + self.describe_refusal()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "resumer-plan",
            "version": PLAN_FORMAT_VERSION,
            "ok": self.ok,
            "policy": self.policy.value,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "counts": self.counts(),
            "summary": self.summary(),
            "refusals": [r.to_dict() for r in self.refusals],
            "suggestion": self.suggestion,
            "renames": [r.to_dict() for r in self.renames],
            "notes": list(self.notes),
            "optimizer_positions": dict(self.positions),
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != "resumer-plan" or int(d.get("version", -1)) > PLAN_FORMAT_VERSION:
            raise UsageError(f"Not a resumer plan of version <= {PLAN_FORMAT_VERSION}.")
        return cls(policy=Policy.parse(d["policy"]), checkpoint=d.get("checkpoint"), step=d.get("step"),
                   entries=tuple(PlanEntry.from_dict(e) for e in d["entries"]),
                   renames=tuple(Rename.from_dict(r) for r in d.get("renames", ())),
                   refusals=tuple(Refusal.from_dict(r) for r in d.get("refusals", ())),
                   notes=tuple(d.get("notes", ())), suggestion=d.get("suggestion"),
                   positions=tuple(sorted(dict(d.get("optimizer_positions", {})).items())))
