"""reconcile: (saved Signature, current Signature, policy, renames) -> Plan. Pure: no torch, no IO.

Policies (DESIGN.md):
  strict           every saved tensor maps 1:1 to a current one (same name after renames, shape, dtype);
                   optimizer state carried whole by name; anything else is refused.
  partial          loads what matches by (renamed) name and shape; casts dtypes; the rest keeps the
                   code's init; optimizer state carried for loaded params, fresh for others.
  reset-optimizer  model as strict; optimizer and scheduler fresh from the code; step kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from resumer.core.plan import Action, Plan, PlanEntry, Policy, Refusal, Rename, Section
from resumer.core.positions import bind_positions
from resumer.core.renames import parse_renames, resolve
from resumer.core.signature import OptimizerSpec, Signature, TensorSpec
from resumer.core.suggest import lost_pairs, suggest_options


def fmt(t: TensorSpec) -> str:
    return f"{t.dtype}[{', '.join(str(d) for d in t.shape)}]"


@dataclass(slots=True)
class _Acc:
    """Accumulates entries and refusals while one plan is built."""

    policy: Policy
    entries: list[PlanEntry] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, refuse: str | None = None, subject: str | None = None, **kw: Any) -> None:
        entry = PlanEntry(refused=refuse is not None, **kw)
        self.entries.append(entry)
        if refuse is not None:
            self.refusals.append(Refusal(subject=subject or f"{entry.section.value} '{entry.name}'",
                                         problem=refuse))


def reconcile(saved: Signature, current: Signature, policy: Policy | str = Policy.STRICT,
              renames: Any = None, *, checkpoint: str | None = None, suggest: bool = True) -> Plan:
    """Decide what resuming ``saved`` into ``current`` does under ``policy``. Pure and deterministic."""
    policy = Policy.parse(policy)
    rules = parse_renames(renames)
    mapping, applied, problems = resolve(saved.tensors, current.tensors, rules)
    acc = _Acc(policy=policy)
    acc.refusals += [Refusal(subject="renames", problem=p) for p in problems]
    sources, named = _model(saved, current, mapping, {r.source: r for r in applied}, acc)
    _ties(saved, current, sources, named, acc)
    saved_opt, positions = _bind(saved, current, named, acc)
    opt_reset = _optimizer(saved_opt, current.optimizer, sources, named, acc)
    _scheduler(saved, current, opt_reset, acc)
    _rng_and_step(saved, current, acc)
    if policy is Policy.PARTIAL and not sources and saved.tensors:
        acc.refusals.append(Refusal(subject="model", problem="nothing in the checkpoint matches the current "
                                    "model by name and shape, so nothing would load"))
    if policy is Policy.PARTIAL and (lost := lost_pairs(acc.entries)):
        acc.notes.append(f"{len(lost)} saved tensor(s) dropped while a current tensor of the same shape starts "
                         f"fresh (e.g. saved '{lost[0][0]}', current '{lost[0][1]}'): renamed? Try --rename auto, "
                         "or --rename OLD=NEW")
    if saved.world_size and current.world_size and saved.world_size != current.world_size:
        per_rank = (f": each of the {saved.rng_ranks} ranks' RNG state was saved, and every rank now restores "
                    "rank 0's" if saved.rng_ranks and saved.rng else "")
        acc.notes.append(f"world size {saved.world_size} saved, {current.world_size} now{per_rank}")
    acc.notes.extend(saved.notes)
    suggestion = suggest_options(saved, current, policy, rules, reconcile) if acc.refusals and suggest else None
    return Plan(policy=policy, checkpoint=checkpoint, step=saved.step, entries=tuple(acc.entries),
                renames=tuple(applied), refusals=tuple(acc.refusals), notes=tuple(acc.notes),
                suggestion=suggestion, positions=tuple(sorted(positions.items())))


def _bind(saved: Signature, current: Signature, named: Mapping[str, str],
          acc: _Acc) -> tuple[OptimizerSpec | None, dict[str, str]]:
    """The saved optimizer keyed by saved names; a position-keyed one is tied through the current order."""
    so, co = saved.optimizer, current.optimizer
    if so is None or not so.positional or co is None or acc.policy is Policy.RESET_OPTIMIZER:
        return so, {}
    binding = bind_positions(so, co, saved.by_name(), named)
    if binding.spec is None:
        return replace(so, unmapped=binding.problem, positional=False), {}
    acc.notes.append(binding.note)
    return binding.spec, binding.positions


def _hint(spec: TensorSpec, others: list[TensorSpec]) -> str:
    same = [o.name for o in others if o.shape == spec.shape and o.dtype == spec.dtype]
    if not same:
        return ""
    shown = ", ".join(f"'{n}'" for n in same[:3]) + (" ..." if len(same) > 3 else "")
    return f"; {shown} {'has' if len(same) == 1 else 'have'} the same shape (renamed? index shift?)"


def _model(saved: Signature, current: Signature, mapping: Mapping[str, str],
           renamed: Mapping[str, Rename], acc: _Acc) -> tuple[dict[str, str], dict[str, str]]:
    """Model entries; returns current name -> saved name for every tensor copied from the checkpoint, and
    for every current tensor a saved one maps to by name (copied or not: a resized head is still the head)."""
    lenient = acc.policy is Policy.PARTIAL
    cur = current.by_name()
    cur_alias = current.alias_map()
    sources: dict[str, str] = {}
    named: dict[str, str] = {}
    handled: set[str] = set()
    unmatched_saved: list[TensorSpec] = []
    for s in saved.tensors:
        target = mapping[s.name]
        if target in cur_alias and cur_alias[target] in s.aliases:
            target = cur_alias[target]  # same tie, the code now names the other alias first
        if target not in cur or target in handled:
            unmatched_saved.append(s)
            continue
        handled.add(target)
        named[target] = s.name
        if _compare(s, cur[target], renamed.get(s.name), acc):
            sources[target] = s.name
    unmatched_current = [c for c in current.tensors if c.name not in handled]
    for s in unmatched_saved:
        target = mapping[s.name]
        if target in cur_alias:
            why = f"tied to '{cur_alias[target]}' in the current code, separate in the checkpoint"
        elif target in handled:
            why = f"'{target}' is already loaded from another saved tensor"
        else:
            why = "in the checkpoint but not in the current model" + _hint(s, unmatched_current)
        acc.add(section=Section.MODEL, name=s.name, action=Action.DROP, source=s.name, saved=fmt(s),
                reason=why, refuse=None if lenient else why)
    saved_alias = {a: t for t in saved.tensors for a in t.aliases}
    for c in unmatched_current:
        tied = saved_alias.get(c.name)
        if tied is not None and mapping[tied.name] in sources and tied.same_layout(c):
            why = f"tied to '{tied.name}' in the checkpoint, separate now: loaded from it"
            acc.add(section=Section.MODEL, name=c.name, action=Action.LOAD, source=tied.name,
                    saved=fmt(tied), current=fmt(c), reason=why, refuse=None if lenient else why)
            if lenient:
                sources[c.name] = tied.name
            continue
        why = "missing in checkpoint" + _hint(c, unmatched_saved)
        acc.add(section=Section.MODEL, name=c.name, action=Action.INIT_FRESH, current=fmt(c),
                reason=why + ("; keeps the code's init" if lenient else ""), refuse=None if lenient else why)
    return sources, named


def _ties(saved: Signature, current: Signature, sources: Mapping[str, str], named: Mapping[str, str],
          acc: _Acc) -> None:
    """Every tied alias in the plan: a current one shares its tensor's fate; a saved one whose name is gone is
    listed as tied too (its values live on in the tensor it was tied to, so nothing is lost)."""
    for c in current.tensors:
        if not c.aliases:
            continue
        src = sources.get(c.name)
        fate = f"loaded with it from '{src}'" if src is not None else "not loaded: keeps the code's init with it"
        for alias in c.aliases:
            acc.add(section=Section.MODEL, name=alias, action=Action.TIED, source=src, current=fmt(c),
                    reason=f"tied to '{c.name}' (the same tensor): {fate}")
    still_tied = {named[c.name] for c in current.tensors if c.aliases and c.name in named}
    cur = current.by_name()
    cur_alias = current.alias_map()
    for s in saved.tensors:
        if s.name in still_tied:
            continue
        for alias in s.aliases:
            if alias in cur or alias in cur_alias:
                continue  # separate now (listed by _model), or tied to another name now (listed above)
            # "tied", not "drop": its values are the tensor it was tied to, so nothing is lost (and no rename
            # is suggested for it)
            acc.add(section=Section.MODEL, name=alias, action=Action.TIED, source=s.name, saved=fmt(s),
                    reason=f"tied to '{s.name}' in the checkpoint (the same values); the current model has no "
                           "such name, so nothing is lost")


def _compare(s: TensorSpec, c: TensorSpec, rn: Rename | None, acc: _Acc) -> bool:
    """One saved tensor against the current tensor it maps to; True when its values are copied."""
    lenient = acc.policy is Policy.PARTIAL
    kw = {"section": Section.MODEL, "name": c.name, "source": s.name, "saved": fmt(s), "current": fmt(c)}
    if c.shape != s.shape:
        what = "keeps the code's init" if lenient else "cannot be loaded"
        acc.add(action=Action.SHAPE_MISMATCH, reason=f"shape differs: {what}",
                refuse=None if lenient else f"shape differs: saved {fmt(s)}, now {fmt(c)}", **kw)
        return False
    if c.dtype != s.dtype:
        acc.add(action=Action.CAST, reason=f"saved {s.dtype}, now {c.dtype}: values cast",
                refuse=None if lenient else f"dtype differs: saved {s.dtype}, now {c.dtype}", **kw)
        return lenient
    if rn is not None:
        acc.add(action=Action.LOAD_RENAMED, reason=rn.rule, **kw)
    else:
        acc.add(action=Action.LOAD, **kw)
    return True


def _same_class(so: OptimizerSpec, co: OptimizerSpec) -> bool:
    return co.cls in so.cls.split("|")


def _optimizer(so: OptimizerSpec | None, co: OptimizerSpec | None, sources: Mapping[str, str],
               named: Mapping[str, str], acc: _Acc) -> bool:
    """Optimizer entries; returns True when the optimizer starts fresh as a whole."""
    strict = acc.policy is Policy.STRICT
    if co is None:
        if so is not None:
            acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.UNUSED,
                    reason=f"no optimizer given: the saved {so.short_name} state is not used")
        return False
    if so is not None and so.inferred:
        acc.notes.append(f"optimizer class {so.inferred}")
    if acc.policy is Policy.RESET_OPTIMIZER:
        acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.RESET,
                reason=f"policy reset-optimizer: fresh {co.short_name} state from the code")
        return True
    if so is None:
        why = "the checkpoint holds no optimizer state"
        acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.FRESH, reason=why,
                refuse=why if strict else None)
        return True
    if so.unmapped:
        acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.RESET,
                reason=so.unmapped + ": fresh state from the code", refuse=so.unmapped if strict else None)
        return True
    if not _same_class(so, co):
        saved_name = " or ".join(c.rsplit(".", 1)[-1] for c in so.cls.split("|"))
        why = f"{saved_name} saved, {co.short_name} now"
        acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.RESET,
                reason=why + ": fresh state from the code", refuse=why if strict else None)
        return True
    state = _Acc(policy=acc.policy)
    carried, total = _optimizer_state(so, co, sources, state)
    acc.add(section=Section.OPTIMIZER, name="optimizer", action=Action.CARRY,
            reason=f"{co.short_name} state carried by name for {carried}/{total} parameters")
    acc.entries += state.entries
    acc.refusals += state.refusals
    _optimizer_groups(so, co, sources, named, acc)
    return False


def _optimizer_state(so: OptimizerSpec, co: OptimizerSpec, sources: Mapping[str, str],
                     acc: _Acc) -> tuple[int, int]:
    """Per-parameter state entries; returns (carried, total) over the current optimizer's parameters."""
    strict = acc.policy is Policy.STRICT
    saved_state = so.state_by_param()
    saved_members = {p for g in so.groups for p in g.params}
    used: set[str] = set()
    carried = total = 0
    for g in co.groups:
        for p in g.params:
            total += 1
            src = sources.get(p)
            kw = {"section": Section.OPTIMIZER_STATE, "name": p, "source": src}
            if src is None:
                acc.add(action=Action.FRESH, reason="parameter not loaded from the checkpoint", **kw)
            elif src not in saved_members:
                why = "parameter was not in the saved optimizer"
                acc.add(action=Action.FRESH, reason=why, refuse=why if strict else None, **kw)
            elif src not in saved_state:
                used.add(src)
                acc.add(action=Action.FRESH, reason="no state was saved for it (it had no step with a gradient)",
                        **kw)
            else:
                used.add(src)
                carried += 1
                acc.add(action=Action.CARRY, reason="state carried by name", **kw)
    loaded = set(sources.values())
    for g in so.groups:
        for p in g.params:
            if p in used:
                continue
            why = "parameter no longer optimized" if p in loaded else "parameter not loaded into the model"
            # A dropped tensor is already refused by the model section; do not count it twice.
            acc.add(section=Section.OPTIMIZER_STATE, name=p, source=p, action=Action.DROP, reason=why,
                    refuse=why if strict and p in loaded else None)
    return carried, total


