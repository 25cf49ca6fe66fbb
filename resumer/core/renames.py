"""Renames: map saved tensor names onto the current code's names. Pure.

Two sources, applied in this order:

* explicit rules ``OLD_REGEX=NEW`` (``re.sub`` syntax, ``\\1`` groups), applied in order, each to the
  result of the previous one;
* ``auto`` inference, applied only to names still unmatched, and only when unambiguous:
  - the ``nn.Sequential`` index shift after a parameterless layer is inserted or removed: the
    parameterised children under one container keep the same order, names, shapes and dtypes;
  - a module wrapped under a new attribute (``fc.weight`` -> ``fc.inner.weight``), a whole-model
    wrapper prefix (``x`` -> ``model.x``), both at once (peft LoRA: ``base_model.model.`` in front and
    ``.base_layer`` inside), or the reverse (unwrapping): exactly one candidate each way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from resumer.core.errors import UsageError
from resumer.core.plan import Rename
from resumer.core.signature import TensorSpec

AUTO = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class RenameRules:
    """Parsed user renames: explicit (pattern, replacement) pairs and whether ``auto`` is on."""

    explicit: tuple[tuple[re.Pattern[str], str], ...] = ()
    auto: bool = False

    def describe(self) -> str:
        parts = [f"{p.pattern}={r}" for p, r in self.explicit]
        if self.auto:
            parts.append(AUTO)
        return ", ".join(parts) or "none"


def parse_renames(renames: str | Mapping[str, str] | Iterable[str] | RenameRules | None) -> RenameRules:
    """Parse ``"auto"``, a mapping regex -> replacement, or ``OLD=NEW`` strings (``auto`` allowed among them)."""
    if renames is None:
        return RenameRules()
    if isinstance(renames, RenameRules):
        return renames
    if isinstance(renames, str):
        renames = [renames]
    items: list[tuple[str, str]] = []
    auto = False
    if isinstance(renames, Mapping):
        items = [(str(k), str(v)) for k, v in renames.items()]
    else:
        for raw in renames:
            text = str(raw).strip()
            if text.lower() == AUTO:
                auto = True
                continue
            if "=" not in text:
                raise UsageError(f"Bad rename {text!r}: write OLD_REGEX=NEW (e.g. '^encoder\\.=backbone.') "
                                 "or 'auto'.")
            old, new = text.split("=", 1)
            items.append((old, new))
    compiled = []
    for old, new in items:
        if not old:
            raise UsageError(f"Bad rename {old}={new!r}: the pattern is empty.")
        try:
            pattern = re.compile(old)
            pattern.sub(new, "probe")  # validates group references in the replacement
        except (re.error, IndexError) as exc:
            raise UsageError(f"Bad rename {old}={new}: {exc}. Use Python regex and re.sub replacement "
                             "syntax (\\1 for groups).") from None
        compiled.append((pattern, new))
    return RenameRules(explicit=tuple(compiled), auto=auto)


def apply_explicit(names: Iterable[str], rules: RenameRules) -> dict[str, tuple[str, str]]:
    """Saved name -> (new name, rule text) for every name an explicit rule changes."""
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        new = name
        used = []
        for pattern, repl in rules.explicit:
            changed = pattern.sub(repl, new)
            if changed != new:
                used.append(f"{pattern.pattern}={repl}")
                new = changed
        if new != name:
            out[name] = (new, ", ".join(used))
    return out


def _layout(t: TensorSpec) -> tuple[tuple[int, ...], str]:
    return (t.shape, t.dtype)


def _int_groups(specs: Mapping[str, TensorSpec]) -> dict[str, dict[int, tuple]]:
    """prefix -> child index -> sorted (rest-of-name, shape, dtype) for every integer path segment."""
    groups: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for name, spec in specs.items():
        segs = name.split(".")
        for i, seg in enumerate(segs[:-1]):
            if seg.isdigit():
                groups[".".join(segs[:i])][int(seg)].append((".".join(segs[i + 1:]), *_layout(spec)))
    return {p: {k: tuple(sorted(v)) for k, v in kids.items()} for p, kids in groups.items()}


def _sub_index(name: str, prefix: str, old: int, new: int) -> str | None:
    head = f"{prefix}.{old}." if prefix else f"{old}."
    if name.startswith(head):
        return (f"{prefix}.{new}." if prefix else f"{new}.") + name[len(head):]
    return None


def infer_index_shift(saved: Mapping[str, TensorSpec], current: Mapping[str, TensorSpec]) -> list[Rename]:
    """Renames for containers whose parameterised children kept their order but not their indices."""
    work = dict(saved)
    origin = {n: n for n in saved}  # name in ``work`` -> saved name
    evidence: dict[str, tuple[str, str]] = {}  # saved name -> (rule, evidence) of its last move
    for _ in range(8):  # nested containers: re-derive after each accepted shift
        sg, cg = _int_groups(work), _int_groups(current)
        found = None
        for prefix in sorted(set(sg) & set(cg), key=lambda p: (p.count("."), p)):
            s_idx, c_idx = sorted(sg[prefix]), sorted(cg[prefix])
            if s_idx == c_idx or len(s_idx) != len(c_idx):
                continue
            if [sg[prefix][i] for i in s_idx] != [cg[prefix][j] for j in c_idx]:
                continue
            found = (prefix, s_idx, c_idx)
            break
        if found is None:
            break
        prefix, s_idx, c_idx = found
        where = f"'{prefix}'" if prefix else "the top-level module"
        why = (f"children of {where} with parameters {s_idx} saved, {c_idx} now; same order, names, shapes "
               "and dtypes")
        index_map = {i: j for i, j in zip(s_idx, c_idx, strict=True) if i != j}
        moved: dict[str, TensorSpec] = {}
        moved_origin: dict[str, str] = {}
        for name, spec in work.items():
            new = name
            for i, j in index_map.items():
                sub = _sub_index(name, prefix, i, j)
                if sub is not None:
                    new = sub
                    evidence[origin[name]] = (f"auto: index shift in {where}", why)
                    break
            moved[new] = spec
            moved_origin[new] = origin[name]
        work, origin = moved, moved_origin
    return [Rename(source=src, target=name, rule=evidence[src][0], evidence=evidence[src][1], auto=True)
            for name, src in origin.items() if name != src]


def _inserted(short: list[str], long: list[str]) -> list[tuple[int, int]] | None:
    """Spans of ``long`` to remove to get ``short`` (leftmost alignment), or None when ``short`` is not a
    subsequence of ``long`` that keeps the leaf."""
    if len(short) >= len(long) or short[-1] != long[-1]:
        return None
    spans: list[tuple[int, int]] = []
    i = 0
    for j, seg in enumerate(long):
        if i < len(short) and seg == short[i] and (i < len(short) - 1 or j == len(long) - 1):
            i += 1
        elif spans and spans[-1][1] == j:
            spans[-1] = (spans[-1][0], j + 1)
        else:
            spans.append((j, j + 1))
    return spans if i == len(short) else None


def _wrap_rule(long: list[str], spans: list[tuple[int, int]], unwrap: bool) -> str:
    """E.g. ``auto: wrapped 'fc.*' under 'inner'``; nested wrapping names every inserted part."""
    verb = "unwrapped" if unwrap else "wrapped"
    if len(spans) == 1 and not unwrap:
        i, j = spans[0]
        pre = ".".join(long[:i])
        return f"auto: wrapped '{pre + '.' if pre else ''}*' under '{'.'.join(long[i:j])}'"
    if len(spans) == 1:
        return f"auto: unwrapped '{'.'.join(long[spans[0][0]:spans[0][1]])}'"
    parts = [f"'{'.'.join(long[i:j])}'" + (" at the front" if i == 0 else f" after '{long[i - 1]}'")
             for i, j in spans]
    return f"auto: {verb} " + ", then ".join(parts)


def infer_wrapping(saved: Mapping[str, TensorSpec], current: Mapping[str, TensorSpec]) -> list[Rename]:
    """Renames for a module wrapped under (or unwrapped from) new path segments, one level or nested (peft's
    LoRA adds ``base_model.model.`` in front and ``.base_layer`` inside at once); unambiguous pairs only."""
    by_leaf: dict[tuple[str, tuple[int, ...], str], list[str]] = defaultdict(list)
    for s, sspec in saved.items():
        by_leaf[(s.rsplit(".", 1)[-1], *_layout(sspec))].append(s)
    candidates: dict[str, set[str]] = defaultdict(set)
    sources: dict[str, set[str]] = defaultdict(set)
    rule_of: dict[tuple[str, str], str] = {}
    for c, cspec in current.items():
        csegs = c.split(".")
        for s in by_leaf.get((csegs[-1], *_layout(cspec)), ()):
            ssegs = s.split(".")
            spans = _inserted(ssegs, csegs)  # saved pre.rest -> current pre.ins.rest
            unwrap = spans is None
            if unwrap:
                spans = _inserted(csegs, ssegs)  # saved pre.rem.rest -> current pre.rest
            if spans is None:
                continue
            candidates[s].add(c)
            sources[c].add(s)
            rule_of[(s, c)] = _wrap_rule(ssegs if unwrap else csegs, spans, unwrap)
    out = []
    for s, targets in sorted(candidates.items()):
        if len(targets) != 1:
            continue
        (c,) = targets
        if len(sources[c]) != 1:
            continue
        spec = saved[s]
        out.append(Rename(source=s, target=c, rule=rule_of[(s, c)], auto=True,
                          evidence=f"only candidate with the same shape {list(spec.shape)} and dtype {spec.dtype}"))
    return out


def resolve(saved: Iterable[TensorSpec], current: Iterable[TensorSpec], rules: RenameRules
            ) -> tuple[dict[str, str], list[Rename], list[str]]:
    """Map every saved name to the name it loads into (identity when unchanged).

    Returns (mapping, renames applied, problems). A problem (two saved tensors renamed onto one
    name) is reported, not guessed around.
    """
    saved_specs = {t.name: t for t in saved}
    current_specs = {t.name: t for t in current}
    mapping = {n: n for n in saved_specs}
    applied: dict[str, Rename] = {}
    problems: list[str] = []
    for src, (dst, rule) in apply_explicit(saved_specs, rules).items():
        mapping[src] = dst
        applied[src] = Rename(source=src, target=dst, rule=rule, evidence="explicit rule")
    if rules.auto:
        for infer in (infer_index_shift, infer_wrapping):
            taken = set(mapping.values()) & set(current_specs)
            pending = {mapping[s]: saved_specs[s] for s in saved_specs if mapping[s] not in current_specs}
            if infer is infer_index_shift:
                # The shift is judged on the whole container: names that happen to still exist can be wrong.
                pending = {mapping[s]: saved_specs[s] for s in saved_specs}
                free = current_specs
            else:
                free = {n: t for n, t in current_specs.items() if n not in taken}
            inverse = {v: k for k, v in mapping.items()}
            for r in infer(pending, free):
                if r.source == r.target:
                    continue
                origin = inverse[r.source]
                mapping[origin] = r.target
                earlier = applied.get(origin)
                rule = f"{earlier.rule}, then {r.rule}" if earlier else r.rule
                applied[origin] = Rename(source=origin, target=r.target, rule=rule, evidence=r.evidence,
                                         auto=True)
    seen: dict[str, str] = {}
    for src, dst in mapping.items():
        if dst in seen:
            problems.append(f"saved '{seen[dst]}' and '{src}' are both renamed to '{dst}'")
        seen[dst] = src
    return mapping, list(applied.values()), problems
