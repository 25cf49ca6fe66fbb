"""Commands that take a checkpoint out of the format it was written in: ``convert`` (to a native resumer
checkpoint, through a plan) and ``export`` (to a plain ``torch.save`` file or a Hugging Face-style directory)."""

from __future__ import annotations

import click

from resumer.cli.common import EXIT_OK, EXIT_REFUSED, out, parse_storage_options, run_command, storage_option
from resumer.cli.output import emit_json, json_option
from resumer.render.text import printable, printable_plan


def _line(text: str) -> None:
    out.print(printable(text), markup=False, highlight=False, soft_wrap=True)


@click.command()
@click.argument("source")
@click.argument("root")
@click.option("--model", "model_ref", required=True, metavar="MODULE:FACTORY",
              help="No-argument factory returning the CURRENT model.")
@click.option("--optimizer", "optimizer_ref", metavar="MODULE:FACTORY", help="Factory taking the model.")
@click.option("--scheduler", "scheduler_ref", metavar="MODULE:FACTORY", help="Factory taking the optimizer.")
@click.option("--policy", default="strict", show_default=True, help="strict | partial | reset-optimizer")
@click.option("--rename", "renames", multiple=True, metavar="OLD=NEW",
              help="Regex rename of saved names (repeatable), or 'auto'.")
@json_option
@storage_option
def convert(source: str, root: str, model_ref: str, optimizer_ref: str | None, scheduler_ref: str | None,
            policy: str, renames: tuple[str, ...], as_json: bool, storage: tuple[str, ...]) -> None:
    """Resume SOURCE (any format) into the current code and save it as a native checkpoint under ROOT.

    The checkpoint is written at SOURCE's step, records the source and the plan that produced it, and is
    checksummed after writing. Exit 0 ok, 3 plan refused (nothing written), 2 ROOT already holds that step.
    """
    from resumer.core.errors import PlanRefused
    from resumer.core.plan import Policy
    from resumer.core.renames import parse_renames
    from resumer.jobs.factories import build
    from resumer.runtime.convert import convert as run_convert

    def run() -> int:
        pol, rules = Policy.parse(policy), parse_renames(renames)
        options = parse_storage_options(storage)
        model, optimizer, scheduler = build(model_ref, optimizer_ref, scheduler_ref)
        try:
            done = run_convert(source, root, model, optimizer, scheduler, policy=pol, renames=rules,
                               storage_options=options)
        except PlanRefused as exc:
            if not as_json:
                raise  # one paragraph naming every difference, exit 3
            emit_json({"ok": False, "source": source, "checkpoint": None, "plan": exc.plan.to_dict()})
            return EXIT_REFUSED
        if as_json:
            emit_json(done.to_dict())
            return EXIT_OK
        _line(printable_plan(done.plan).summary())
        _line(f"converted {done.source} ({done.format}) step {done.step} -> {done.checkpoint}: {done.total_bytes} "
              f"bytes, checksums verified, plan {done.plan.digest()} recorded in its extra['converted_from']")
        _line(f"RNG carried: {', '.join(done.rng) or 'none'}")
        for note in done.notes:
            _line(f"note: {note}")
        return EXIT_OK

    run_command(run)


@click.command()
@click.argument("checkpoint")
@click.argument("out_path", metavar="OUT")
@click.option("--to", "to", type=click.Choice(["torch", "hf"]), required=True,
              help="torch: one torch.save file; hf: a Hugging Face Trainer-style directory.")
@json_option
@storage_option
def export(checkpoint: str, out_path: str, to: str, as_json: bool, storage: tuple[str, ...]) -> None:
    """Write CHECKPOINT (any format) to OUT as a plain torch.save file or a Hugging Face-style directory.

    No model is needed. OUT must not exist (or, for --to hf, be an empty directory): nothing is overwritten.
    """
    from resumer.runtime.export import export as run_export

    def run() -> int:
        done = run_export(checkpoint, out_path, to, storage_options=parse_storage_options(storage))
        if as_json:
            emit_json(done.to_dict())
            return EXIT_OK
        opt = f"optimizer state of {done.optimizer_params} parameters" if done.optimizer_params else "no optimizer"
        _line(f"exported {done.source} ({done.format}) step {done.step} -> {done.out} as {to}: {done.tensors} "
              f"tensors, {opt}, {'a' if done.scheduler else 'no'} scheduler, RNG {', '.join(done.rng) or 'none'}")
        if to == "hf":
            _line(f"files: {', '.join(done.files)}")
        for alias, stored in done.deduplicated:
            _line(f"deduplicated: {alias} is tied to {stored} and stored once, under {stored}")
        for note in done.notes:
            _line(f"note: {note}")
        return EXIT_OK

    run_command(run)
