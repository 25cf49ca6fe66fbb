"""Human-readable views of plans and decisions: text, Markdown, HTML, progress."""

from resumer.render.text import plan_markdown, plan_renderable, printable, printable_plan

__all__ = ["plan_markdown", "plan_renderable", "printable", "printable_plan"]