def _hyper_diff(saved: dict[str, Any], code: dict[str, Any]) -> str:
    diffs = [f"{k} {saved[k]!r} saved, {code[k]!r} in code" for k in sorted(set(saved) & set(code))
             if saved[k] != code[k]]
    return ("saved hyperparameters restored (" + "; ".join(diffs) + ")") if diffs else "hyperparameters restored"


def _optimizer_groups(so: OptimizerSpec, co: OptimizerSpec, sources: Mapping[str, str], named: Mapping[str, str],
                      acc: _Acc) -> None:
    """Group hyperparameters. Groups correspond by their members' NAMES, loaded or not: a group whose head was
    resized under ``partial`` is still that group, and keeps its saved learning rate (the scheduler's too)."""
    strict = acc.policy is Policy.STRICT
    saved_sets = [frozenset(g.params) for g in so.groups]
    matched: set[int] = set()
    for gi, g in enumerate(co.groups):
        mapped = frozenset(named[p] for p in g.params if p in named)
        # The same group, possibly grown by parameters new to the model (those are reported on their own).
        gj = next((j for j, s in enumerate(saved_sets) if s == mapped and j not in matched), None)
        if gj is None:
            why = "no saved group holds exactly its parameters: the code's hyperparameters are used"
            # Members missing from the model are refused there already; refuse a regrouping only.
            refuse = strict and all(p in sources for p in g.params)
            acc.add(section=Section.OPTIMIZER_GROUP, name=f"group {gi}", action=Action.FRESH, reason=why,
                    refuse=why if refuse else None, subject=f"optimizer param group {gi}")
            continue
        matched.add(gj)
        acc.add(section=Section.OPTIMIZER_GROUP, name=f"group {gi}", source=f"group {gj}", action=Action.CARRY,
                reason=_hyper_diff(so.groups[gj].hyper(), g.hyper()))
    loaded = set(sources.values())
    for gj in range(len(so.groups)):
        if gj not in matched:
            why = "saved param group has no counterpart in the current optimizer"
            refuse = strict and saved_sets[gj] <= loaded
            acc.add(section=Section.OPTIMIZER_GROUP, name=f"saved group {gj}", source=f"group {gj}",
                    action=Action.DROP, reason=why, refuse=why if refuse else None,
                    subject=f"optimizer saved param group {gj}")


