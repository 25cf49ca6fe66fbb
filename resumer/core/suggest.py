"""Suggestions for a refused plan: the least lossy policy and renames that would resume. Pure.

Never a policy that would throw away saved tensors a rename could keep: when a dropped saved tensor has a
current tensor of the same shape that would start fresh, the rename is what is suggested.
"""

from __future__ import annotations

from collections.abc import Callable

from resumer.core.plan import Action, Plan, PlanEntry, Policy, Section
from resumer.core.renames import RenameRules
from resumer.core.signature import Signature


def lost_pairs(entries: tuple[PlanEntry, ...] | list[PlanEntry]) -> list[tuple[str, str]]:
    """(saved, current) pairs where a dropped saved tensor has a current tensor of the same layout that starts
    fresh: values a rename could keep and the plan would throw away (one example current name per saved one)."""
    fresh: dict[str | None, str] = {}
    for e in entries:
        if e.section is Section.MODEL and e.action is Action.INIT_FRESH:
            fresh.setdefault(e.current, e.name)
    return [(e.name, fresh[e.saved]) for e in entries
            if e.section is Section.MODEL and e.action is Action.DROP and e.saved in fresh]


def _rename_hint(pairs: list[tuple[str, str]]) -> str:
    old, new = pairs[0]
    return (f"--rename OLD=NEW for what was renamed: {len(pairs)} saved tensor(s) would be dropped while current "
            f"ones of the same shape start fresh (e.g. saved '{old}', current '{new}')")


def suggest_options(saved: Signature, current: Signature, policy: Policy, rules: RenameRules,
                    plan: Callable[..., Plan]) -> str | None:
    """The least lossy options that would resume, found by planning again with ``plan`` (``reconcile``, passed
    in: this module sits below it). A policy that would drop saved tensors which a same-shape current tensor
    could take is never suggested: the rename is."""
    auto = RenameRules(explicit=rules.explicit, auto=True)
    tries = [(policy, auto), (Policy.RESET_OPTIMIZER, rules), (Policy.RESET_OPTIMIZER, auto),
             (Policy.PARTIAL, rules), (Policy.PARTIAL, auto)]
    lossy: list[tuple[str, str]] = []
    for p, r in tries:
        if (p, r.auto) == (policy, rules.auto):
            continue
        candidate = plan(saved, current, p, r, suggest=False)
        if not candidate.ok:
            continue
        pairs = lost_pairs(candidate.entries)
        if pairs:
            lossy = lossy or pairs
            continue
        parts = []
        if r.auto and not rules.auto:
            parts.append("--rename auto")
        if p is not policy:
            parts.append(f"--policy {p.value}")
        return " ".join(parts)
    return _rename_hint(lossy) if lossy else None
