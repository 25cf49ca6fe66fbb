"""What an attempt's MLflow run says about its decision: tags, description and artifact files. Pure."""

from __future__ import annotations

import json

from resumer.core.decision import Decision
from resumer.render.html import plan_html
from resumer.render.text import plan_markdown
from resumer.tracking.mlflow_ops import KIND_TAG, MAX_TAG_LEN


def attempt_tags(d: Decision, submission: str) -> dict[str, str]:
    """The attempt run's tags: the decision's own, the plan summary, the refusal message, the description."""
    tags = {**d.tags(), KIND_TAG: "attempt", "resumer.submission": submission,
            "resumer.rejected_count": str(len(d.rejected))}
    if d.plan is not None:
        tags["resumer.plan_summary"] = d.plan.summary()
    if d.message:
        tags["resumer.message"] = d.message[:MAX_TAG_LEN]
    tags["mlflow.note.content"] = note(d)[:MAX_TAG_LEN]  # the run's description: the decision at a glance
    return tags


def attempt_files(d: Decision) -> dict[str, str]:
    """Artifact name -> text: decision.json, rejected.json, and the plan (json, md, html) or the message."""
    summary = {**d.to_dict(), "plan": None if d.plan is None else d.plan.summary()}
    files = {"decision.json": json.dumps(summary, indent=2), "rejected.json": json.dumps(list(d.rejected), indent=2)}
    if d.plan is not None:
        files |= {"plan.json": json.dumps(d.plan.to_dict(), indent=2), "plan.md": plan_markdown(d.plan),
                  "plan.html": plan_html(d.plan)}
    if d.message:
        files["message.txt"] = d.message.rstrip("\n") + "\n"
    return files


def note(d: Decision) -> str:
    """Markdown for the attempt run's description in the MLflow UI (long tag keys are cut off there)."""
    where = f" from `{d.checkpoint}` (step {d.step})" if d.checkpoint else ""
    lines = [f"**{d.outcome.value}**{where} under policy `{d.policy}`; previous attempt: {d.previous_failure.value}."]
    if d.plan is not None:
        lines.append(f"`{d.plan.summary()}`")
    if d.message:
        lines.append("```\n" + d.message.rstrip("\n") + "\n```")
    if d.rejected:
        lines.append(f"{len(d.rejected)} candidate checkpoint(s) passed over: see `rejected.json`.")
    if d.plan is not None:
        lines.append("Every tensor's action: `plan.md` / `plan.html` under Artifacts.")
    return "\n\n".join(lines)