def _scheduler(saved: Signature, current: Signature, opt_reset: bool, acc: _Acc) -> None:
    ss, cs = saved.scheduler, current.scheduler
    strict = acc.policy is Policy.STRICT
    kw = {"section": Section.SCHEDULER, "name": "scheduler"}
    if cs is None:
        if ss is not None:
            acc.add(action=Action.UNUSED, reason=f"no scheduler given: the saved {ss.short_name} state is not used",
                    **kw)
        return
    n_groups = len(current.optimizer.groups) if current.optimizer else None
    if opt_reset and current.optimizer is not None:
        acc.add(action=Action.RESET, reason="the optimizer starts fresh, so does the scheduler", **kw)
    elif ss is None:
        why = "the checkpoint holds no scheduler state"
        acc.add(action=Action.FRESH, reason=why, refuse=why if strict else None, **kw)
    elif ss.cls != cs.cls:
        why = f"{ss.short_name} saved, {cs.short_name} now"
        acc.add(action=Action.FRESH, reason=why + ": fresh from the code", refuse=why if strict else None, **kw)
    elif ss.num_groups is not None and n_groups is not None and ss.num_groups != n_groups:
        why = f"drives {ss.num_groups} param groups saved, {n_groups} now"
        acc.add(action=Action.FRESH, reason=why + ": fresh from the code", refuse=why if strict else None, **kw)
    elif (unaligned := _unaligned_group(acc)) is not None:
        why = (f"optimizer {unaligned}, so a restored scheduler would step from another learning rate than the "
               "uninterrupted run's")
        acc.add(action=Action.FRESH, reason=why + ": the scheduler starts fresh from the code too",
                refuse=why if strict else None, **kw)
    else:
        acc.add(action=Action.RESTORE, reason=f"{cs.short_name} state restored", **kw)


