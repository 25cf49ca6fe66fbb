"""Commands on checkpoints: ``inspect``, ``plan``, ``resume``, ``list`` and the ``demo``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from resumer.cli.common import (
    EXIT_OK,
    EXIT_REFUSED,
    err,
    out,
    parse_storage_options,
    run_command,
    storage_option,
)
from resumer.cli.output import emit_json, json_option
from resumer.render.text import printable, printable_plan


@click.command()
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

    run_command(run)


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


@click.command()
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

    run_command(run)


@click.command()
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

    run_command(run)


@click.command(name="list")
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

    run_command(run)


@click.command()
@click.option("--dir", "workdir", default="resumer-demo", show_default=True, help="Where the demo writes.")
@click.option("--steps", default=30, show_default=True, help="Training steps before the code change.")
def demo(workdir: str, steps: int) -> None:
    """Train a small model, checkpoint, change the model, show the plan, resume. Local, no services."""
    from resumer.examples.demo import run_demo

    run_command(lambda: run_demo(workdir, steps, out))
