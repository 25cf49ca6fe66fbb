"""``resumer history JOB``: the attempts of a training job and the decision behind each, read from MLflow.

Exit codes: 0 printed; 1 the tracking server did not answer; 2 no such job, experiment or tracking database
(the message names the jobs there are), or a bad option.
"""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from resumer.cli.common import EXIT_OK, out, run_command
from resumer.cli.output import emit_json, json_option
from resumer.render.text import printable
from resumer.tracking.history import JobHistory

_OUTCOME_STYLE = {"started": "green", "resumed": "cyan", "refused": "bold red", "fresh-start": "yellow"}
_STATUS_STYLE = {"RUNNING": "cyan", "FINISHED": "green", "FAILED": "red", "KILLED": "yellow"}


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    model = "/".join(str(counts.get(k, 0)) for k in ("loaded", "renamed", "fresh", "dropped"))
    opt = "/".join(str(counts.get(k, 0)) for k in ("optimizer_carried", "optimizer_fresh"))
    return f"{model}  {opt}"


def _cell(text: str | None, style: str = "") -> Text:
    return Text(printable(text), style=style)


def history_table(history: JobHistory) -> Table:
    """One row per attempt, oldest first."""
    # Cells are escaped Text: what MLflow holds is not trusted to be free of markup or terminal escapes.
    table = Table(title=Text(printable(f"job {history.job} ({history.status}): {len(history.attempts)} attempt(s)")),
                  header_style="bold", show_edge=False, title_justify="left")
    for col in ("attempt", "started (UTC)", "outcome", "previous failure", "policy", "from step", "committed",
                "status", "tensors l/r/f/d  opt c/f"):
        table.add_column(col, overflow="fold")
    for a in history.attempts:
        table.add_row(str(a.attempt), _cell((a.start_time or "").replace("T", " ").rstrip("Z")),
                      _cell(a.outcome, _OUTCOME_STYLE.get(a.outcome, "")), _cell(a.previous_failure),
                      _cell(a.policy), "" if a.step is None else str(a.step),
                      "" if a.committed_step is None else str(a.committed_step),
                      _cell(a.status, _STATUS_STYLE.get(a.status, "")), _counts(a.counts))
    return table


@click.command(name="history")
@click.argument("job")
@click.option("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the "
              "embedded store $RESUMER_HOME/mlflow.db).")
@click.option("--experiment", default="resumer", show_default=True, help="MLflow experiment the job recorded to.")
@json_option
def history_command(job: str, tracking_uri: str | None, experiment: str, as_json: bool) -> None:
    """Print the attempts of JOB and the decision behind each (outcome, failure, policy, checkpoint, plan counts)."""
    from resumer.tracking.history import read_history

    def run() -> int:
        history = read_history(job, tracking_uri=tracking_uri, experiment=experiment)
        if as_json:
            emit_json(history.to_dict())
            return EXIT_OK
        out.print(history_table(history))
        for a in history.attempts:
            if a.message:
                text = printable(f"attempt {a.attempt} {a.outcome}: {a.message}", keep_newlines=True)
                out.print(Text(text, style="red"), highlight=False)
        return EXIT_OK

    run_command(run)