def _unaligned_group(acc: _Acc) -> str | None:
    """How the first param group out of line says so (None: every group carries from its own index)."""
    for e in acc.entries:
        if e.section is not Section.OPTIMIZER_GROUP:
            continue
        if e.action is Action.DROP:
            return f"param {e.name} has no counterpart now"
        if e.action is not Action.CARRY:
            return f"param {e.name} starts from the code's hyperparameters"
        if e.source != e.name:
            return f"param {e.name} takes the hyperparameters of saved {e.source}"
    return None


def _rng_and_step(saved: Signature, current: Signature, acc: _Acc) -> None:
    if not saved.rng:
        acc.add(section=Section.RNG, name="rng", action=Action.SKIP, reason="the checkpoint holds no RNG state")
    whose = ""
    if saved.rng_ranks:
        whose = (" on each rank, its own" if current.world_size == saved.rng_ranks
                 else f" on every rank, rank 0's (saved per rank for {saved.rng_ranks} ranks)")
    for kind in saved.rng:
        reason = ("restored where CUDA is available" if kind == "cuda" else "restored") + whose
        acc.add(section=Section.RNG, name=kind, action=Action.RESTORE, reason=reason)
    if saved.step is not None:
        acc.add(section=Section.STEP, name="step", action=Action.KEEP,
                reason=f"training continues after step {saved.step}")
