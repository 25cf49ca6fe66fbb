"""``resumer prune ROOT``: delete old checkpoints by a retention policy, never the newest valid or a leased one."""

from __future__ import annotations

import click

from resumer.cli.common import EXIT_CHECKPOINT, EXIT_OK, out, parse_storage_options, run_command
from resumer.cli.output import emit_json, json_option
from resumer.core.errors import UsageError
from resumer.render.text import printable


@click.command()
@click.argument("root")
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N",
              help="Keep the N newest valid checkpoints (the newest valid one counts as the first).")
@click.option("--keep-every", type=click.IntRange(min=1), metavar="K",
              help="Keep every checkpoint whose step is a multiple of K.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete (and mark) nothing.")
@click.option("--no-verify", is_flag=True,
              help="Find the newest valid checkpoint by sizes only, without reading its bytes for checksums.")
@json_option
@click.option("--storage-option", "-S", "storage", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option (repeatable; dotted keys nest).")
def prune(root: str, keep_last: int | None, keep_every: int | None, dry_run: bool, no_verify: bool, as_json: bool,
          storage: tuple[str, ...]) -> None:
    """Delete the checkpoints under ROOT that the policy does not keep.

    Never deleted: the newest committed and verified checkpoint, anything newer than it, a leased
    checkpoint (a reader holds it), a quarantined one, or a directory without a manifest. Exit 0 ok,
    1 when a deletion failed (the next prune finishes it), 2 on a usage error.
    """
    from resumer.checkpoints.retention import RetentionPolicy
    from resumer.checkpoints.retention import prune as prune_root

    def run() -> int:
        if keep_last is None and keep_every is None:
            raise UsageError("Say what to keep: --keep-last N (the N newest valid checkpoints) and/or --keep-every K "
                             "(every step that is a multiple of K).")
        policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        result = prune_root(root, policy, storage_options=parse_storage_options(storage), dry_run=dry_run,
                            checksums=not no_verify)
        if as_json:
            emit_json(result.to_dict())
        else:
            for d in result.decisions:
                verb = "would delete" if d.delete and dry_run else "deleted" if d.delete else d.action.value
                out.print(printable(f"{verb:>12}  {d.step:>10}  {d.uri}  ({d.reason})"), markup=False,
                          highlight=False, soft_wrap=True)
            if result.note:
                out.print(printable(result.note), markup=False, highlight=False, soft_wrap=True)
            out.print(printable(result.summary()), markup=False, highlight=False, soft_wrap=True)
        return EXIT_CHECKPOINT if result.failed else EXIT_OK

    run_command(run)
