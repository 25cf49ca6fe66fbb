"""A plan as a small self-contained HTML page (an MLflow artifact the UI shows inline)."""

from __future__ import annotations

from html import escape

from resumer.core.plan import Plan
from resumer.render.text import printable_plan

_CSS = ("body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}.refused{color:#b00;font-weight:bold}"
        "code{font-size:13px}")


def plan_html(plan: Plan) -> str:
    """Summary, refusals with the fix, renames with their evidence, and one row per entry."""
    plan = printable_plan(plan)  # escaped for the terminal first, then for HTML
    verdict = "ok" if plan.ok else "REFUSED"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Resume plan: {verdict}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>Resume plan: {verdict}</h1>",
             f"<p><code>{escape(plan.summary())}</code></p><ul>",
             f"<li>checkpoint: <code>{escape(plan.checkpoint or '-')}</code></li>",
             f"<li>policy: <code>{escape(plan.policy.value)}</code></li><li>step: {plan.step}</li>"]
    parts += [f"<li>note: {escape(n)}</li>" for n in plan.notes]
    parts.append("</ul>")
    if plan.refusals:
        parts.append("<h2>Refusals</h2><ul>")
        parts += [f"<li class='refused'>{escape(str(r))}</li>" for r in plan.refusals]
        parts.append("</ul>")
        if plan.suggestion:
            parts.append(f"<p>To resume: <code>{escape(plan.suggestion)}</code></p>")
    if plan.renames:
        parts.append("<h2>Renames</h2><table><tr><th>from</th><th>to</th><th>rule</th><th>evidence</th></tr>")
        parts += [f"<tr><td><code>{escape(r.source)}</code></td><td><code>{escape(r.target)}</code></td>"
                  f"<td>{escape(r.rule)}</td><td>{escape(r.evidence)}</td></tr>" for r in plan.renames]
        parts.append("</table>")
    parts.append("<h2>Entries</h2><table><tr><th>section</th><th>name</th><th>action</th><th>from</th>"
                 "<th>saved</th><th>now</th><th>reason</th></tr>")
    for e in plan.entries:
        action = escape(e.action.value) + (" <span class='refused'>(refused)</span>" if e.refused else "")
        src = e.source if e.source and e.source != e.name else ""
        parts.append(f"<tr><td>{escape(e.section.value)}</td><td><code>{escape(e.name)}</code></td><td>{action}</td>"
                     f"<td>{escape(src)}</td><td>{escape(e.saved or '')}</td><td>{escape(e.current or '')}</td>"
                     f"<td>{escape(e.reason)}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"
