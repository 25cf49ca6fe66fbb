"""``resumer submit | status | stop | logs``: run a job here (embedded Ray) or on a cluster (Ray Jobs API)."""

from __future__ import annotations

import os
import shlex
import uuid
from typing import Any

import click

from resumer.cli.common import EXIT_OK, EXIT_REFUSED, out, run_command
from resumer.cli.output import emit_json, json_option
from resumer.render.text import printable

ADDRESS_HELP = "Ray cluster address (http://HOST:8265 for the Jobs API); default: $RAY_ADDRESS, else embedded Ray."
EXIT_FAILED = 1


@click.command()
@click.argument("spec_path", metavar="JOB.yaml")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
@click.option("--timeout", "timeout_s", type=float, default=None, help="Stop the job after this many seconds.")
@click.option("--no-mlflow", is_flag=True, help="Do not record in MLflow (decisions are only logged).")
@json_option
def submit(spec_path: str, address: str | None, timeout_s: float | None, no_mlflow: bool, as_json: bool) -> None:
    """Run JOB.yaml: train on Ray Train workers, recover from failures, record every decision.

    Without an address the controller runs here on an embedded local Ray and this command returns when the
    job ends (exit 0 succeeded, 3 refused: the message says what to change, 1 failed). With --address the
    controller is submitted to the cluster through the Ray Jobs API and survives this terminal closing.
    Every decision is recorded in MLflow (the spec's mlflow section; default: the embedded SQLite store)
    before its attempt launches: `resumer history NAME` reads them back.
    """
    def run() -> int:
        from resumer.jobs import spec as jobspec
        spec = jobspec.load(spec_path)
        if address and address.startswith("http"):
            return _submit_remote(spec_path, spec.name, address, as_json, no_mlflow)
        from resumer.core.controller import State
        from resumer.jobs.run import LogRecorder, run_job

        result = run_job(spec, address=address, timeout_s=timeout_s, recorder=LogRecorder() if no_mlflow else None)
        if as_json:
            emit_json(result.to_dict())
        else:
            for d in result.decisions:
                out.print(printable(d.summary(), keep_newlines=True), markup=False, highlight=False)
            out.print(printable(f"job {spec.name}: {result.state.value} after {result.attempts} attempt(s)"
                                    + (f"\n{result.message}" if result.message else ""), keep_newlines=True),
                          markup=False, highlight=False)
            if result.tracking_uri:
                where = _redact_uri(result.tracking_uri)
                hint = "" if spec.tracking_uri is None else f" --tracking-uri {where}"
                out.print(f"recorded in MLflow ({where}): resumer history {spec.name}{hint}",
                              markup=False, highlight=False)
        if result.state is State.SUCCEEDED:
            return EXIT_OK
        return EXIT_REFUSED if result.state is State.REFUSED else EXIT_FAILED

    run_command(run)


def _redact_uri(uri: str) -> str:
    """``uri`` without a password (``http://user:secret@host`` -> ``http://user:***@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                     + (f":{parts.port}" if parts.port else "")))


def _submit_remote(spec_path: str, name: str, address: str, as_json: bool, no_mlflow: bool = False) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = f"resumer-{name}-{uuid.uuid4().hex[:6]}"
    # The controller runs on the cluster and reads the spec there: the path must be valid on the head node
    # (the same checkout locally, or the path baked into the image, as in deploy/kuberay/rayjob.yaml).
    flags = " --no-mlflow" if no_mlflow else ""
    client.submit_job(entrypoint=f"python -m resumer submit {shlex.quote(os.path.abspath(spec_path))}{flags}",
                      submission_id=job_id)
    if as_json:
        emit_json({"submission_id": job_id, "address": address}, indent=None)
    else:
        out.print(f"submitted {job_id} to {address}\n  resumer status {job_id} --address {address}",
                  markup=False, highlight=False)
    return 0


def _client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    from resumer.core.errors import UsageError

    if not address:
        raise UsageError("Give --address (or set RAY_ADDRESS) to reach the cluster's Ray Jobs API.")
    return JobSubmissionClient(address)


@click.command()
@click.argument("job_id")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
@json_option
def status(job_id: str, address: str | None, as_json: bool) -> None:
    """Show the state of a submitted job."""
    def run() -> int:
        info = _client(address).get_job_info(job_id)
        row = {"submission_id": job_id, "status": str(info.status), "message": info.message}
        if as_json:
            emit_json(row, indent=None)
        else:
            click.echo(printable(f"{job_id}: {row['status']} {row['message'] or ''}"))
        return EXIT_OK

    run_command(run)


@click.command()
@click.argument("job_id")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
def stop(job_id: str, address: str | None) -> None:
    """Stop a submitted job (its controller ends the running attempt as KILLED)."""
    def run() -> int:
        stopped = _client(address).stop_job(job_id)
        click.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return EXIT_OK

    run_command(run)


@click.command()
@click.argument("job_id")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
def logs(job_id: str, address: str | None) -> None:
    """Print a submitted job's controller log."""
    def run() -> int:
        click.echo(_client(address).get_job_logs(job_id))
        return EXIT_OK

    run_command(run)
