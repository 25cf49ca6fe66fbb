"""The ``resumer`` command line. Exit codes: 0 ok, 1 bad checkpoint (``history``: tracking server unreachable),
2 usage error, 3 plan refused."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from types import TracebackType
from typing import Any

import click
from rich.console import Console

from resumer.cli import output as cli_output
from resumer.cli.history import history_command  # imports resumer.cli.main only inside the command: no cycle
from resumer.cli.jobs import logs, status, stop, submit  # import resumer.cli.main only inside the commands: no cycle
from resumer.cli.output import emit_json, json_option
from resumer.cli.prune import prune as prune_command  # imports resumer.cli.main only inside the command: no cycle
from resumer.cli.watch import watch_command  # imports resumer.cli.main only inside the command: no cycle
from resumer.core.errors import PlanRefused, ResumerError, UsageError
from resumer.render.text import printable, printable_plan

EXIT_OK, EXIT_CHECKPOINT, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
SECRET_WORDS = ("secret", "token", "password", "key", "credential")
# Libraries that raise on a URI or storage options they cannot use: their errors are about what the user gave.
STORAGE_PACKAGES = ("fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore", "aiohttp", "urllib3", "requests")

out = Console()
err = Console(stderr=True)


def parse_storage_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    """``key=value`` pairs (dotted keys nest: client_kwargs.endpoint_url=...); values may be JSON."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        parts = key.split(".")
        if not eq or not all(p.strip() for p in parts):
            raise UsageError(f"Bad --storage-option {printable(item)!r}: write KEY=VALUE, where KEY is a name or "
                             "dotted names (e.g. -S anon=true -S client_kwargs.endpoint_url=http://127.0.0.1:9000).")
        try:
            parsed: Any = json.loads(value)
        except (json.JSONDecodeError, ValueError):
            parsed = value
        node = options
        *path, leaf = parts
        for i, p in enumerate(path):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"Bad --storage-option {printable(item)!r}: {'.'.join(path[:i + 1])!r} is already "
                                 f"set to a value ({node!r}), so it cannot also hold {'.'.join(parts[i + 1:])!r}. "
                                 "Give each option once.")
        if isinstance(node.get(leaf), dict):
            raise UsageError(f"Bad --storage-option {printable(item)!r}: {key!r} already holds nested options "
                             f"({', '.join(node[leaf])}). Give each option once.")
        node[leaf] = parsed
    return options or None


