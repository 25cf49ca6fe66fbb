"""Plans for people: a terminal table (rich) and Markdown. JSON is ``Plan.to_dict``.

Every text read from a checkpoint (tensor names, renames, refusals, notes, URIs) reaches a person only
through ``printable``: a tensor named ``"\\x1b]0;pwned\\x07"`` (a terminal title escape) must not retitle
or clear their terminal.
JSON stays lossless (``json.dumps`` escapes control characters itself).
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from rich.console import Group
from rich.table import Table
from rich.text import Text

from resumer.core.plan import Action, Plan, PlanEntry, Section

# C0 and C1 control characters, DEL, and the invisible bidirectional and line-separator marks that reorder or
# break what a terminal shows ("Trojan Source").
_OTHER_UNSAFE = r"\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE_RE = re.compile(rf"[\x00-\x1f{_OTHER_UNSAFE}]")
_UNSAFE_KEEP_NL_RE = re.compile(rf"[\x00-\x09\x0b-\x1f{_OTHER_UNSAFE}]")
_T = TypeVar("_T")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str | None, *, keep_newlines: bool = False) -> str:
    """``text`` safe to show in a terminal, Markdown or HTML: control characters become ``\\x1b``-style escapes.

    Args:
        text: Anything that may come from a checkpoint or another untrusted source.
        keep_newlines: Keep ``\\n`` (for messages of several lines); every other control character is escaped.
    """
    if not text:
        return ""
    return (_UNSAFE_KEEP_NL_RE if keep_newlines else _UNSAFE_RE).sub(_escape, text)


def _printable_value(value: Any) -> Any:
    if isinstance(value, Enum):  # str-valued enums stay enums
        return value
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, tuple):
        return tuple(_printable_value(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _printable_value(getattr(value, f.name)) for f in fields(value) if f.init})
    return value


def printable_plan(plan: _T) -> _T:
    """A copy of a Plan (or any frozen dataclass) whose every string is ``printable``: render this, never the raw."""
    return _printable_value(plan)  # type: ignore[no-any-return]


_STYLE = {
    Action.LOAD: "green", Action.LOAD_RENAMED: "cyan", Action.CAST: "yellow", Action.INIT_FRESH: "magenta",
    Action.DROP: "red", Action.SHAPE_MISMATCH: "red", Action.CARRY: "green", Action.FRESH: "magenta",
    Action.RESET: "yellow", Action.UNUSED: "dim", Action.RESTORE: "green", Action.SKIP: "dim", Action.KEEP: "green",
}


def _interesting(e: PlanEntry) -> bool:
    """Plain loads and carries are the expected case; everything else is worth a row."""
    return e.refused or e.action not in (Action.LOAD, Action.CARRY) or (
        e.section not in (Section.MODEL, Section.OPTIMIZER_STATE))


def _rows(plan: Plan, show_all: bool) -> tuple[list[PlanEntry], int]:
    rows = [e for e in plan.entries if show_all or _interesting(e)]
    return rows, len(plan.entries) - len(rows)


def _layout(e: PlanEntry) -> str:
    if e.saved and e.current and e.saved != e.current:
        return f"{e.saved} -> {e.current}"
    return e.current or e.saved or ""


def _source(e: PlanEntry) -> Text:
    # Cells are Text, never str: rich would read "[...]" in a tensor name as markup.
    return Text(e.source if e.source and e.source != e.name else "")


def _action(e: PlanEntry) -> Text:
    return Text(e.action.value + (" (refused)" if e.refused else ""),
                style="bold red" if e.refused else _STYLE.get(e.action, ""))


def plan_renderable(plan: Plan, *, show_all: bool = False) -> Group:
    """A rich renderable: summary, renames with evidence, one table per section, refusals and the fix."""
    plan = printable_plan(plan)
    parts: list = [Text(plan.summary(), style="bold green" if plan.ok else "bold red")]
    if plan.checkpoint:
        parts.append(Text(f"checkpoint: {plan.checkpoint}", style="dim"))
    parts += [Text(f"note: {note}", style="dim") for note in plan.notes]
    evidence = sorted({(r.rule, r.evidence) for r in plan.renames})
    for rule, why in evidence:
        n = sum(1 for r in plan.renames if (r.rule, r.evidence) == (rule, why))
        parts.append(Text(f"rename ({n} tensors) {rule}: {why}", style="cyan"))
    rows, hidden = _rows(plan, show_all)
    tensors = [e for e in rows if e.section in (Section.MODEL, Section.OPTIMIZER_STATE)]
    rest = [e for e in rows if e not in tensors]
    if tensors:
        table = Table(header_style="bold", show_edge=False)
        for col in ("tensor", "action", "from", "layout", "reason"):
            table.add_column(col, overflow="fold")
        for e in tensors:
            name = e.name if e.section is Section.MODEL else f"optimizer state of {e.name}"
            table.add_row(Text(name), _action(e), _source(e), Text(_layout(e)), Text(e.reason))
        parts.append(table)
    if rest:
        table = Table(header_style="bold", show_edge=False)
        for col in ("state", "action", "from", "reason"):
            table.add_column(col, overflow="fold")
        for e in rest:
            what = e.section.value if e.name == e.section.value else f"{e.section.value} {e.name}"
            table.add_row(Text(what), _action(e), _source(e), Text(e.reason))
        parts.append(table)
    if hidden:
        parts.append(Text(f"{hidden} plain loads/carries not shown (--all shows every entry)", style="dim"))
    if not plan.ok:
        parts.append(Text(plan.describe_refusal(), style="red"))
    return Group(*parts)


def _md(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def plan_markdown(plan: Plan, *, show_all: bool = True) -> str:
    """The plan as a Markdown document (used for MLflow artifacts and PR comments)."""
    plan = printable_plan(plan)
    lines = [f"# Resume plan: {'ok' if plan.ok else 'REFUSED'}", "", f"`{plan.summary()}`", ""]
    if plan.checkpoint:
        lines += [f"- checkpoint: `{plan.checkpoint}`"]
    lines += [f"- policy: `{plan.policy.value}`", f"- step: {plan.step}"]
    lines += [f"- note: {n}" for n in plan.notes]
    if plan.refusals:
        lines += ["", "## Refusals", ""] + [f"- {_md(str(r))}" for r in plan.refusals]
        if plan.suggestion:
            lines += ["", f"To resume: `{plan.suggestion}`"]
    if plan.renames:
        lines += ["", "## Renames", "", "| from | to | rule | evidence |", "|---|---|---|---|"]
        lines += [f"| `{r.source}` | `{r.target}` | {_md(r.rule)} | {_md(r.evidence)} |" for r in plan.renames]
    rows, hidden = _rows(plan, show_all)
    lines += ["", "## Entries", "", "| section | name | action | from | saved | now | reason |",
              "|---|---|---|---|---|---|---|"]
    for e in rows:
        action = e.action.value + (" **(refused)**" if e.refused else "")
        src = e.source if e.source and e.source != e.name else ""
        lines.append(f"| {e.section.value} | `{e.name}` | {action} | {_md(src)} | {_md(e.saved)} | "
                     f"{_md(e.current)} | {_md(e.reason)} |")
    if hidden:
        lines.append(f"\n{hidden} plain loads/carries not shown.")
    return "\n".join(lines) + "\n"