def redact(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy safe to print or log: values of secret-looking keys are replaced."""
    if options is None:
        return None
    return {k: redact(v) if isinstance(v, dict) else ("***" if any(w in k.lower() for w in SECRET_WORDS) else v)
            for k, v in options.items()}


def _say(text: str) -> None:
    """One message on stderr, control characters escaped, never re-wrapped (a script may grep it)."""
    err.print(printable(text, keep_newlines=True), markup=False, highlight=False, soft_wrap=True)


def _verbose() -> int:
    ctx = click.get_current_context(silent=True)
    return int(ctx.find_root().params.get("verbose") or 0) if ctx is not None else 0


def _from_storage(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` is in a storage library."""
    name = ""
    while tb is not None:
        name = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return name.partition(".")[0] in STORAGE_PACKAGES


def _unexpected(exc: Exception) -> int:
    """One paragraph for an error resumer did not raise on purpose (``-v`` shows the traceback)."""
    what = f"{type(exc).__name__}: {exc}"
    if _from_storage(exc.__traceback__):
        _say(f"error: the storage library could not use the URI or storage options as given ({what}). Check the "
             "URI (e.g. s3://bucket/path) and every -S KEY=VALUE option against the filesystem's documentation; "
             "run with -v to see the traceback.")
        return EXIT_USAGE
    _say(f"error: unexpected {what}. Nothing was changed by this command unless it said so; run with -v to see "
         "the traceback, and report it if the cause is not in your code or storage.")
    return EXIT_CHECKPOINT


def _run(fn: Callable[[], int]) -> None:
    """Run a command body: exit codes from errors, one paragraph each; ``--json`` keeps stdout for the JSON."""
    with cli_output.json_stdout() if cli_output.wants_json() else nullcontext():
        try:
            code = fn()
        except Exception as exc:  # noqa: BLE001 - every error becomes one paragraph and an exit code
            if _verbose():
                traceback.print_exception(exc, file=sys.stderr)
            code = _report(exc)
    sys.exit(code)


def _report(exc: Exception) -> int:
    if isinstance(exc, PlanRefused):
        _say(printable_plan(exc.plan).describe_refusal())
        return EXIT_REFUSED
    if isinstance(exc, UsageError):
        _say(f"error: {exc}")
        return EXIT_USAGE
    if isinstance(exc, ResumerError):  # CheckpointError, TransientStorageError, ...: this checkpoint or storage
        _say(f"error: {exc}")
        return EXIT_CHECKPOINT
    return _unexpected(exc)


storage_option = click.option("--storage-option", "-S", "storage", multiple=True, metavar="KEY=VALUE",
                              help="fsspec storage option (repeatable; dotted keys nest).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="resumer")
def cli(verbose: int) -> None:
    """Plan and apply resumes of PyTorch training across code changes."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Only resumer's own loggers get more verbose: botocore's DEBUG records print signed request headers
    # (the access key id), and other libraries are noise here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("resumer").setLevel(level)
    logging.getLogger(__name__).debug("debug logging on for resumer's loggers only (storage options redacted)")


@cli.command()
@click.argument("checkpoint")
@click.option("--verify", is_flag=True, help="Also check every file's checksum.")
@json_option
@storage_option
def inspect(checkpoint: str, verify: bool, as_json: bool, storage: tuple[str, ...]) -> None:
    """Summarise CHECKPOINT (a checkpoint, a root of checkpoints, or a torch.save file)."""
    from resumer.runtime.inspect import describe, inspect_checkpoint

    def run() -> int:
        info = inspect_checkpoint(checkpoint, parse_storage_options(storage), verify=verify)
        if as_json:
            emit_json(info)
        else:
            out.print(describe(info), markup=False, highlight=False)
        return EXIT_OK

    _run(run)


def _plan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.argument("checkpoint"),
        click.option("--model", "model_ref", required=True, metavar="MODULE:FACTORY",
                     help="No-argument factory returning the CURRENT model (built on the meta device when it can)."),
        click.option("--optimizer", "optimizer_ref", metavar="MODULE:FACTORY", help="Factory taking the model."),
        click.option("--scheduler", "scheduler_ref", metavar="MODULE:FACTORY", help="Factory taking the optimizer."),
        click.option("--policy", default="strict", show_default=True,
                     help="strict | partial | reset-optimizer"),
        click.option("--rename", "renames", multiple=True, metavar="OLD=NEW",
                     help="Regex rename of saved names (repeatable), or 'auto'."),
        json_option, storage_option,
    ]):
        f = opt(f)
    return f


@cli.command()
@_plan_options
@click.option("--markdown", is_flag=True, help="Print the plan as Markdown.")
@click.option("--all", "show_all", is_flag=True, help="Show every entry, plain loads included.")
def plan(checkpoint: str, model_ref: str, optimizer_ref: str | None, scheduler_ref: str | None, policy: str,
         renames: tuple[str, ...], as_json: bool, storage: tuple[str, ...], markdown: bool, show_all: bool) -> None:
    """Show what resuming CHECKPOINT into the current code would do. Exit 0 ok, 3 refused."""
    import resumer
    from resumer.core.plan import Policy
    from resumer.core.renames import parse_renames
    from resumer.jobs.factories import build
    from resumer.render.text import plan_markdown, plan_renderable

    def run() -> int:
        pol, rules = Policy.parse(policy), parse_renames(renames)
        model, optimizer, scheduler = build(model_ref, optimizer_ref, scheduler_ref)
        p = resumer.plan(checkpoint, model, optimizer, scheduler, policy=pol, renames=rules,
                         storage_options=parse_storage_options(storage))
        if as_json:
            emit_json(p.to_dict())
        elif markdown:
            click.echo(plan_markdown(p, show_all=show_all))
        else:
            out.print(plan_renderable(p, show_all=show_all))
        return EXIT_OK if p.ok else EXIT_REFUSED

    _run(run)


@cli.command()
@_plan_options
@click.option("--save-to", metavar="ROOT", help="Save the resumed state as a new checkpoint (same step) under ROOT.")
@click.option("--no-verify", is_flag=True, help="Skip checksums (sizes and headers are still checked).")
def resume(checkpoint: str, model_ref: str, optimizer_ref: str | None, scheduler_ref: str | None, policy: str,
           renames: tuple[str, ...], as_json: bool, storage: tuple[str, ...], save_to: str | None,
           no_verify: bool) -> None:
    """Apply the plan to fresh objects from the factories; optionally save the migrated checkpoint."""
    import resumer
    from resumer.core.plan import Policy
    from resumer.core.renames import parse_renames
    from resumer.jobs.factories import build
    from resumer.render.progress import byte_progress

    def run() -> int:
        pol, rules = Policy.parse(policy), parse_renames(renames)
        options = parse_storage_options(storage)
        model, optimizer, scheduler = build(model_ref, optimizer_ref, scheduler_ref)
        with byte_progress(err, "verifying and loading") as progress:
            res = resumer.resume(checkpoint, model, optimizer, scheduler, policy=pol, renames=rules,
                                 storage_options=options, verify=not no_verify, progress=progress)
        saved = None
        if save_to:
            saved = resumer.save_checkpoint(save_to, res.step, model, optimizer, scheduler,
                                            extra={**res.extra, "resumed_from": res.checkpoint},
                                            storage_options=options)
        if as_json:
            emit_json({"ok": True, "step": res.step, "checkpoint": res.checkpoint, "saved": saved,
                       "bytes_read": res.bytes_read, "load_seconds": round(res.load_seconds, 4),
                       "plan": res.plan.to_dict()})
        else:
            out.print(printable_plan(res.plan).summary(), markup=False, highlight=False)
            out.print(f"resumed step {res.step} from {printable(res.checkpoint)}: {res.bytes_read} bytes in "
                      f"{res.load_seconds:.2f}s", markup=False, highlight=False)
            if saved:
                out.print(f"saved {printable(saved)}", markup=False, highlight=False)
        return EXIT_OK

    _run(run)


@cli.command(name="list")
@click.argument("root")
@click.option("--all", "show_all", is_flag=True, help="Include quarantined checkpoints, with their reasons.")
@json_option
@storage_option
def list_(root: str, show_all: bool, as_json: bool, storage: tuple[str, ...]) -> None:
    """List the committed checkpoints under ROOT, newest first."""
    import resumer

    def run() -> int:
        infos = resumer.list_checkpoints(root, storage_options=parse_storage_options(storage),
                                         include_quarantined=show_all)
        rows = [{"uri": i.uri, "step": i.step, "time": i.time, "bytes": i.total_bytes, "quarantine": i.quarantine}
                for i in infos]
        if as_json:
            emit_json(rows)
        elif not rows:
            out.print(f"no committed checkpoints under {printable(root)}", markup=False, highlight=False)
        for r in rows if not as_json else ():
            mark = f"  QUARANTINED: {r['quarantine']}" if r["quarantine"] else ""
            out.print(printable(f"{r['step']:>10}  {r['time']}  {r['bytes']:>12}  {r['uri']}{mark}"), markup=False,
                      highlight=False, soft_wrap=True)
        return EXIT_OK

    _run(run)


@cli.command()
@click.option("--dir", "workdir", default="resumer-demo", show_default=True, help="Where the demo writes.")
@click.option("--steps", default=30, show_default=True, help="Training steps before the code change.")
def demo(workdir: str, steps: int) -> None:
    """Train a small model, checkpoint, change the model, show the plan, resume. Local, no services."""
    from resumer.examples.demo import run_demo

    _run(lambda: run_demo(workdir, steps, out))


cli.add_command(watch_command)
cli.add_command(history_command)
cli.add_command(prune_command)
for _command in (submit, status, stop, logs):
    cli.add_command(_command)


def main() -> None:
    """The ``resumer`` entry point: this process is the command."""
    cli_output.keep_redirected_at_exit = True  # late prints (Ray threads, exit handlers) never follow the JSON
    cli(prog_name="resumer")


if __name__ == "__main__":
    main()
